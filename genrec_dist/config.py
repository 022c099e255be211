"""Typed configuration: one dataclass tree per pipeline, loaded from YAML, with dotted ``key=value`` overrides.

Every job reads the same YAML file (``configs/<dataset>.yaml``) and uses its own section of it. Loading is
strict: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the file and the key,
in the spirit of nanoGPT's configurator and torchtune's ``key=value`` overrides.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides, so the frozen experiment
configs in ``configs/<dataset>/<model>.yaml`` hold only what differs from the dataset's config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from genrec_dist.data.config import PrepareConfig
from genrec_dist.errors import ConfigError
from genrec_dist.models import ModelConfig
from genrec_dist.tokenize_config import TokenizeConfig
from genrec_dist.train_config import (NOT_RUN, OUTPUT, EvaluateConfig, RecommendConfig, ServeConfig,
                                          TrainConfig)

__all__ = ["Config", "ConfigError", "config_from_dict", "flatten", "load_config", "section_from_dict", "to_dict",
           "to_yaml", "with_resolved_paths"]


@dataclass
class StorageConfig:
    """How ``s3://`` paths are reached. Empty fields fall back to the usual AWS environment variables
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, credentials from the
    standard chain). Credentials are never stored in the config, so they never reach logs or MLflow."""

    endpoint_url: str = ""
    region: str = ""
    # Bounded retries so an unreachable endpoint ends in a clear error in seconds, not minutes: tries per S3 request
    # in all, first one included (botocore's standard retry with jittered back-off; s3fs's own retry loop is off).
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` empty: a local SQLite store under ``workdir`` (browse it with ``mlflow ui``)."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "genrec-dist"
    # Groups the runs of one pipeline (prepare/tokenize/train/evaluate) in the UI; empty: derived from workdir.
    pipeline: str = ""
    # An unreachable server never stops the job: items wait in <run dir>/tracking_spool-<run id>.jsonl and are
    # delivered in order once it answers (genrec_dist/tracking/). At the end the job waits this long for it;
    # what is left stays in the spool (python -m genrec_dist.tracking replay <spool>).
    flush_timeout_s: float = 60.0
    # One request's limit (MLflow's own default is 120 s, retried 7 times); then the item waits in the spool.
    request_timeout_s: float = 10.0
    # Retries of an unreachable server back off from 0.5 s up to this.
    retry_max_s: float = 30.0
    # Jobs whose runs log MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU with
    # nvidia-ml-py), sampled every system_metrics_interval_s (MLflow's default is 10 s; 2 s shows in short runs).
    system_metrics: list[str] = field(default_factory=lambda: ["train"])
    system_metrics_interval_s: float = 2.0
    # A run id: every run this config starts is its child (mlflow.parentRunId), as the table scripts' rows are.
    parent_run_id: str = ""


@dataclass
class PathsConfig:
    """Where each stage writes. Empty: derived from ``workdir`` (``dataset``, ``sids/<method>``, ``runs``)."""

    dataset: str = field(default="", metadata=OUTPUT)
    semantic_ids: str = field(default="", metadata=OUTPUT)
    runs: str = field(default="", metadata={**OUTPUT, **NOT_RUN})  # a run may move with its runs dir


@dataclass
class Config:
    """The whole pipeline. Jobs read ``workdir``/``paths``/``storage``/``tracking`` and their own section.

    Fields marked ``NOT_RUN`` do not identify a training run: its name, how storage and MLflow are reached, and the
    prepare and tokenize jobs' own sections (training reads their outputs at ``paths.dataset`` /
    ``paths.semantic_ids``, which are compared resolved, so ``workdir`` and ``paths.runs`` may move)."""

    name: str = "synthetic"
    workdir: str = field(default="outputs/synthetic", metadata={**OUTPUT, **NOT_RUN})
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig, metadata=NOT_RUN)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=NOT_RUN)
    prepare: PrepareConfig = field(default_factory=PrepareConfig, metadata=NOT_RUN)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig, metadata=NOT_RUN)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig, metadata=NOT_RUN)
    serve: ServeConfig = field(default_factory=ServeConfig, metadata=NOT_RUN)

    # ----- derived locations (explicit ``paths.*`` win) -----
    @property
    def dataset_dir(self) -> str:
        return self.paths.dataset or _join(self.workdir, "dataset")

    @property
    def semantic_ids_dir(self) -> str:
        return self.paths.semantic_ids or _join(self.workdir, "sids", self.tokenize.method)

    @property
    def runs_dir(self) -> str:
        return self.paths.runs or _join(self.workdir, "runs")


def with_resolved_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose ``paths.*`` name the locations it derives from ``workdir`` (same meaning, explicit)."""
    out = copy.deepcopy(cfg)
    out.paths.dataset, out.paths.semantic_ids, out.paths.runs = cfg.dataset_dir, cfg.semantic_ids_dir, cfg.runs_dir
    return out


def with_absolute_paths(cfg: Config) -> Config:
    """:func:`with_resolved_paths`, and every local location (``output`` in its field's metadata) made absolute
    against this process's working directory: what a run records, so the run can be used from anywhere (another
    working directory, ``ray job submit``'s temporary copy of it, another node of a shared filesystem)."""
    out = with_resolved_paths(cfg)
    for name in marked_fields(Config, "output", True):
        value = get_dotted(out, name)
        if value and "://" not in value and not os.path.isabs(value):
            set_dotted(out, name, os.path.abspath(value))
    return out


def ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this process is the driver of (``ray job submit --working-dir``), else
    ``None``. Ray's job supervisor hands the driver its job config (runtime_env included) in this variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return ((json.loads(raw) if raw else {}).get("runtime_env") or {}).get("working_dir") or None
    except (ValueError, AttributeError):
        return None


