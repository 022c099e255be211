"""The run directory: naming a new run, finding the run ``--resume`` continues and checking it against the command
(:class:`RunDir`, which reads a run's state once), the run's saved config and ``run.json`` (their locations
absolute), and the dataset a job that uses the run reads (:func:`open_run_dataset`). The layout:
:mod:`genrec_dist.runs`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from genrec_dist import storage
from genrec_dist.config import Config, flatten, marked_fields, read_yaml_mapping, to_dict, with_absolute_paths
from genrec_dist.data.dataset import MANIFEST_TAG, Dataset
from genrec_dist.data.semantic_ids import read_semantic_ids
from genrec_dist.errors import GenrecError
from genrec_dist.models import needs_semantic_ids
from genrec_dist.runs import checkpoint

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
# Fields a training run does not depend on (``identifies_run: False`` in the config's field metadata, see
# genrec_dist/config.py): a resumed or read-back run may differ in these.
NOT_COMPARED = tuple(marked_fields(Config, "identifies_run", False))
LOCATIONS = tuple(marked_fields(Config, "output", True))  # recorded absolute (config.with_absolute_paths)


class RunConfigError(GenrecError, ValueError):
    """A command names an existing run but configures it differently (one line naming every field)."""


class RunNotFoundError(GenrecError, FileNotFoundError):
    """``--resume`` / ``--run`` names no run there is."""


class RunExistsError(GenrecError, FileExistsError):
    """A new run would take the name of an existing one."""


def new_run_name(model: str) -> str:
    """``<model>-<UTC time>-<6 hex>``: the suffix keeps runs of a sweep launched in the same second apart."""
    return f"{model}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def run_dir(cfg: Any, run_name: str) -> str:
    return storage.join(cfg.runs_dir, run_name)


def read_run(path: str, storage_cfg: Any = None) -> dict[str, Any] | None:
    p = storage.join(path, RUN_FILE)
    return storage.read_json(p, storage_cfg) if storage.exists(p, storage_cfg) else None


def config_differences(saved: dict[str, Any], cfg: Any) -> list[str]:
    """``field: <in the run> in the run, <now> now`` for every field of ``cfg`` (paths resolved) whose value differs
    from the run's saved config (``NOT_COMPARED`` fields aside). Only fields both have are compared, so a run saved
    before a field was added (or after one was removed) still compares on the rest."""
    was, now = flatten(saved), flatten(to_dict(with_absolute_paths(cfg)))
    for k in LOCATIONS:  # a run from before runs recorded absolute locations: as this process resolves them
        if isinstance(was.get(k), str) and was[k] and "://" not in was[k]:
            was[k] = os.path.abspath(was[k])
    return [f"{k}: {was[k]!r} in the run, {now[k]!r} now" for k in sorted(was.keys() & now.keys())
            if not _not_compared(k) and was[k] != now[k]]


def _not_compared(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in NOT_COMPARED)


# Fields a later version removed, dropped from a saved config when it is read back (a config is strict about
# unknown keys): ``train.eval_batch_size`` (validation now reads evaluate.batch_size, as every evaluation does).
RETIRED = ("train.eval_batch_size",)


def read_run_config(path: str, storage_cfg: Any = None) -> dict[str, Any] | None:
    """The config a run saved when it started, as a nested dict (fields since retired dropped); ``None`` for a run
    from before runs saved one."""
    p = storage.join(path, CONFIG_FILE)
    try:
        text = storage.read_bytes(p, storage_cfg)
    except FileNotFoundError:
        return None
    saved = read_yaml_mapping(text, p)
    for name in RETIRED:
        *parents, leaf = name.split(".")
        section = saved
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return saved


def write_run_config(cfg: Any, run_name: str) -> None:
    """Save the config a new run starts with, its locations absolute (``config.yaml`` in its run dir; ``jobs/train.py
    --config`` reads it, and every job that uses the run starts from it): a run trained with relative paths can be
    used from another working directory, as under ``ray job submit``."""
    storage.write_bytes(storage.join(run_dir(cfg, run_name), CONFIG_FILE), _config_yaml(with_absolute_paths(cfg)),
                        cfg.storage)


def _config_yaml(absolute: Any) -> bytes:
    return yaml.safe_dump(to_dict(absolute), sort_keys=False).encode()


def input_fingerprints(cfg: Any, uses_codes: bool) -> dict[str, str]:
    """What a run trains on, by content: the sha256 of its dataset's ``manifest.json`` and, for a model that reads
    semantic IDs, of the codes themselves (codebook sizes and every item's codes). A dataset prepared again or codes
    tokenized again with ``overwrite=true`` at the same path change these where the config does not."""
    out = {"dataset_manifest_sha256": Dataset.open(cfg.dataset_dir, cfg.storage).tags()[MANIFEST_TAG]}
    if uses_codes:
        sids = read_semantic_ids(cfg.semantic_ids_dir, cfg.storage)
        digest = hashlib.sha256(json.dumps([int(k) for k in sids.codebook_sizes]).encode())
        digest.update(np.ascontiguousarray(sids.codes, dtype=np.int64).tobytes())
        out["semantic_ids_sha256"] = digest.hexdigest()
    return out


def open_run_dataset(cfg: Any, info: dict[str, Any]) -> Dataset:
    """The prepared dataset a job that uses a run reads: the one ``cfg`` names (the run's own saved config unless
    the command gave ``--config`` or overrode a path: the command wins), checked by content against the one the run
    trained on (``info``: its ``run.json``), so a wrong path is an error naming both, not metrics of another
    dataset."""
    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)
    was = (info.get("inputs") or {}).get("dataset_manifest_sha256")
    now = dataset.tags()[MANIFEST_TAG]
    if was and now != was:
        raise RunConfigError(f"{cfg.dataset_dir}: not the dataset run {info.get('run_name')} trained on (its manifest "
                             f"sha256 {now[:12]}..., the run's {was[:12]}... at {info.get('dataset')}); pass the run's "
                             "dataset with paths.dataset=... or workdir=...")
    return dataset


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


@dataclass
class RunDir:
    """The run a training command starts or continues, read once (by rank 0, or by the Ray driver) in
    :meth:`resolve`: its name and directory, whether it resumes, what the directory holds (``run.json``, the saved
    ``config.yaml``) and the newest complete checkpoint. The resume checks answer from these fields
    (:meth:`check_resume`), and :meth:`start` writes the run's files. Plain values, so rank 0 broadcasts it."""

    name: str
    path: str
    resuming: bool
    checkpoints: str  # the checkpoint root: train.checkpoint_dir/<name> when set, else <run dir>/checkpoints
    meta: dict[str, Any] = field(default_factory=dict)  # run.json as the run left it ({} for a new run)
    saved_config: dict[str, Any] | None = None  # config.yaml; None for a new run or one from before runs saved it
    latest_step: int | None = None  # the newest complete checkpoint to resume from (None: start from step 0)
    record: bytes = b""  # run.json as :meth:`start` wrote it

    @classmethod
    def resolve(cls, cfg: Any) -> RunDir:
        """The run of ``cfg``: a new one (``train.run_name``, which no run may have yet, or a new name), or the one
        ``train.resume`` names (``latest`` = the newest run of ``train.model`` under the runs dir; a path = that run
        dir's name, which must sit in the runs dir; else the name itself), checked against ``cfg``
        (:meth:`check_resume`). Errors name what is missing or differs."""
        if not cfg.train.resume:
            name = cfg.train.run_name
            if name and read_run(run_dir(cfg, name), cfg.storage) is not None:
                # A second run in the same dir would mix its export, metrics and history with the first one's.
                raise RunExistsError(f"train.run_name={name}: a run of that name exists under {cfg.runs_dir} "
                                     f"({RUN_FILE}); continue it with --resume {name} or choose another name")
            name = name or new_run_name(cfg.train.model)
            return cls(name, run_dir(cfg, name), False, _checkpoint_root(cfg, name))
        name, meta = _resumed(cfg)
        path, root = run_dir(cfg, name), _checkpoint_root(cfg, name)
        run = cls(name, path, True, root, meta, read_run_config(path, cfg.storage),
                  checkpoint.latest_complete(root, cfg.storage))
        run.check_resume(cfg)
        return run

    @property
    def staging(self) -> str:
        """The local directory DeepSpeed writes checkpoints to: the root itself when local, else a local staging
        copy."""
        if not storage.is_remote(self.checkpoints):
            return storage.filesystem(self.checkpoints)[1]
        return os.path.join(tempfile.gettempdir(), "genrec-dist-checkpoints", self.name)

    def check_resume(self, cfg: Any) -> None:
        """Raise :class:`RunConfigError` when ``cfg`` would continue this run with other settings than it started
        with, or on other data or codes at the same paths: its checkpoints, MLflow params and metrics would then
        describe a run nobody configured. Answers from the fields read by :meth:`resolve`; only the inputs' current
        fingerprints are read now, and only for a run that recorded its own."""
        diff = config_differences(self.saved_config, cfg) if self.saved_config is not None else []
        if diff:
            raise RunConfigError(f"--resume {self.name}: run {self.path} started with other settings ("
                                 f"{'; '.join(diff)}); resume with its own ({CONFIG_FILE} in the run dir) or start a "
                                 "new run")
        was = self.meta.get("inputs") or {}
        if was:
            now = input_fingerprints(cfg, "semantic_ids_sha256" in was)
            where = {"dataset_manifest_sha256": f"the dataset at {cfg.dataset_dir}",
                     "semantic_ids_sha256": f"the semantic IDs at {cfg.semantic_ids_dir}"}
            changed = [f"{where[k]} (sha256 {was[k][:12]}... then, {now[k][:12]}... now)" for k in sorted(was)
                       if k in now and was[k] != now[k]]
            if changed:
                raise RunConfigError(f"--resume {self.name}: {'; '.join(changed)} changed since the run started "
                                     "(prepared or tokenized again); its checkpoints were trained on the old ones: "
                                     "restore them or start a new run")

    def start(self, cfg: Any, mlflow_run_id: str | None) -> dict[str, str]:
        """Rank 0, once the MLflow run is known: a new run saves its config (``config.yaml``); ``run.json`` is written
        with the MLflow run id and what the run trains on, which a resumed run keeps (``--resume`` compared them),
        and kept as :attr:`record`. Returns those inputs (:func:`input_fingerprints`)."""
        inputs = self.meta.get("inputs") or input_fingerprints(cfg, needs_semantic_ids(cfg.train.model))
        absolute = with_absolute_paths(cfg)  # what the run records: usable from any working directory
        if not self.resuming:
            storage.write_bytes(storage.join(self.path, CONFIG_FILE), _config_yaml(absolute), cfg.storage)
        self.record = json.dumps({
            "run_name": self.name, "model": cfg.train.model, "mlflow_run_id": mlflow_run_id,
            "created": self.meta.get("created") or created_now(), "dataset": absolute.paths.dataset, "inputs": inputs,
        }, indent=2).encode()
        storage.write_bytes(storage.join(self.path, RUN_FILE), self.record, cfg.storage)
        return inputs


def _resumed(cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(name, run.json)`` of the run ``train.resume`` names (see :meth:`RunDir.resolve`)."""
    want = cfg.train.resume
    if want == "latest":
        fs, root = storage.filesystem(cfg.runs_dir, cfg.storage)
        found = []
        if fs.exists(root):
            for entry in fs.ls(root, detail=False):
                base = os.path.basename(entry.rstrip("/"))
                meta = read_run(storage.join(cfg.runs_dir, base), cfg.storage)
                if meta and meta.get("model") == cfg.train.model:
                    found.append((meta.get("created", ""), base, meta))
        if not found:
            raise RunNotFoundError(f"--resume latest: no {cfg.train.model} run under {cfg.runs_dir}")
        _, name, meta = max(found, key=lambda f: f[:2])
        return name, meta
    name = want.rstrip("/").rsplit("/", 1)[-1]
    meta = read_run(run_dir(cfg, name), cfg.storage)
    if meta is None:
        raise RunNotFoundError(f"--resume {want}: no run '{name}' under {cfg.runs_dir} (no {RUN_FILE})")
    return name, meta


def _checkpoint_root(cfg: Any, run_name: str) -> str:
    if cfg.train.checkpoint_dir:
        return storage.join(cfg.train.checkpoint_dir, run_name)
    return storage.join(run_dir(cfg, run_name), "checkpoints")
