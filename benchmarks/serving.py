"""Online serving latency: ``mlflow models serve`` against ``jobs/serve.py`` (Ray Serve, 1 and 2 replicas), p50/p99
latency and users/s of single-user requests at 1, 8 and 64 concurrent clients, per model.

    python -m benchmarks.serving [--models sasrec,car,tiger] [--requests 1000] [--time-cap 30]
                                 [--concurrency 1,8,64] [--replicas 1,2] [--runs car=<run dir>,...] [--machine-busy]
                                 [--out benchmarks/results/serving.json] [key=value ...]

Models (``--models``): SASRec, CAR fast and TIGER **at Beauty size** (12,101 items; ``configs/beauty.yaml``'s
``model.*`` and ``tokenize.levels`` x ``tokenize.codebook_size``), **untrained** exports with random semantic IDs, as
``benchmarks/inference.py`` measures speed: neither a forward pass nor a trie-constrained beam costs more or less for
trained weights. ``--runs name=<run dir | name | MLflow id>`` serves trained runs instead (each with its registered
MLflow model saved from the export).

Each server runs as its own process tree on 127.0.0.1 (``mlflow models serve -m <model folder> --env-manager local``
with its default worker; ``python jobs/serve.py --run <run dir>`` on a fresh local Ray, one CPU per replica, behind
Ray Serve's HAProxy ingress and behind its Python proxy, ``--ingress``); the load
generator is this process: ``c`` keep-alive HTTP connections, each sending one request after another, every request
one user (a history of 3..20 random item ids, the same seeded list for every server) with ``k=10``. A level stops
after ``--requests`` requests or ``--time-cap`` seconds, whichever comes first (``capped`` in the row), after a
short untimed warm-up. Latency is from the request's first byte sent to the response's last byte read; users/s is
the answered requests over the level's wall time. Before the load, the same 8 histories go to every server of a model
and the answers are compared with the first server's (``same_items``).

The JSON (``benchmarks/results/serving.json``) holds one row per (model, server, replicas, concurrency):
``server`` is ``mlflow`` or ``ray``, with ``p50_ms``, ``p99_ms``, ``users_per_s``; per model, ``vs_mlflow`` is the
best Ray Serve users/s at concurrency 64 over ``mlflow models serve``'s. ``machine_busy`` and the load averages say
what else ran: numbers taken beside other work are for checking, not for quoting.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from benchmarks._jobs import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAUTY_ITEMS = 12_101  # Amazon 2014 Beauty, 5-core (docs/datasets.md)
NAMES = {"sasrec": "SASRec", "car": "CAR fast", "tiger": "TIGER"}
HOST = "127.0.0.1"


def beauty_size_runs(root: str, models: list[str], overrides: list[str]) -> dict[str, str]:
    """Untrained exports at Beauty size, one run dir per model (``model/`` + ``run.json``) under ``root``."""
    import torch

    from benchmarks.inference import random_sids
    from genrec_dist.config import load_config
    from genrec_dist.data.semantic_ids import write_semantic_ids
    from genrec_dist.models import build_model
    from genrec_dist.runs.export import model_meta, semantic_id_files, write_model

    cfg = load_config(os.path.join(REPO, "configs", "beauty.yaml"), overrides)
    cfg.model.car.inference = "fast"
    car_sids, tiger_sids = random_sids(BEAUTY_ITEMS, cfg.tokenize.levels, cfg.tokenize.codebook_size, cfg.seed)
    out = {}
    for name in models:
        sids = {"car": car_sids, "tiger": tiger_sids}.get(name)
        sids_dir = None
        if sids is not None:
            sids_dir = os.path.join(root, f"sids-{name}")
            write_semantic_ids(sids_dir, np.arange(1, BEAUTY_ITEMS + 1), sids.codes[1:], sids.codebook_sizes,
                               sids.manifest)
        torch.manual_seed(cfg.seed)
        model = build_model(name, cfg.model, BEAUTY_ITEMS, sids)
        run_dir = os.path.join(root, f"{name}-beauty-size")
        write_model(os.path.join(run_dir, "model"), model.state_dict(),
                    model_meta(name, cfg.model, BEAUTY_ITEMS, sids_dir, 0, {}),
                    sids_files=semantic_id_files(sids_dir) if sids_dir else None)
        with open(os.path.join(run_dir, "run.json"), "w") as fh:
            json.dump({"run_name": f"{name}-beauty-size", "model": name}, fh)
        out[name] = run_dir
    return out


def mlflow_model(run_dir: str, dst: str) -> str:
    """The run's export saved as an MLflow pyfunc folder (what training logs and registers)."""
    from genrec_dist import serving

    return serving.save_model(os.path.join(run_dir, "model"), dst, [[1, 2, 3]])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server process group on 127.0.0.1, up once ``ready_path`` answers 200; stopped with SIGINT, then SIGKILL."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, log_path: str, env: dict | None = None):
        self.port, self.ready, self.log_path = port, ready_path, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 300) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); its log {self.log_path}:\n"
                                 + open(self.log_path).read()[-3000:])
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}{self.ready}", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server not ready in {timeout:.0f} s; its log {self.log_path}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


