"""Run directories: naming a new run, finding the run ``--resume`` continues, and the locations inside a run.

A run lives in ``<runs dir>/<run name>/`` (local or ``s3://``)::

    run.json        run name, model, MLflow run id, creation time (written when the run starts)
    checkpoints/    (unless train.checkpoint_dir points elsewhere; see checkpoint.py)
    model/          the exported best-on-validation model (export.py)
    metrics.json    test metrics of the model and of the most-popular baseline (written at the end)
    history.json    the logged training and validation metrics
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import tempfile
from typing import Any

from genrec_dist import storage

RUN_FILE = "run.json"


def new_run_name(model: str) -> str:
    """``<model>-<UTC time>-<6 hex>``: the suffix keeps runs of a sweep launched in the same second apart."""
    return f"{model}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def run_dir(cfg: Any, run_name: str) -> str:
    return storage.join(cfg.runs_dir, run_name)


def checkpoint_root(cfg: Any, run_name: str) -> str:
    if cfg.train.checkpoint_dir:
        return storage.join(cfg.train.checkpoint_dir, run_name)
    return storage.join(run_dir(cfg, run_name), "checkpoints")


def checkpoint_staging(root: str, run_name: str) -> str:
    """The local directory DeepSpeed writes to: the root itself when local, else a local staging copy."""
    if not storage.is_remote(root):
        return storage.filesystem(root)[1]
    return os.path.join(tempfile.gettempdir(), "genrec-dist-checkpoints", run_name)


def read_run(path: str, storage_cfg: Any = None) -> dict[str, Any] | None:
    p = storage.join(path, RUN_FILE)
    return storage.read_json(p, storage_cfg) if storage.exists(p, storage_cfg) else None


def resolve_resume(cfg: Any) -> str:
    """The run name ``train.resume`` names: ``latest`` = the newest run of ``train.model`` under the runs dir;
    a path = that run dir's name (it must sit in the runs dir); else the name itself. Errors name what is missing."""
    want = cfg.train.resume
    if want == "latest":
        fs, root = storage.filesystem(cfg.runs_dir, cfg.storage)
        runs = []
        if fs.exists(root):
            for name in fs.ls(root, detail=False):
                base = os.path.basename(name.rstrip("/"))
                meta = read_run(storage.join(cfg.runs_dir, base), cfg.storage)
                if meta and meta.get("model") == cfg.train.model:
                    runs.append((meta.get("created", ""), base))
        if not runs:
            raise FileNotFoundError(f"--resume latest: no {cfg.train.model} run under {cfg.runs_dir}")
        return max(runs)[1]
    name = want.rstrip("/").rsplit("/", 1)[-1]
    if read_run(run_dir(cfg, name), cfg.storage) is None:
        raise FileNotFoundError(f"--resume {want}: no run '{name}' under {cfg.runs_dir} (no {RUN_FILE})")
    return name


def resolve_run_name(cfg: Any) -> tuple[str, bool]:
    """``(run name, resuming)`` for a config (decided once, by rank 0 or the Ray driver)."""
    if cfg.train.resume:
        return resolve_resume(cfg), True
    name = cfg.train.run_name
    if name and read_run(run_dir(cfg, name), cfg.storage) is not None:
        # A second run in the same dir would mix its export, metrics and history with the first one's.
        raise FileExistsError(f"train.run_name={name}: a run of that name exists under {cfg.runs_dir} ({RUN_FILE}); "
                              f"continue it with --resume {name} or choose another name")
    return name or new_run_name(cfg.train.model), False


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()
