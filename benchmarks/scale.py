"""How time and memory grow with the catalog: every stage of the pipeline on synthetic Beauty-shaped catalogs.

    python -m benchmarks.scale [--scales 1 10 100] [--stages prepare tokenize unger train evaluate minilm]
                               [--work DIR] [--budget-mb 1024] [--train-steps 200] [--eval-users 10000]
                               [--stage1-steps 200]
                               [--train-set KEY=VALUE ...] [--eval-set KEY=VALUE ...]
                               [--out benchmarks/results/scale.json]

Scale ``s`` (any positive number: 0.1 for a quick check) is ``s`` x Beauty's shape from the synthetic generator: 22,000 s users, 12,000 s items, 24 categories
(after the 5-core: about 2.07M interactions at 10x). For each scale, each stage is the real job run as a
subprocess from the repo root:

* ``prepare``: ``jobs/prepare.py`` with ``prepare.memory_budget_mb``;
* ``tokenize``: ``jobs/tokenize.py`` on stored 384-d embeddings from a cheap deterministic embedder (category
  centroid + per-item noise, written here first as ``embeddings/`` shards), 4 x 256 codes, 20 Lloyd steps;
* ``unger``: ``jobs/tokenize.py`` with ``tokenize.method=unger`` on the same stored embeddings: UNGER Stage I (source
  unified, ``--stage1-steps`` DIN + CKA steps, no modality share) in the driver, then the same k-means, into its own
  semantic-ID folder (``sids-unger``; the training stages keep reading the residual k-means codes);
* ``train``: ``jobs/train.py``, ``--train-steps`` steps of CAR and of SASRec (one row each), no validation or
  checkpoints, and the test evaluation that ends the run on ``--eval-users`` users; ``--train-set`` adds
  overrides such as the sampled-softmax switch;
* ``evaluate``: ``jobs/evaluate.py`` on each trained run over the full catalog; ``--eval-set`` adds overrides
  (``evaluate.max_users=<--eval-users>`` is passed when the config has that setting);
* ``minilm``: one row (scale-free): MiniLM's items/s with 2 Ray Data workers on ``--minilm-items`` item texts.

An override the config does not know (a setting not merged yet) is dropped and listed in the row's ``dropped``.
Each row: wall seconds, peak RSS of the job process, of the largest other process, and the peak of the sum over
every process of the stage (sampled every 0.2 s with psutil: the job's process tree plus every process whose
command line names the stage's own Ray temp folder, since Ray workers of a cluster are not its children),
throughput, and the time exponent between consecutive scales, ``log(t_b / t_a) / log(b / a)`` (1 = linear).
A failed stage is a row with ``rc`` and the end of its log; later stages of that scale that need it are skipped.
The table is printed, the JSON written whole, and both logged to MLflow (the config's tracking settings).
"""

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import psutil

from benchmarks._jobs import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAUTY = {"users": 22_000, "items": 12_000, "categories": 24}  # Beauty: 22,363 users, 12,101 items (5-core)
STAGES = ["prepare", "tokenize", "unger", "train", "evaluate", "minilm"]
MODELS = ["car", "sasrec"]
MIB = 1 << 20


class PeakRSS(threading.Thread):
    """Samples the RSS of a process tree and of every process whose command line contains ``marker``."""

    def __init__(self, pid: int, marker: str, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.marker, self.every_s = pid, marker, every_s
        self.peaks: dict[int, tuple[int, str]] = {}  # pid -> (peak bytes, short name)
        self.total_peak = 0
        self._done = threading.Event()

    def _procs(self) -> list[psutil.Process]:
        procs = {}
        try:
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for p in root.children(recursive=True):
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.marker in " ".join(p.info["cmdline"] or []):
                    procs[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(procs.values())

    def sample(self) -> None:
        total = 0
        for p in self._procs():
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:2])[-60:]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            if rss > self.peaks.get(p.pid, (0, ""))[0]:
                self.peaks[p.pid] = (rss, name)
        self.total_peak = max(self.total_peak, total)

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.every_s)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        driver = self.peaks.get(self.pid, (0, ""))[0]
        others = sorted(((rss, name) for pid, (rss, name) in self.peaks.items() if pid != self.pid), reverse=True)
        return {"driver_peak_mib": driver / MIB, "other_peak_mib": others[0][0] / MIB if others else 0.0,
                "other_peak_process": others[0][1] if others else "", "processes": len(self.peaks),
                "total_peak_mib": self.total_peak / MIB}