async def _request(reader, writer, body: bytes) -> tuple[int, bytes]:
    writer.write(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    line = (await reader.readline()).split()
    if len(line) < 2:
        raise ConnectionResetError("the server closed the connection")
    status = int(line[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    data = b""
    while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
        data += await reader.readexactly(size + 2)
    await reader.readline()
    return status, data


async def _load(port: int, bodies: list[bytes], concurrency: int, total: int, cap_s: float) -> dict:
    """``total`` requests (or ``cap_s`` seconds) over ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    errors: dict[int, int] = {}  # status -> count; 599: the server closed the connection
    issued = 0
    deadline = time.perf_counter() + cap_s

    async def client() -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while issued < total and time.perf_counter() < deadline:
                i = issued
                issued += 1
                t = time.perf_counter()
                try:
                    status, _ = await _request(reader, writer, bodies[i % len(bodies)])
                except (ConnectionError, asyncio.IncompleteReadError):  # a closed keep-alive connection: a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    status = 599
                if status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[status] = errors.get(status, 0) + 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = np.sort(np.asarray(latencies)) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": sum(errors.values()),
            "error_statuses": {str(k): v for k, v in sorted(errors.items())}, "capped": issued < total,
            "seconds": round(wall, 2), "users_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


def _answers(port: int, histories: list[list[int]]) -> list[list[int]]:
    out = []
    for h in histories:
        req = urllib.request.Request(f"http://{HOST}:{port}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"dataframe_records": [{"history": h}],
                                                      "params": {"k": 10}}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            out.append(json.loads(resp.read())["predictions"][0]["items"])
    return out


def measure(server: Server, bodies: list[bytes], check: list[list[int]], levels: list[int], total: int,
            cap_s: float) -> tuple[list[dict], list[list[int]]]:
    answers = _answers(server.port, check)
    asyncio.run(_load(server.port, bodies, max(levels), min(200, total), 10.0))  # warm-up, untimed
    rows = []
    for c in levels:
        row = asyncio.run(_load(server.port, bodies, c, total, cap_s))
        print(f"    c={c:3d}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['users_per_s']} users/s "
              f"({row['requests']} answered, {row['errors']} errors{', capped' if row['capped'] else ''})",
              flush=True)
        rows.append(row)
    return rows, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--models", default="sasrec,car,tiger")
    ap.add_argument("--runs", default="", help="name=<run dir | run name | MLflow run id>,... (trained runs instead "
                                                "of Beauty-size untrained exports)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per level")
    ap.add_argument("--time-cap", type=float, default=30.0, help="seconds per level at most")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--servers", default="mlflow,ray")
    ap.add_argument("--ingress", default="haproxy,proxy", help="jobs/serve.py's ingress: haproxy (serve.haproxy=true) "
                                                               "and/or proxy (Ray Serve's Python proxy)")
    ap.add_argument("--ray-overrides", default="", help="more jobs/serve.py overrides, comma-separated")
    ap.add_argument("--machine-busy", action="store_true", help="say in the JSON that other work ran beside it")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "serving.json"))
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (configs/beauty.yaml's model.*)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    bin_dir = os.path.dirname(sys.executable)
    env = {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="genrec-serving-bench-") as tmp:
        if args.runs:
            from genrec_dist.config import load_config
            from genrec_dist.runs.find import find_run_dir

            cfg = load_config(None, args.overrides)
            runs = {k: find_run_dir(cfg, v) for k, v in (p.split("=", 1) for p in args.runs.split(","))}
            source = "trained runs: " + ", ".join(f"{k}={os.path.basename(v)}" for k, v in runs.items())
        else:
            runs = beauty_size_runs(tmp, args.models.split(","), args.overrides)
            source = f"untrained exports at Beauty size ({BEAUTY_ITEMS} items), configs/beauty.yaml model.*"
        for name, run_dir in runs.items():
            from genrec_dist.runs.export import read_meta

            meta = read_meta(os.path.join(run_dir, "model"))
            n = int(meta["num_items"])
            label = NAMES.get(name, name)
            histories = [rng.integers(1, n + 1, size=int(rng.integers(3, 21))).tolist() for _ in range(512)]
            bodies = [json.dumps({"dataframe_records": [{"user": f"u{i}", "history": h}], "params": {"k": 10}}).encode()
                      for i, h in enumerate(histories)]
            model_rows, first = [], None
            targets = ([("mlflow", None, None)] if "mlflow" in servers else []) + \
                      ([("ray", int(r), ing) for ing in args.ingress.split(",") for r in args.replicas.split(",")]
                       if "ray" in servers else [])
            for kind, replicas, ingress in targets:
                port = _free_port()
                if kind == "mlflow":
                    folder = mlflow_model(run_dir, os.path.join(tmp, f"mlflow-{name}"))
                    cmd = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", folder, "--env-manager", "local",
                           "-h", HOST, "-p", str(port)]
                    server = Server(cmd, port, "/ping", os.path.join(tmp, f"{name}-mlflow.log"), env)
                else:
                    cmd = [sys.executable, os.path.join(REPO, "jobs", "serve.py"), "--run", run_dir,
                           f"workdir={tmp}", f"serve.port={port}", f"serve.num_replicas={replicas}",
                           "serve.cpus_per_replica=1", "tracking.enabled=false", f"serve.haproxy={ingress == 'haproxy'}",
                           *[o for o in args.ray_overrides.split(",") if o]]
                    server = Server(cmd, port, "/ready", os.path.join(tmp, f"{name}-ray{replicas}-{ingress}.log"), env)
                try:
                    up = server.wait()
                    print(f"{label} on {kind}{f' ({replicas} replicas, {ingress})' if replicas else ''}: up in {up:.0f} s",
                          flush=True)
                    measured, answers = measure(server, bodies, histories[:8], levels, args.requests, args.time_cap)
                finally:
                    server.stop()
                first = first or answers
                for row in measured:
                    model_rows.append({"model": label, "server": kind, "replicas": replicas, "ingress": ingress, **row,
                                       "startup_s": round(up, 1), "same_items": answers == first})
            rows += model_rows
            top = max(levels)
            at = {(r["server"], r["replicas"], r["ingress"]): r["users_per_s"] for r in model_rows
                  if r["concurrency"] == top}
            base = at.get(("mlflow", None, None))
            ray = {f"replicas={k[1]},{k[2]}": v for k, v in at.items() if k[0] == "ray"}
            summary[label] = {"num_items": n, "mlflow_users_per_s": base, "ray_users_per_s": ray,
                              "vs_mlflow": round(max(ray.values()) / base, 2) if base and ray else None}
    table = ["| model | server | replicas | ingress | concurrency | p50 ms | p99 ms | users/s |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['server']} | {r['replicas'] or ''} | {r['ingress'] or ''} | {r['concurrency']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['users_per_s']} |" for r in rows]
    table += ["", "| model | vs_mlflow (users/s at concurrency 64) |", "|---|---|"]
    table += [f"| {k} | {v['vs_mlflow']} |" for k, v in summary.items()]
    print("\n" + "\n".join(table))
    write_result(args.out, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_busy": args.machine_busy,
        **({"note": "taken beside other work (see the load averages): checks that the script works; to be measured "
                    "again on a quiet machine"} if args.machine_busy else {}),
        "env": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "load_average_1m_before": round(load_before[0], 2),
                "load_average_1m_after": round(os.getloadavg()[0], 2)},
        "models_source": source,
        "ingress": {"haproxy": "Ray Serve's HAProxy ingress (serve.haproxy=true)",
                    "proxy": "Ray Serve's Python proxy actor (serve.haproxy=false, the default)"}, "requests_per_level": args.requests, "time_cap_s": args.time_cap,
        "rows": rows, "models": summary, "table": "\n".join(table)})


if __name__ == "__main__":
    main()
