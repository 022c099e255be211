"""Training throughput: our trainer against a bare torch loop, the HF T5 peer (TIGER) and two ranks, on Beauty.

    python -m benchmarks.throughput [--config configs/beauty.yaml] [--workdir DIR] [--models sasrec,car,tiger,unger]
        [--sizes cpu,paper] [--rows bare,zero0,zero2,zero0x2,zero2x2,peer,peer_same] [--steps 15] [--warmup 3]
        [--cap-s 25]
        [--out benchmarks/results/throughput.json]

Every row of a model trains on the same batches: the first steps of the trainer's own data path (the prepared
dataset's examples, streamed and shuffled by ``genrec_dist.data.examples`` with the run's seed), one fresh process
per row and per rank, one torch thread per process (``--threads``):

- ``bare``: the model and the trainer's Adam (``torch.optim``, fused), the same gradient clipping as the config's,
  the step's batches already in memory: what any training loop has to pay;
- ``zero0`` / ``zero2``: our trainer at one rank: its data path (``examples.iterate``) and its step
  (``trainer._train_step``) on a ``deepspeed.initialize`` engine with that ZeRO stage (gloo);
- ``zero0x2`` / ``zero2x2``: the same at two ranks (two processes on gloo, each half of the global batch from its own
  shards, as training reads them by default; the first rank's parts are reported);
- ``peer`` (TIGER): the peer's loop (XiaoLongtaoo/TIGER, ``model/main.py``): ``T5ForConditionalGeneration`` at the same
  sizes (T5Config num_layers / num_decoder_layers / d_model / d_ff / num_heads / d_kv, relu, the same dropout),
  histories padded to its fixed 20 items of 4 codes (``model/dataset.py: pad_or_truncate``), one vocabulary of
  every code, CE over it, torch Adam; ``peer_same`` feeds it our step's batches instead (padding as ours).

Each row reports samples/s and ms per step split into data (reading the step's batch), forward, backward and
optimizer/engine (``engine.step`` or ``opt.step``), after ``--warmup`` untimed steps; a row stops after ``--steps``
steps or ``--cap-s`` seconds, whichever comes first. Achieved GFLOP/s (forward + backward FLOPs of the model on
the first batch, ``torch.utils.flop_counter``) is set against this core's measured fp32 matmul rate.

Ratios: ``vs_bare`` (each trainer row's samples/s over the bare loop's), ``vs_peer`` (TIGER's ``zero0`` over the
peer's), ``scaling`` (two ranks over one at the same global batch and stage). Take the numbers on a quiet machine:
the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("data", "forward", "backward", "optimizer")


# ----------------------------------------------------------------------------------------------------------------
# one row, one process (or one rank of a two-rank row)
# ----------------------------------------------------------------------------------------------------------------

def row_config(config: str, workdir: str, model: str, size: str, extra: list[str]) -> Any:
    """The run config a leaderboard row of ``model`` at ``size`` trains with (``benchmarks.leaderboard``'s
    overrides)."""
    from benchmarks.leaderboard import CPU_SIZES, PAPER_TRAIN, model_config
    from genrec_dist.config import load_config, with_resolved_paths

    overrides = [f"workdir={workdir}", f"train.model={model}", *PAPER_TRAIN.get(model, []),
                 *(CPU_SIZES[model] if size == "cpu" else []), "tracking.enabled=false", *extra]
    return with_resolved_paths(load_config(os.path.join(REPO, model_config(config, model)), overrides))


class _Timed:
    """An engine whose calls the trainer's step makes (``engine(...)``, ``backward``, ``step``) are timed: the
    trainer's own ``_train_step`` runs on it unchanged."""

    def __init__(self, engine: Any):
        self._engine, self.seconds = engine, dict.fromkeys(PARTS[1:], 0.0)

    def _timed(self, part: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[part] += time.perf_counter() - t0
        return out

    def __call__(self, *args):
        return self._timed("forward", self._engine, *args)

    def backward(self, loss):
        return self._timed("backward", self._engine.backward, loss)

    def step(self):
        return self._timed("optimizer", self._engine.step)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _flops(model: Any, history: Any, target: Any) -> float:
    """Forward + backward FLOPs of one training step on this batch (matmuls and attention, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(history, target)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(spec: dict) -> dict:
    """One row (one rank of it): ``spec`` = model, size, row, steps, warmup, cap_s, config, workdir, overrides."""
    import torch

    torch.set_num_threads(spec["threads"])
    import deepspeed

    from genrec_dist.config import model_history
    from genrec_dist.data import examples
    from genrec_dist.data.dataset import Dataset
    from genrec_dist.models import build_model, needs_semantic_ids
    from genrec_dist.training import trainer
    from genrec_dist.training.dist import init_process_group, world_from_env
    from genrec_dist.training.ds_config import client_optimizer, deepspeed_config

    row, model_name = spec["row"], spec["model"]
    stage = int(row[4]) if row.startswith("zero") else 0  # zero<stage>[x<ranks>]
    codes = [f"paths.semantic_ids={spec['unger_codes']}"] if model_name == "unger" and spec.get("unger_codes") else []
    cfg = row_config(spec["config"], spec["workdir"], model_name, spec["size"],
                     [f"train.zero_stage={stage}", *codes, *spec["overrides"]])
    tc = cfg.train
    world = world_from_env()
    init_process_group(False)
    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
    H = model_history(model_name, getattr(cfg.model, model_name).max_history, dataset)
    data = trainer._Data.plan(cfg, dataset, H, world.rank, world.world_size)
    sids = None
    if needs_semantic_ids(model_name):
        from genrec_dist.data.semantic_ids import read_semantic_ids

        sids = read_semantic_ids(cfg.semantic_ids_dir, cfg.storage)
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, cfg.model, dataset.num_items, sids)
    n_params = sum(p.numel() for p in model.parameters())
    batches = examples.iterate(data.train, data.batch_plan, examples.Cursor(), data.spe)
    total = spec["warmup"] + spec["steps"]
    seconds = dict.fromkeys(PARTS, 0.0)
    out: dict[str, Any] = {"model": model_name, "size": spec["size"], "row": row, "ranks": world.world_size,
                           "zero_stage": stage if row.startswith("zero") else None, "batch_size": tc.batch_size,
                           "micro_batch": data.micro_batch, "examples": data.kind, "parameters": n_params,
                           "threads": torch.get_num_threads()}
    if row.startswith("peer"):
        model = _peer(model, cfg.model.tiger, H, pad_full=row == "peer")
        out["parameters"] = sum(p.numel() for p in model.parameters())

    steps, t_start = 0, None
    if row == "bare" or row.startswith("peer"):
        pending = [next(batches)[1] for _ in range(total)]  # in memory before the clock starts
        pending = [[(torch.from_numpy(m.history), torch.from_numpy(m.target)) for m in micro] for micro in pending]
        opt = client_optimizer(tc, model.parameters(), False)
        model.train()
        for i, micro in enumerate(pending):
            if i == spec["warmup"]:
                seconds, t_start = dict.fromkeys(PARTS, 0.0), time.perf_counter()
            for history, target in micro:
                t0 = time.perf_counter()
                loss = model(history, target)["loss"] / len(micro)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                seconds["forward"] += t1 - t0
                seconds["backward"] += t2 - t1
            t2 = time.perf_counter()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds["optimizer"] += time.perf_counter() - t2
            if i >= spec["warmup"]:
                steps += 1
                if time.perf_counter() - t_start > spec["cap_s"]:
                    break
        first = pending[0][0]
    else:
        ds_cfg = deepspeed_config(tc, world.world_size, False, data.total_steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_optimizer(tc, model.parameters(), False),
                                               model_parameters=model.parameters(), config=ds_cfg)
        timed = _Timed(engine)
        engine.train()
        first = None
        for i in range(total):
            if i == spec["warmup"]:
                timed.seconds = dict.fromkeys(PARTS[1:], 0.0)
                seconds, t_start = dict.fromkeys(PARTS, 0.0), time.perf_counter()
            t0 = time.perf_counter()
            _, micro = next(batches)
            seconds["data"] += time.perf_counter() - t0
            first = first or (torch.from_numpy(micro[0].history), torch.from_numpy(micro[0].target))
            trainer._train_step(timed, micro, torch.device("cpu"))
            if i >= spec["warmup"]:
                steps += 1
                # every rank stops at the same step: rank 0's clock decides
                stop = torch.tensor([float(time.perf_counter() - t_start > spec["cap_s"])])
                torch.distributed.broadcast(stop, src=0)
                if stop.item():
                    break
        seconds.update(timed.seconds)
        model = engine.module
    wall = time.perf_counter() - t_start
    out["steps"] = steps
    out["seconds"] = round(wall, 3)
    out["samples_per_s"] = round(tc.batch_size * steps / wall, 2)
    out["ms_per_step"] = {p: round(1000 * seconds[p] / steps, 2) for p in PARTS}
    out["ms_per_step"]["total"] = round(1000 * wall / steps, 2)
    if world.rank == 0:
        flops = _flops(model, *first) * (tc.batch_size / world.world_size) / len(first[1])
        out["gflop_per_step"] = round(flops * world.world_size / 1e9, 3)
        out["gflop_per_s"] = round(out["gflop_per_step"] * steps / wall, 2)
    out["history_width"] = int(first[0].shape[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # left to exit, gloo's threads once ended a rank with std::terminate
    return out


def _peer(ours: Any, tcfg: Any, max_items: int, pad_full: bool) -> Any:
    """The peer's model (XiaoLongtaoo/TIGER ``model/main.py``: ``T5ForConditionalGeneration``) at our TIGER's sizes,
    over our TIGER's token table (0 padding, one id per level's code), reading our batches."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(
        num_layers=tcfg.encoder_layers, num_decoder_layers=tcfg.decoder_layers, d_model=tcfg.d_model,
        d_ff=tcfg.d_ff, num_heads=tcfg.n_heads, d_kv=tcfg.head_dim, dropout_rate=tcfg.dropout,
        vocab_size=ours.bos, pad_token_id=0, eos_token_id=0, decoder_start_token_id=0, feed_forward_proj="relu"))
    item_tokens = ours.item_tokens

    class Peer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t5 = t5

        def forward(self, history, target):
            if pad_full and history.shape[1] < max_items:  # the peer pads every history to its 20 items
                history = torch.nn.functional.pad(history, (max_items - history.shape[1], 0))
            ids = item_tokens[history[:, -max_items:]].flatten(1)
            return {"loss": self.t5(input_ids=ids, attention_mask=(ids != 0).long(),
                                    labels=item_tokens[target]).loss}

    return Peer()


