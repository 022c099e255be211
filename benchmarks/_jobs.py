"""What the table scripts share: run a real job as a subprocess from the repo root, and read a run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> None:
    """Run ``cmd`` in the repo root, its output streamed; a failure ends the script naming the command."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def train_launcher(ranks: int) -> list[str]:
    """``python`` for one process, ``deepspeed --num_gpus <ranks>`` for more (this interpreter's environment)."""
    py = sys.executable
    return [py] if ranks == 1 else [os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", str(ranks)]


def run_metrics(runs_dir: str, run_name: str) -> dict:
    """``metrics.json`` of a finished training run (test metrics of its best model, most-popular beside)."""
    with open(os.path.join(runs_dir, run_name, "metrics.json")) as fh:
        return json.load(fh)
