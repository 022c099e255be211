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


def train_once(cmd: list[str], runs_dir: str, run_name: str) -> dict:
    """``cmd`` (a ``jobs/train.py`` command line) run as ``train.run_name=<run_name>``, its ``metrics.json`` returned.
    A run that already finished is read, not trained again; one that was interrupted continues (``--resume``), so a
    table script that stopped half-way picks up where it was."""
    run_dir = os.path.join(runs_dir, run_name)
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        started = os.path.exists(os.path.join(run_dir, "run.json"))
        run([*cmd, *(["--resume", run_name] if started else [f"train.run_name={run_name}"])])
    return run_metrics(runs_dir, run_name)


def run_metrics(runs_dir: str, run_name: str) -> dict:
    """``metrics.json`` of a finished training run (test metrics of its best model, most-popular beside)."""
    with open(os.path.join(runs_dir, run_name, "metrics.json")) as fh:
        return json.load(fh)