def check_ray_job_paths(cfg: Config) -> None:
    """Under ``ray job submit --working-dir`` the driver runs in a temporary copy of that directory on the head, so a
    relative location would be read from or written into the copy (and lost with it): refuse it, naming each one.
    Checked: every field marked ``output`` or ``input`` in its metadata (``paths.*`` as derived from workdir); a job's
    ``--run`` is checked where it is resolved (:func:`genrec_dist.runs.find.resolve_run`)."""
    if ray_job_working_dir() is None:
        return
    resolved = with_resolved_paths(cfg)
    named = {name: get_dotted(resolved, name) for key in ("output", "input") for name in marked_fields(Config, key)}
    relative = [f"{k}={v}" for k, v in named.items() if v and "://" not in v and not os.path.isabs(v)]
    if relative:
        raise ConfigError(f"running as a Ray job with a working_dir (ray job submit --working-dir), which runs in a "
                          f"temporary copy of that directory: {', '.join(relative)} would be read from or written "
                          "there (and lost); give absolute paths every node sees (shared storage) or s3://")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def marked_fields(cls: type, key: str, value: Any = True, prefix: str = "") -> list[str]:
    """Dotted names of the fields of dataclass ``cls`` (nested sections included) whose metadata has ``key`` equal
    to ``value``, e.g. ``marked_fields(Config, "identifies_run", False)``. A marked section stands for all of it."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if key in f.metadata and f.metadata[key] == value:
            out.append(name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += marked_fields(hints[f.name], key, value, name + ".")
    return out


def get_dotted(cfg: Any, name: str) -> Any:
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_dotted(cfg: Any, name: str, value: Any) -> None:
    *parents, leaf = name.split(".")
    setattr(get_dotted(cfg, ".".join(parents)) if parents else cfg, leaf, value)


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------

def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    default_section: str | None = None,
    cls: type = Config,
) -> Any:
    """Load ``cls`` from a YAML file (``None``: defaults only) and apply ``key=value`` overrides.

    ``default_section`` lets a job accept bare keys for its own section: ``jobs/train.py ... zero_stage=3``
    means ``train.zero_stage=3``.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = _read_yaml_with_base(str(path), seen=())
    return config_from_dict(data, source, overrides, default_section, cls)


def config_from_dict(
    data: dict,
    source: str,
    overrides: list[str] | None = None,
    default_section: str | None = None,
    cls: type = Config,
) -> Any:
    """:func:`load_config` of YAML already read (``source`` names it in errors), e.g. a run's saved config."""
    cfg = _build(cls, data, source, prefix="")
    for item in overrides or []:
        _apply_override(cfg, item, default_section)
    return cfg


def section_from_dict(cls: type, data: Any, source: str, key: str) -> Any:
    """One section (dataclass ``cls``) built from its mapping, as strictly as a whole config; errors name ``source``
    and the dotted ``key`` of the section (e.g. a run's saved ``model`` section: ``key="model"``)."""
    return _build(cls, data, source, prefix=f"{key}." if key else "")


def read_yaml_mapping(text: str | bytes, source: str) -> dict:
    """The mapping a YAML config text holds (empty text = ``{}``); :class:`ConfigError` naming ``source`` when the
    text is not YAML or its top level is not a mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _read_yaml_with_base(path: str, seen: tuple[str, ...]) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(seen + (path,))}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = read_yaml_mapping(fh.read(), path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = os.path.join(os.path.dirname(path), str(base))
    return _deep_merge(_read_yaml_with_base(base_path, seen + (path,)), data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in '{prefix.rstrip('.') or '<top>'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float, dicts build dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: '{key}' = {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(arg, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has an unsupported type {tp}")


def _apply_override(cfg: Any, item: str, default_section: str | None) -> None:
    source = f"override '{item}'"
    if "=" not in item:
        raise ConfigError(f"{source}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    top_names = {f.name for f in dataclasses.fields(cfg)}
    if default_section is not None:
        section_names = {f.name for f in dataclasses.fields(getattr(cfg, default_section))}
        # A bare key names the job's own field first (``train.py model=car`` is ``train.model``, not the
        # ``model:`` section), then a top-level one (``seed=1``).
        if (len(parts) == 1 and parts[0] in section_names) or parts[0] not in top_names:
            parts = [default_section, *parts]
    target = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"{source}: unknown key '{'.'.join(parts[: i + 1])}'")
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"{source}: unknown key '{'.'.join(parts)}'")
    tp = typing.get_type_hints(type(target))[leaf]
    value: Any = raw if tp is str else yaml.safe_load(raw) if raw.strip() else ""
    setattr(target, leaf, _coerce(tp, value, source, ".".join(parts)))


# --------------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}``: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def model_history(model: str, max_history: int, dataset: Any) -> int:
    """The history length model ``model`` reads (``model.<model>.max_history``: ``max_history``, from a config or
    an exported model's own saved config) when ``dataset`` (a prepared :class:`~genrec_dist.data.dataset.Dataset`)
    keeps that much history, else a :class:`ConfigError` naming both settings, their values and the dataset: a model
    never gets a silently shorter history than it was configured for."""
    field = f"model.{model}.max_history"
    if max_history > dataset.max_history:
        raise ConfigError(
            f"{field}={max_history} asks for more history than the dataset keeps: prepare.max_history="
            f"{dataset.max_history} in {dataset.path}/manifest.json; prepare it again with prepare.max_history>="
            f"{max_history} (and prepare.overwrite=true), or lower {field}")
    return int(max_history)