def _row_main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    result = measure(spec)
    if result.get("gflop_per_step") is not None or os.environ.get("RANK", "0") == "0":
        with open(out_path, "w") as fh:
            json.dump(result, fh)


# ----------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------

def run_row(spec: dict, ranks: int, timeout_s: float) -> dict:
    """``spec`` in fresh processes (``ranks`` of them on gloo, each with its launcher variables); rank 0's result."""
    from tests._util import free_port

    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        port = str(free_port())
        procs = []
        for rank in range(ranks):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": str(spec["threads"]),
                   "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.throughput", "--row-spec", spec_path,
                                           "--row-out", out_path], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
        if any(p.returncode for p in procs) or not os.path.exists(out_path):
            raise RuntimeError(f"row {spec['model']}/{spec['size']}/{spec['row']} failed:\n"
                               + "\n".join(f"rank {r}: {log[-3000:]}" for r, log in enumerate(logs)))
        with open(out_path) as fh:
            return json.load(fh)


def matmul_gflops(threads: int = 1, n: int = 1024, reps: int = 20) -> float:
    """This core's fp32 matmul rate (``threads`` threads, n x n x n)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def table(rows: list[dict], peak: float) -> str:
    lines = ["| model | size | row | ranks | samples/s | ms/step | data | fwd | bwd | opt/engine | GFLOP/s | "
             "% of matmul peak | vs bare |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms_per_step"]
        gf = r.get("gflop_per_s")
        share = "" if gf is None else f"{100 * gf / (peak * r['ranks']):.0f}"
        lines.append(f"| {r['model']} | {r['size']} | {r['row']} | {r['ranks']} | {r['samples_per_s']:.1f} | "
                     f"{ms['total']:.1f} | {ms['data']:.1f} | {ms['forward']:.1f} | {ms['backward']:.1f} | "
                     f"{ms['optimizer']:.1f} | {gf if gf is not None else ''} | "
                     f"{share} | "
                     f"{r.get('vs_bare', '')} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per model and size: ``vs_bare`` of every trainer row, TIGER's ``vs_peer``, the two-rank ``scaling``; also set
    on the rows themselves."""
    out: dict[str, dict[str, float]] = {}
    by = {(r["model"], r["size"], r["row"]): r for r in rows}
    for (model, size, row), r in by.items():
        bare = by.get((model, size, "bare"))
        key = f"{model}/{size}"
        if row.startswith("zero") and bare:
            r["vs_bare"] = round(r["samples_per_s"] / bare["samples_per_s"], 3)
            out.setdefault(key, {})[f"{row}_vs_bare"] = r["vs_bare"]
        if row.startswith("peer") and (model, size, "zero0") in by:
            ours = by[(model, size, "zero0")]["samples_per_s"]
            out.setdefault(key, {})["vs_" + row] = round(ours / r["samples_per_s"], 3)
        one = (model, size, row.split("x")[0])  # zero<s>x2 over zero<s>
        if "x" in row and one in by:
            r["scaling"] = round(r["samples_per_s"] / by[one]["samples_per_s"], 3)
            out.setdefault(key, {})[f"scaling_{row}"] = r["scaling"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--workdir", default=None, help="the prepared and tokenized dataset's workdir (default: the "
                        "config's)")
    parser.add_argument("--models", default="sasrec,car,tiger,unger")
    parser.add_argument("--sizes", default="cpu,paper")
    parser.add_argument("--rows", default="bare,zero0,zero2,zero0x2,zero2x2,peer,peer_same")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cap-s", type=float, default=25.0, help="timed seconds per row at most")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (per rank)")
    parser.add_argument("--unger-codes", default="", help="UNGER's Stage I codes (tokenize.method=unger; its speed "
                        "depends on their shape, not on how long Stage I trained); default: the config's")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "throughput.json"))
    parser.add_argument("--row-spec", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every row")
    args = parser.parse_args()
    if args.row_spec:
        return _row_main(args.row_spec, args.row_out)

    from benchmarks._jobs import write_result
    from genrec_dist.config import load_config

    workdir = args.workdir or load_config(os.path.join(REPO, args.config)).workdir
    workdir = os.path.abspath(workdir)
    load_before = os.getloadavg()[0]
    peak = matmul_gflops(args.threads)
    print(f"fp32 matmul, {args.threads} thread(s): {peak:.1f} GFLOP/s", flush=True)
    rows = []
    for size in args.sizes.split(","):
        for model in args.models.split(","):
            for row in args.rows.split(","):
                if row.startswith("peer") and model != "tiger":
                    continue
                spec = {"model": model, "size": size, "row": row, "steps": args.steps, "warmup": args.warmup,
                        "cap_s": args.cap_s, "threads": args.threads, "config": args.config, "workdir": workdir,
                        "overrides": args.overrides, "unger_codes": args.unger_codes}
                ranks = int(row.split("x")[1]) if "x" in row else 1
                try:
                    r = run_row(spec, ranks, args.timeout_s)
                except RuntimeError as exc:  # once more (a start-up race of a two-rank row was seen once), then on
                    print(f"{exc}\n-> {model}/{size}/{row} again", flush=True)
                    r = run_row(spec, ranks, args.timeout_s)
                rows.append(r)
                print(f"{model}/{size}/{row}: {r['samples_per_s']:.1f} samples/s, ms/step {r['ms_per_step']}",
                      flush=True)
    summary = ratios(rows)
    text = table(rows, peak)
    print(text)
    print(json.dumps(summary, indent=1))
    import torch

    write_result(args.out, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "load_average_1m_before": round(load_before, 2),
                "load_average_1m_after": round(os.getloadavg()[0], 2)},
        "config": args.config, "threads_per_process": args.threads, "steps": args.steps, "warmup": args.warmup,
        "cap_s": args.cap_s, "overrides": args.overrides, "matmul_gflop_per_s": round(peak, 2),
        "ratios": summary, "rows": rows, "table": text})


if __name__ == "__main__":
    main()
