"""Training throughput and peak memory per ZeRO stage: one table, JSON in benchmarks/results/train.json.

    python -m benchmarks.train [--ranks 2] [--stages 0,1,2,3] [--steps 30] [--out benchmarks/results/train.json]

Each stage is one real launch, `deepspeed --num_gpus <ranks> jobs/train.py` (CPU ranks on gloo without GPUs), of
SASRec at a size where optimizer state matters (d_model 512, 4 layers, d_ff 2048: ~12.9M parameters, so fp32
weights ~50 MB, Adam moments ~100 MB, gradients ~50 MB per full copy) on the synthetic catalog, with validation and
checkpoints off. samples/s is the global batch over wall time per step, averaged over the logged steps after the
first 5 (start-up excluded); peak memory is the busiest rank's peak RSS on CPU (process total: imports included,
so differences between stages are what the stage saves) or peak allocated memory on GPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from benchmarks._jobs import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["train.model=sasrec", "model.sasrec.d_model=512", "model.sasrec.n_heads=8", "model.sasrec.n_layers=4",
         "model.sasrec.d_ff=2048", "model.sasrec.dropout=0.1"]


def run_stage(stage: int, ranks: int, steps: int, work: str, port: int) -> dict:
    name = f"bench-zero{stage}"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(port), "jobs/train.py", "--config", "configs/synthetic.yaml", f"workdir={work}", *MODEL,
           f"zero_stage={stage}", "batch_size=64", f"max_steps={steps}", "warmup_steps=5", "eval_every=0",
           "checkpoint_every=0", "log_every=1", "tracking.enabled=false", f"run_name={name}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(work, "runs", name, "history.json")) as fh:
        hist = [h for h in json.load(fh) if "train/samples_per_s" in h]
    steady = [h["train/samples_per_s"] for h in hist if h["step"] > 5]
    return {"zero_stage": stage, "ranks": ranks, "steps": steps,
            "samples_per_s": sum(steady) / len(steady),
            "peak_mem_mb": max(h["train/peak_mem_mb"] for h in hist),
            "final_loss": hist[-1]["train/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "train.json"))
    args = parser.parse_args()

    import torch

    from tests._util import free_port

    rows = []
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "jobs/prepare.py", "--config", "configs/synthetic.yaml", f"workdir={work}",
                        "tracking.enabled=false"], cwd=REPO, check=True, capture_output=True)
        for stage in [int(s) for s in args.stages.split(",")]:
            rows.append(run_stage(stage, args.ranks, args.steps, work, free_port()))
            print(f"stage {stage}: {rows[-1]}", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [f"SASRec d512x4 (~12.9M params), global batch 64, {args.ranks} ranks, {device}",
             "| ZeRO stage | samples/s | peak memory / rank (MB) | loss at last step |", "|---|---|---|---|"]
    lines += [f"| {r['zero_stage']} | {r['samples_per_s']:.1f} | {r['peak_mem_mb']:.0f} | {r['final_loss']:.4f} |"
              for r in rows]
    print("\n".join(lines))
    write_result(args.out, {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                            "rows": rows})


if __name__ == "__main__":
    main()
