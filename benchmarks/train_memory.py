"""Per-rank memory of training a large catalog under ZeRO-0 and ZeRO-3: one row per stage, JSON in
benchmarks/results/train_memory.json.

    python -m benchmarks.train_memory [--items 500000] [--d-model 64] [--ranks 2] [--stages 0,3] [--steps 5]

Each stage is one real launch, ``deepspeed --num_gpus <ranks> --module benchmarks.train_memory --worker ...`` (CPU
ranks on gloo without GPUs), of the model built the way the trainer builds it (``build_model``, same seed on every rank,
the trainer's plain evaluation copy, ``deepspeed.initialize`` with the config of ``ds_config.deepspeed_config``) with
sampled softmax over the item table (a full softmax would hold B x N logits, not what this measures), trained
``--steps`` steps on random histories. No dataset is read: the catalog's item table, its gradient and the Adam
moments are what grow with N, so the table is what ZeRO-3 should split across ranks.

Per rank: RSS after building the model, after ``deepspeed.initialize`` and after the steps, the process's peak RSS
(``ru_maxrss``: imports included, so compare stages, not absolute values), and the parameter elements the rank
holds (its ZeRO-3 partition, or every element).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One rank: build, wrap, train ``args.steps`` steps, write this rank's row to ``args.out_dir``."""
    import copy

    import deepspeed
    import numpy as np
    import torch

    from genrec_dist.models import ModelConfig, build_model
    from genrec_dist.models.config import CARConfig, SASRecConfig
    from genrec_dist.train_config import TrainConfig
    from genrec_dist.training.dist import init_process_group, world_from_env
    from genrec_dist.training.ds_config import client_optimizer, deepspeed_config, micro_batch

    world = world_from_env()
    init_process_group(use_cuda=False)
    row: dict = {"rank": world.rank, "rss_start_mb": _rss_mb()}
    tc = TrainConfig(model=args.model, zero_stage=args.stage, batch_size=args.batch_size, warmup_steps=1)
    n, d = args.items, args.d_model
    sids = None
    if args.model == "sasrec":
        cfg = ModelConfig(sasrec=SASRecConfig(d_model=d, n_heads=1, d_ff=d, max_history=20, loss="sampled"))
    else:
        from genrec_dist.data.semantic_ids import SemanticIds

        codes = np.random.default_rng(0).integers(0, 256, (n + 1, 3))
        codes[0] = 0
        sids = SemanticIds(codes=codes, codebook_sizes=[256] * 3, manifest={})
        cfg = ModelConfig(car=CARConfig(d_model=d, n_heads=2, n_layers=2, d_ff=4 * d, uid_loss="sampled",
                                        drop_dedup_level=False))
    torch.manual_seed(0)
    model = build_model(args.model, cfg, n, sids)
    eval_model = copy.deepcopy(model).eval()  # the trainer keeps this plain copy for validation
    row["rss_built_mb"], row["peak_built_mb"] = _rss_mb(), _peak_mb()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_optimizer(tc, model.parameters(), False),
                                           model_parameters=model.parameters(),
                                           config=deepspeed_config(tc, world.world_size, False, args.steps))
    row["rss_initialized_mb"], row["peak_initialized_mb"] = _rss_mb(), _peak_mb()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    row["param_elements_held"] = int(held)
    row["param_elements_total"] = int(sum(p.numel() for p in eval_model.parameters()))
    mb = micro_batch(tc, world.world_size)
    gen = torch.Generator().manual_seed(world.rank)
    for _ in range(args.steps):
        history = torch.randint(1, n + 1, (mb, 20), generator=gen)  # (mb, H)
        target = torch.randint(1, n + 1, (mb,), generator=gen)
        out = engine(history, target)
        engine.backward(out["loss"])
        engine.step()
    row["rss_after_steps_mb"] = _rss_mb()
    row["peak_rss_mb"] = _peak_mb()
    row["final_loss"] = float(out["loss"].detach())
    with open(os.path.join(args.out_dir, f"rank{world.rank}.json"), "w") as fh:
        json.dump(row, fh)


def run_stage(args: argparse.Namespace, stage: int, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.ranks),
               "--master_port", str(port), "--module", "benchmarks.train_memory", "--worker", "--stage", str(stage),
               "--items", str(args.items), "--d-model", str(args.d_model), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--model", args.model, "--out-dir", out_dir]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.cpu else dict(os.environ)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = []
        for r in range(args.ranks):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                rows.append({"zero_stage": stage, **json.load(fh)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--items", type=int, default=500_000)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--model", choices=["sasrec", "car"], default="sasrec")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", default="0,3")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="hide GPUs (CPU ranks on gloo)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "train_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from benchmarks._jobs import write_result
    from tests._util import free_port

    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        rows += run_stage(args, stage, free_port())
    table = [f"{args.model}, {args.items} items x d {args.d_model}, {args.ranks} CPU ranks, micro batch "
             f"{args.batch_size // args.ranks}, {args.steps} steps, {platform.node()} ({os.cpu_count()} cores)",
             "| ZeRO | rank | params held / total | RSS built (MB) | RSS after init | RSS after steps | "
             "peak RSS: built | init | end |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['zero_stage']} | {r['rank']} | {r['param_elements_held']:,} / {r['param_elements_total']:,} | "
              f"{r['rss_built_mb']:.0f} | {r['rss_initialized_mb']:.0f} | {r['rss_after_steps_mb']:.0f} | "
              f"{r['peak_built_mb']:.0f} | {r['peak_initialized_mb']:.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    print("\n".join(table))
    write_result(args.out, {"items": args.items, "d_model": args.d_model, "model": args.model, "ranks": args.ranks,
                            "steps": args.steps, "batch_size": args.batch_size, "python": platform.python_version(),
                            "rows": rows})


if __name__ == "__main__":
    main()
