"""Small helpers for tests (ports, waiting for servers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

# The tiny trained runs the session shares (tests/conftest.py ``car_run``, ``tiger_run``): 30 steps of the real
# training job, enough for a ranking that is the model's own, not a good one.
SHORT = ["batch_size=64", "max_steps=30", "lr=0.003", "warmup_steps=10", "eval_every=0", "checkpoint_every=0",
         "log_every=10", "patience=0"]
TINY_CAR = ["train.model=car", "model.car.d_model=32", "model.car.n_heads=2", "model.car.n_layers=1",
            "model.car.d_ff=64", "model.car.slow_weight_grid=[0.5,1.0]"]
TINY_TIGER = ["train.model=tiger", "model.tiger.d_model=32", "model.tiger.n_heads=2", "model.tiger.head_dim=16",
              "model.tiger.d_ff=64", "model.tiger.encoder_layers=1", "model.tiger.decoder_layers=1",
              "model.tiger.beam_width=12", "evaluate.beam_width=12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception as exc:  # noqa: BLE001
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s: {last}")


class MlflowServer:
    """A real `mlflow server` (cluster/mlflow_server.sh: SQLite store under ``root``, served artifacts) on a free
    loopback port; it can be stopped (SIGTERM to its process group) and started again on the same port and store.

    MLflow 3's GenAI job runner (huey consumers) is off: tracking does not need it, and on a 2-core box it takes
    20-50 s of CPU at start and slows the stop from ~4 s to ~12 s.
    """

    def __init__(self, root):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_ROOT": str(self.root), "MLFLOW_PORT": str(self.port),
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        with open(os.path.join(self.root, "server.log"), "a") as log:
            self.proc = subprocess.Popen(["bash", os.path.join(REPO, "cluster", "mlflow_server.sh")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.url + "/health", timeout=120, proc=self.proc)

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _listening(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"port {self.port} still answers after SIGTERM")
            time.sleep(0.2)
        self.proc = None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout, or when pytest-timeout interrupts the test, the
    whole process group goes (a launcher's ranks too), so a hung job cannot outlive its test and hold the CPU, a port
    or a build lock under the tests that follow."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group ended on its own meanwhile
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_job(job: str, *args: str, env: dict | None = None, timeout: float = 900, check: bool = True,
            cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run ``jobs/<job>.py`` as a subprocess, the way a user does."""
    full_env = {**os.environ, **(env or {})}
    proc = run_group([sys.executable, os.path.join(REPO, "jobs", f"{job}.py"), *args], timeout, cwd=cwd,
                     env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"jobs/{job}.py failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


class FaultProxy:
    """A TCP forwarder on a free loopback port in front of an HTTP server (the moto S3 endpoint) that can be told to
    go away in the middle of a run, deterministically.

    Requests from each client are parsed just enough to count them (method, Content-Length or chunked body). When
    ``fail_after_puts`` complete PUT requests have been forwarded, the next PUT is not forwarded: the proxy closes
    every live connection and from then on accepts each new connection only to reset it (the endpoint is gone, as
    behind a load balancer with no healthy backend). Those connections are counted in ``attempts_after_outage``,
    so a test can bound the client's retries by counting, not by timing. ``restore()`` forwards again.
    """

    def __init__(self, upstream: str, fail_after_puts: int | None = None):
        import threading
        from urllib.parse import urlsplit

        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.fail_after_puts = fail_after_puts
        self.puts = 0  # PUT requests forwarded whole
        self.attempts_after_outage = 0
        self.down = False
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def go_away(self) -> None:
        """Close every live connection; new ones are reset from now on."""
        with self._lock:
            self.down = True
            live, self._live = list(self._live), set()
        for s in live:
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self.down = False
            self.fail_after_puts = None

    def close(self) -> None:
        self._closed = True
        self.go_away()
        self._listener.close()

    def _accept_loop(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self.down
                if down:
                    self.attempts_after_outage += 1
            if down:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._live.update((client, server))
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _reset(src)
            _reset(dst)

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        """Forward client -> server one HTTP request at a time, counting PUTs and going away on cue."""
        reader = client.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline(65536)
                    if not line:
                        return
                    head += line
                method = head.split(b" ", 1)[0].upper()
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (ln.decode("latin-1").partition(":") for ln in head.split(b"\r\n")[1:] if ln)}
                if method == b"PUT":
                    with self._lock:
                        cue = self.fail_after_puts is not None and self.puts >= self.fail_after_puts
                    if cue:
                        self.go_away()
                        return
                server.sendall(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    while True:
                        size_line = reader.readline(65536)
                        server.sendall(size_line)
                        size = int(size_line.split(b";")[0].strip() or b"0", 16)
                        server.sendall(reader.read(size + 2) if size else b"")
                        if size == 0:  # trailers until an empty line
                            while (t := reader.readline(65536)) not in (b"\r\n", b""):
                                server.sendall(t)
                            server.sendall(b"\r\n")
                            break
                else:
                    length = int(headers.get("content-length", "0") or 0)
                    while length:
                        chunk = reader.read(min(length, 65536))
                        if not chunk:
                            return
                        server.sendall(chunk)
                        length -= len(chunk)
                if method == b"PUT":
                    with self._lock:
                        self.puts += 1
        except OSError:
            pass
        finally:
            _reset(client)
            _reset(server)


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection drop, not a clean end of response."""
    import struct

    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)  # acts now, even while a reader thread holds a makefile() on it
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
