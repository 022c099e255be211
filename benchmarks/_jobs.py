"""What the benchmark scripts share: run a real job as a subprocess from the repo root, read a run's metrics, write a
result JSON whole, and group a table's training runs under one MLflow parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from genrec_dist import storage
from genrec_dist.config import load_config
from genrec_dist.runs.rundir import CONFIG_FILE, config_differences, read_run, read_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> None:
    """Run ``cmd`` in the repo root, its output streamed; a failure ends the script naming the command."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def write_result(path: str, obj: dict) -> None:
    """A benchmark's JSON, whole or not at all (:func:`genrec_dist.storage.write_bytes`): an interrupted write keeps
    the previous one."""
    storage.write_bytes(path, json.dumps(obj, indent=2).encode("utf-8"))
    print(f"-> {path}", flush=True)


def train_launcher(ranks: int) -> list[str]:
    """``python`` for one process, ``deepspeed --num_gpus <ranks>`` for more (this interpreter's environment)."""
    py = sys.executable
    return [py] if ranks == 1 else [os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", str(ranks)]


def train_once(cmd: list[str], runs_dir: str, run_name: str, parent: Any = None) -> dict:
    """``cmd`` (a ``jobs/train.py`` command line) run as ``train.run_name=<run_name>``, its ``metrics.json`` returned.
    A run that already finished is read, not trained again; one that was interrupted continues (``--resume``), so a
    table script that stopped half-way picks up where it was. ``parent`` (:func:`table_run`): the row's MLflow run
    becomes its child, a row read back included."""
    run_dir = os.path.join(runs_dir, run_name)
    if parent is not None and parent.run_id:
        cmd = [*cmd, f"tracking.parent_run_id={parent.run_id}"]
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        started = os.path.exists(os.path.join(run_dir, "run.json"))
        run([*cmd, *(["--resume", run_name] if started else [f"train.run_name={run_name}"])])
    else:  # a resumed run is checked by jobs/train.py itself; a finished one is checked here before it is read
        check_finished_run(cmd, run_dir, run_name)
        if parent is not None and parent.run_id:
            _adopt(parent, run_dir)
    return run_metrics(runs_dir, run_name)


def table_run(cfg: Any, table: str, key: str, params: dict) -> Any:
    """The MLflow parent run of one table (``genrec.table`` = ``table``, named ``key``; a null tracker when tracking
    is off): every row's training run is its child (``mlflow.parentRunId``), so the UI shows the table as one
    expandable group. The same table run again (same ``key``) continues its parent instead of starting another."""
    from genrec_dist.tracking import find_run, make_tracker

    tags = {"genrec.table": table, "genrec.table_key": key}
    found = find_run(cfg, tags) if cfg.tracking.enabled else None
    tracker = make_tracker(cfg, "table", run_name=key, extra_tags=tags, run_id=found)
    if found is None:
        tracker.log_params(params)
    return tracker


def finish_table(tracker: Any, results: dict, lines: list[str]) -> None:
    """The parent run's summary: each row's test metrics as ``<row>/<metric>``, the printed table as ``table.md``."""
    tracker.log({f"{row}/{k}": v for row, res in results.items() for k, v in res["model"].items()})
    tracker.log_text("\n".join(lines) + "\n", "table.md")
    tracker.close()


def _adopt(parent: Any, run_dir: str) -> None:
    """Make a finished row's MLflow run (trained before this table's parent existed) a child of ``parent``."""
    from genrec_dist.tracking import tag_run

    child = (read_run(run_dir) or {}).get("mlflow_run_id")  # a run without run.json (or an MLflow run): nothing
    if not child:
        return
    try:
        tag_run(parent.uri, child, {"mlflow.parentRunId": parent.run_id})
    except Exception as exc:  # noqa: BLE001 - another store, or gone: the table itself does not depend on it
        print(f"note: MLflow run {child} of {run_dir} not grouped under the table's run ({exc})", flush=True)


def check_finished_run(cmd: list[str], run_dir: str, run_name: str) -> None:
    """End the script when the finished run ``run_name`` was trained with other settings than ``cmd`` gives (a run
    of an earlier table under the same name would otherwise be read as this one's row)."""
    saved = read_run_config(run_dir)
    if saved is None:
        print(f"note: {run_dir} has no {CONFIG_FILE} (trained before runs saved one): read back unchecked", flush=True)
        return
    diff = config_differences(saved, command_config(cmd, run_name))
    if diff:
        raise SystemExit(f"{run_dir} was trained with other settings than this table's ({'; '.join(diff)}): "
                         "give the table another --prefix, or move the run away")


def command_config(cmd: list[str], run_name: str):
    """The config a ``jobs/train.py`` command line trains run ``run_name`` with (paths relative to the repo root)."""
    args = cmd[[os.path.basename(a) for a in cmd].index("train.py") + 1:]
    path, overrides, it = None, [], iter(args)
    for arg in it:
        if arg == "--config":
            path = os.path.join(REPO, next(it))
        else:
            overrides.append(arg)
    return load_config(path, [*overrides, f"train.run_name={run_name}"], default_section="train")


def run_metrics(runs_dir: str, run_name: str) -> dict:
    """``metrics.json`` of a finished training run (test metrics of its best model, most-popular beside)."""
    with open(os.path.join(runs_dir, run_name, "metrics.json")) as fh:
        return json.load(fh)
