"""A real two-node Ray cluster on one machine: two network namespaces joined by a veth pair, each with its own
address, the head (``cluster/start_ray.sh head``) in one and a worker node (``cluster/start_ray.sh worker``) in
the other. Traffic between the nodes goes over that link only: neither namespace has a route anywhere else, and
nothing in them listens on the machine's own addresses. Jobs are submitted from the head's namespace with
``ray job submit``, as a user on the head machine would.

Losing the worker node is ``pkill -KILL`` of its whole session (raylet, object store, every worker process of
that node at once: what a machine that dies leaves behind), and it comes back with :meth:`revive`. The head
detects a dead node within a few seconds (its GCS health checks are tightened for the test).

Making namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); :func:`make_cluster` raises :class:`Unavailable`
with the reason where they cannot be made, and the fixture turns that into a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

from _util import REPO

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
EXCLUDES = ["outputs/", ".venv/", "venv/", ".git/", "benchmarks/results/", "mlflow-server/", ".hypothesis/",
            ".pytest_cache/", "**/__pycache__/", "test-artifacts/"]


class Unavailable(RuntimeError):
    """Namespaces (or Ray inside them) cannot be made on this machine."""


def _sh(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


class TwoNodes:
    """The namespaces, their addresses and the two Ray nodes."""

    def __init__(self, tag: str | None = None):
        n = os.getpid() % 200 + 20
        self.tag = tag or f"{os.getpid() % 100000}"
        self.head_ns, self.worker_ns = f"gdh{self.tag}", f"gdw{self.tag}"
        self.head_ip, self.worker_ip = f"10.{n}.77.1", f"10.{n}.77.2"
        self.tmp = f"/tmp/gd2n{self.tag}"  # short: Ray's unix sockets live under the nodes' temp dirs
        self.head_dir, self.worker_dir = f"{self.tmp}/h", f"{self.tmp}/w"
        self.gcs = f"{self.head_ip}:6379"
        self.address = f"http://{self.head_ip}:8265"
        token = uuid.uuid4().hex + uuid.uuid4().hex
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**os.environ, "RAY_BIN": RAY, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    # a dead node is declared dead after ~3 s of failed health checks (Ray's default: ~30 s)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}

    # ---- namespaces -------------------------------------------------------------------------------------------
    def make_namespaces(self) -> None:
        try:
            _sh("ip", "netns", "add", self.head_ns)
        except (RuntimeError, FileNotFoundError) as exc:
            raise Unavailable(f"cannot make a network namespace here (needs root and iproute2): {exc}") from None
        _sh("ip", "netns", "add", self.worker_ns)
        a, b = f"{self.head_ns}v", f"{self.worker_ns}v"
        _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _sh("ip", "link", "set", a, "netns", self.head_ns)
        _sh("ip", "link", "set", b, "netns", self.worker_ns)
        for ns, dev, ip in ((self.head_ns, a, self.head_ip), (self.worker_ns, b, self.worker_ip)):
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def in_ns(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    # ---- Ray nodes --------------------------------------------------------------------------------------------
    def start_head(self) -> None:
        env = {**self.env, "GENREC_RAY_TEMP_DIR": self.head_dir, "GENREC_RAY_DASHBOARD_HOST": self.head_ip}
        proc = subprocess.run(self.in_ns(self.head_ns, "bash", os.path.join(REPO, "cluster", "start_ray.sh"),
                                         "head", "--num-cpus=2", f"--node-ip-address={self.head_ip}"),
                              env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(f"head did not start: {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        self.head_banner = proc.stdout

    def start_worker(self, node_ip: str | None = None, wait: bool = True) -> None:
        """A worker node in the worker namespace; ``node_ip`` is the address it claims (its own by default)."""
        env = {**self.env, "GENREC_RAY_TEMP_DIR": self.worker_dir}
        proc = subprocess.run(self.in_ns(self.worker_ns, "bash", os.path.join(REPO, "cluster", "start_ray.sh"),
                                         "worker", self.gcs, "--num-cpus=2",
                                         f"--node-ip-address={node_ip or self.worker_ip}"),
                              env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(f"worker did not start: {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        if wait:
            self.wait_nodes(2)

    def worker_session(self) -> int | None:
        try:
            with open(os.path.join(self.worker_dir, "genrec-ray.pid")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def worker_processes(self, title: str) -> list[int]:
        """PIDs of the worker node's processes whose title starts with ``title`` (e.g. ``ray::FileShard``)."""
        sid = self.worker_session()  # start_ray.sh's setsid: the whole node (workers have groups of their own)
        if sid is None:
            return []
        out = _sh("pgrep", "-s", str(sid), "-f", f"^{title}", check=False).stdout
        return [int(p) for p in out.split()]

    def lose_worker(self) -> None:
        """The worker node dies: every process of it gets SIGKILL at once."""
        sid = self.worker_session()
        if sid is not None:
            _sh("pkill", "-KILL", "-s", str(sid), check=False)  # the whole session: raylet, agents, every worker
            os.remove(os.path.join(self.worker_dir, "genrec-ray.pid"))

    def revive(self) -> None:
        """A worker node again (after :meth:`lose_worker`): the cluster is whole for the next test."""
        if self.worker_session() is None:
            self.start_worker()
        self.wait_nodes(2)

    def alive_nodes(self) -> list[str]:
        """Addresses of the nodes the head says are alive (a driver in the head's namespace)."""
        code = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))" % self.gcs)
        proc = subprocess.run(self.in_ns(self.head_ns, sys.executable, "-c", code), env=self.env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot ask the head for its nodes: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def wait_nodes(self, count: int, timeout: float = 120) -> list[str]:
        deadline = time.time() + timeout
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == count or time.time() > deadline:
                if len(nodes) != count:
                    raise RuntimeError(f"the head sees {len(nodes)} alive nodes ({nodes}), want {count}")
                return nodes
            time.sleep(1)

    # ---- jobs -------------------------------------------------------------------------------------------------
    def submit(self, job_id: str, *command: str, wait: bool = True, timeout: float = 900,
               env_vars: dict | None = None) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo> -- <command>`` from the head's namespace."""
        runtime_env = {"excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
        cmd = [RAY, "job", "submit", "--address", self.address, "--submission-id", job_id, "--working-dir", REPO,
               "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]), "--", *command]
        return subprocess.run(self.in_ns(self.head_ns, *cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def job_status(self, job_id: str) -> str:
        proc = subprocess.run(self.in_ns(self.head_ns, RAY, "job", "status", "--address", self.address, job_id),
                              env=self.env, capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def job_logs(self, job_id: str) -> str:
        proc = subprocess.run(self.in_ns(self.head_ns, RAY, "job", "logs", "--address", self.address, job_id),
                              env=self.env, capture_output=True, text=True, timeout=60)
        return proc.stdout

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        """The job's final status line (succeeded / failed / stopped)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(job_id)
            if any(f"' {word}" in status for word in ("succeeded", "failed", "stopped")):
                return status
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not finish in {timeout:g} s: {self.job_status(job_id)}")

    # ---- the end ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        for d in (self.worker_dir, self.head_dir):
            if os.path.exists(os.path.join(d, "genrec-ray.pid")):
                subprocess.run(["bash", os.path.join(REPO, "cluster", "stop_ray.sh")],
                               env={**self.env, "GENREC_RAY_TEMP_DIR": d}, capture_output=True, timeout=120)
        for ns in (self.worker_ns, self.head_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)  # its veth end goes too
        shutil.rmtree(self.tmp, ignore_errors=True)


def make_cluster() -> TwoNodes:
    """Namespaces, head and worker, the worker seen by the head at its own address; :class:`Unavailable` where
    namespaces cannot be made."""
    if not shutil.which("ip"):
        raise Unavailable("no `ip` command (iproute2) to make network namespaces")
    nodes = TwoNodes()
    nodes.make_namespaces()
    try:
        os.makedirs(nodes.tmp, exist_ok=True)
        nodes.start_head()
        nodes.start_worker()
        seen = nodes.wait_nodes(2)
        if sorted(seen) != sorted([nodes.head_ip, nodes.worker_ip]):
            raise RuntimeError(f"the nodes' addresses are {seen}, want {nodes.head_ip} and {nodes.worker_ip}")
    except BaseException:
        nodes.close()
        raise
    return nodes