def measure(cmd: list[str], log_path: str) -> dict:
    """Run ``cmd`` from the repo root with its own Ray temp folder; wall time, memory, exit code."""
    ray_tmp = os.path.join(tempfile.gettempdir(), f"rs{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": REPO}
    print("$", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        mon = PeakRSS(proc.pid, ray_tmp)
        mon.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
    row = {"rc": rc, "seconds": seconds, **mon.stop(), "log": log_path,
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        with open(log_path) as fh:
            row["tail"] = fh.read()[-2000:]
        print(f"  failed ({rc}); log {log_path}:\n{row['tail'][-600:]}", flush=True)
    return row


def accepted(config: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """The overrides ``config`` accepts, and the ones it refuses (settings that do not exist yet)."""
    from genrec_dist.config import ConfigError, load_config

    kept, dropped = [], []
    for o in overrides:
        try:
            load_config(os.path.join(REPO, config), [o])
            kept.append(o)
        except ConfigError:
            dropped.append(o)
    return kept, dropped


def scale_overrides(scale: float, work: str, budget_mb: int) -> list[str]:
    return [f"workdir={work}", f"prepare.synthetic.num_users={round(BEAUTY['users'] * scale)}",
            f"prepare.synthetic.num_items={round(BEAUTY['items'] * scale)}",
            f"prepare.synthetic.num_categories={BEAUTY['categories']}", "prepare.num_shards=8",
            f"prepare.memory_budget_mb={budget_mb}", "prepare.overwrite=true",
            "tokenize.levels=4", "tokenize.codebook_size=256", "tokenize.max_iters=20", "tokenize.overwrite=true",
            f"tokenize.embeddings_path={os.path.join(work, 'stored', 'embeddings')}"]


def store_embeddings(dataset: str, folder: str, dim: int = 384, seed: int = 0, rows: int = 100_000) -> int:
    """Deterministic stand-in embeddings for every item of ``dataset``: its category's centroid plus noise,
    unit norm, written shard by shard (never the whole matrix) in the layout ``tokenize.embeddings_path`` reads."""
    import polars as pl

    from genrec_dist.data.dataset import Dataset
    from tokenization.embedding_store import embedding_shards

    items = Dataset.open(dataset).items(["item_id", "categories"])
    cats = items["categories"].cast(pl.Categorical).to_physical().to_numpy()
    centroids = np.random.default_rng(seed).standard_normal((int(cats.max()) + 1, dim)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    ids = items["item_id"].to_numpy()
    for s, start in enumerate(range(0, len(ids), rows)):
        rng = np.random.default_rng([seed, s])
        v = centroids[cats[start:start + rows]] + 0.6 * rng.standard_normal((len(ids[start:start + rows]), dim),
                                                                             dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        (data,) = embedding_shards(ids[start:start + rows], v, rows_per_shard=rows).values()
        with open(os.path.join(folder, f"part-{s:05d}.parquet"), "wb") as fh:
            fh.write(data)
    return len(ids)


def minilm_child(dataset: str, n: int) -> None:
    """Embed the first ``n`` item texts with MiniLM on 2 Ray Data workers; print items/s as one JSON line."""
    import ray

    from genrec_dist.data.dataset import Dataset
    from tokenization.ray_embed import embed_items

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    items = Dataset.open(dataset).items(["item_id", "text"]).head(n)
    _, _, info = embed_items(items, num_workers=2, batch_size=64)
    ray.shutdown()
    print(json.dumps({"items": items.height, "items_per_s": info["items_per_s"]}))


def run_scale(scale: float, args, rows: list[dict]) -> None:
    work = os.path.join(args.work, f"x{scale:g}")
    os.makedirs(work, exist_ok=True)
    base = ["--config", args.config, *scale_overrides(scale, work, args.budget_mb)]
    py = sys.executable
    dataset = os.path.join(work, "dataset")
    counts: dict = {}
    ok = {}

    def add(stage: str, row: dict, units: float, unit: str, **extra) -> bool:
        row = {"scale": scale, "stage": stage, **extra, **row}
        if row["rc"] == 0 and units:
            row["throughput"], row["unit"] = units / row["seconds"], unit
        rows.append(row)
        return row["rc"] == 0

    if "prepare" in args.stages:
        row = measure([py, "jobs/prepare.py", *base], os.path.join(work, "prepare.log"))
        if row["rc"] == 0:
            counts = json.load(open(os.path.join(dataset, "manifest.json")))["counts"]
        ok["prepare"] = add("prepare", row, counts.get("interactions", 0), "interactions/s", **counts)
    have_data = os.path.exists(os.path.join(dataset, "manifest.json"))
    if not counts and have_data:
        counts = json.load(open(os.path.join(dataset, "manifest.json")))["counts"]
    if "tokenize" in args.stages and have_data:
        t0 = time.perf_counter()
        n = store_embeddings(dataset, os.path.join(work, "stored", "embeddings"))
        print(f"  stored embeddings for {n:,} items in {time.perf_counter() - t0:.1f}s", flush=True)
        row = measure([py, "jobs/tokenize.py", *base], os.path.join(work, "tokenize.log"))
        ok["tokenize"] = add("tokenize", row, counts.get("items", 0), "items/s", items=counts.get("items"))
    if "unger" in args.stages and have_data:
        if not os.path.isdir(os.path.join(work, "stored", "embeddings")):
            store_embeddings(dataset, os.path.join(work, "stored", "embeddings"))
        over = ["tokenize.method=unger", "tokenize.unger.source=unified", "tokenize.unger.modality_share=false",
                f"tokenize.unger.steps={args.stage1_steps}",
                f"tokenize.unger.log_every={max(1, args.stage1_steps // 4)}",
                f"paths.semantic_ids={os.path.join(work, 'sids-unger')}"]
        row = measure([py, "jobs/tokenize.py", *base, *over], os.path.join(work, "unger.log"))
        add("unger", row, counts.get("items", 0), "items/s", steps=args.stage1_steps, items=counts.get("items"))
    def skipped(stage: str, why: str) -> None:
        print(f"  skip {stage}: {why}", flush=True)
        rows.append({"scale": scale, "stage": stage, "rc": None, "skipped": why})

    for model in MODELS:
        run_name = f"scale-{model}-x{scale:g}"
        trained = True
        if "train" in args.stages and have_data and model != "sasrec" and ok.get("tokenize") is False:
            skipped(f"train-{model}", "tokenize failed (no semantic IDs)")
            trained = False
        elif "train" in args.stages and have_data:
            over = [f"train.model={model}", f"train.max_steps={args.train_steps}", "train.eval_every=0",
                    "train.checkpoint_every=0", "train.patience=0", f"train.run_name={run_name}",
                    f"train.warmup_steps={min(100, args.train_steps)}",
                    # the test evaluation that ends every training run: the same users as the evaluate stage, not
                    # all 2.2M users of 100x (CAR also ranks the validation split for its slow-weight choice)
                    f"evaluate.max_users={args.eval_users}", *args.train_set]
            kept, dropped = accepted(args.config, over)
            row = measure([py, "jobs/train.py", *base, *kept], os.path.join(work, f"train-{model}.log"))
            batch = int(next((o.split("=", 1)[1] for o in kept if o.startswith("train.batch_size=")), 128))
            trained = add(f"train-{model}", row, args.train_steps * batch, "examples/s", steps=args.train_steps,
                          dropped=dropped)
        if "evaluate" in args.stages and have_data and not trained:
            skipped(f"evaluate-{model}", "its training run failed or was skipped")
        elif "evaluate" in args.stages and have_data:
            over = [f"evaluate.max_users={args.eval_users}", *args.eval_set]
            kept, dropped = accepted(args.config, over)
            users = args.eval_users if any(o.startswith("evaluate.max_users=") for o in kept) else counts.get("users")
            row = measure([py, "jobs/evaluate.py", *base, *kept, "--run", run_name],
                          os.path.join(work, f"evaluate-{model}.log"))
            add(f"evaluate-{model}", row, users or 0, "users/s", users=users, dropped=dropped)
    if "minilm" in args.stages and have_data and not any(r["stage"] == "minilm" for r in rows):
        log = os.path.join(work, "minilm.log")
        row = measure([py, "-m", "benchmarks.scale", "--minilm-child", dataset, "--minilm-items",
                       str(args.minilm_items)], log)
        if row["rc"] == 0:
            info = json.loads(open(log).read().strip().splitlines()[-1])
            row["seconds_embed"] = info["items"] / info["items_per_s"]
            rows.append({"scale": None, "stage": "minilm", **row, "items": info["items"],
                         "throughput": info["items_per_s"], "unit": "items/s"})
        else:
            rows.append({"scale": None, "stage": "minilm", **row})


def merged(path: str, rows: list[dict]) -> list[dict]:
    """``rows`` plus the rows of the JSON at ``path`` whose (scale, stage) this run did not measure, in scale and
    stage order (a row from before rows carried ``measured`` keeps that unknown)."""
    if not os.path.exists(path):
        return rows
    new = {(r["scale"], r["stage"]) for r in rows}
    old = [r for r in json.load(open(path))["rows"] if (r["scale"], r["stage"]) not in new]
    order = {s: i for i, s in enumerate(["prepare", "tokenize", "unger", *(f"{st}-{m}" for m in MODELS
                                                                   for st in ("train", "evaluate")), "minilm"])}
    return sorted(old + rows, key=lambda r: (r["scale"] is None, r["scale"] or 0, order.get(r["stage"], 99)))


def exponents(rows: list[dict]) -> list[dict]:
    """Time exponent between consecutive scales of each stage: log(t_b / t_a) / log(b / a)."""
    out = []
    by_stage: dict[str, dict[float, float]] = {}
    for r in rows:
        if r["scale"] is not None and r["rc"] == 0:
            by_stage.setdefault(r["stage"], {})[r["scale"]] = r["seconds"]
    for stage, t in by_stage.items():
        scales = sorted(t)
        for a, b in zip(scales, scales[1:]):
            out.append({"stage": stage, "from": a, "to": b,
                        "time_exponent": math.log(t[b] / t[a]) / math.log(b / a)})
    return out


def table(rows: list[dict], growth: list[dict]) -> str:
    head = f"{'scale':>6} {'stage':<16}{'seconds':>9}{'job RSS':>10}{'max other':>11}{'all procs':>11}" \
           f"{'procs':>6}  throughput"
    lines = [head]
    for r in rows:
        if r["rc"] is None:
            lines.append(f"{format(r['scale'], 'g'):>6} {r['stage']:<16}  skipped: {r['skipped']}")
            continue
        thr = f"{r['throughput']:,.0f} {r['unit']}" if "throughput" in r else ("" if r["rc"] == 0 else
                                                                              f"FAILED rc={r['rc']}")
        lines.append(f"{format(r['scale'], 'g') if r['scale'] is not None else '-':>6} {r['stage']:<16}{r['seconds']:>9.1f}"
                     f"{r['driver_peak_mib']:>7.0f}MiB{r['other_peak_mib']:>8.0f}MiB{r['total_peak_mib']:>8.0f}MiB"
                     f"{r['processes']:>6}  {thr}")
    for g in growth:
        lines.append(f"time exponent {g['stage']} {g['from']:g}x -> {g['to']:g}x: {g['time_exponent']:.2f}")
    return "\n".join(lines)


def log_mlflow(args, result: dict, text: str) -> None:
    """The table and JSON as one MLflow run of the config's tracking store (a down server is only a warning)."""
    from genrec_dist.config import load_config
    from genrec_dist.tracking import TrackingError, make_tracker

    # Without --work the stages ran in a temporary folder: log to a store that outlives it.
    workdir = args.work if args.keep_work else os.path.join(REPO, "outputs", "bench-scale")
    cfg = load_config(os.path.join(REPO, args.config), [f"workdir={workdir}"])
    try:
        tracker = make_tracker(cfg, "scale-benchmark", run_name="scale-benchmark")
        metrics = {}
        for r in result["rows"]:
            key = f"x{r['scale']:g}.{r['stage']}" if r["scale"] is not None else r["stage"]
            for m in ("seconds", "driver_peak_mib", "other_peak_mib", "total_peak_mib", "throughput"):
                if m in r:
                    metrics[f"{key}.{m}"] = float(r[m])
        for g in result["growth"]:
            metrics[f"{g['stage']}.exponent_{g['from']:g}_{g['to']:g}"] = g["time_exponent"]
        tracker.log(metrics)
        tracker.log_text(text + "\n", "scale.txt")
        tracker.log_text(json.dumps(result, indent=2), "scale.json")
        tracker.close()
    except TrackingError as exc:
        print(f"warning: not logged to MLflow: {str(exc).splitlines()[0]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 10, 100])
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--config", default="configs/synthetic.yaml")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one, removed after)")
    ap.add_argument("--budget-mb", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--eval-users", type=int, default=10_000)
    ap.add_argument("--stage1-steps", type=int, default=200, help="UNGER Stage I steps of the unger stage")
    ap.add_argument("--minilm-items", type=int, default=2000)
    ap.add_argument("--train-set", nargs="*", default=[], help="extra train overrides, e.g. a sampled-softmax switch")
    ap.add_argument("--eval-set", nargs="*", default=[])
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scale.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out this run does not remeasure (other scales or stages), e.g. after "
                         "a change to training only; each row says when it was measured")
    ap.add_argument("--minilm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.minilm_child:
        return minilm_child(args.minilm_child, args.minilm_items)
    keep = args.keep_work = args.work is not None
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    rows: list[dict] = []
    try:
        for scale in sorted(args.scales):
            run_scale(scale, args, rows)
        for r in rows:  # logs named relative to --work: no machine's absolute path in the shared JSON
            if "log" in r:
                r["log"] = os.path.relpath(r["log"], args.work)
        if args.merge:
            rows = merged(args.out, rows)
        growth = exponents(rows)
        text = table(rows, growth)
        print(text, flush=True)
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "memory_gib": psutil.virtual_memory().total / (1 << 30),
                              "load_avg_1m_at_end": os.getloadavg()[0]},
                  "args": {k: v for k, v in vars(args).items() if k not in ("work", "minilm_child", "out", "keep_work")},
                  "rows": rows, "growth": growth}
        write_result(args.out, result)
        log_mlflow(args, result, text)
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
