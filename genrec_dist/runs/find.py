"""Finding a trained run for the jobs that use one (``--run`` of evaluate, recommend and serve): one resolver,
:func:`resolve_run`.

``--run`` is a run dir, a run name under ``paths.runs``, or the MLflow run id of a training run (its
``genrec.run_dir`` tag). Without ``--config`` the job runs with the config the run saved when it started (its
``config.yaml``, paths made absolute then) and the command's overrides on top, so an override always wins over what
the run recorded.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from genrec_dist import storage
from genrec_dist.config import ConfigError, config_from_dict, ray_job_working_dir
from genrec_dist.runs.export import inference_overrides, read_meta
from genrec_dist.runs.rundir import CONFIG_FILE, RunNotFoundError, read_run, read_run_config, run_dir


def find_run_dir(cfg: Any, run: str) -> str:
    """A run dir from a run dir path, a run name under the runs dir, or the MLflow run id of a training run."""
    for candidate in (run, run_dir(cfg, run)):
        if read_run(candidate, cfg.storage) is not None:
            return candidate
    from genrec_dist.tracking import default_uri, run_tags

    try:
        tags = run_tags(cfg, run)
    except KeyError:
        raise RunNotFoundError(f"--run {run}: not a run dir, not a run under {cfg.runs_dir}, not an MLflow run id "
                               f"in {default_uri(cfg)} (a name or id is looked up with the config's workdir and "
                               "tracking.uri: pass the run's --config, or workdir=...)") from None
    if "genrec.run_dir" not in tags:
        raise RunNotFoundError(f"--run {run}: MLflow run has no 'genrec.run_dir' tag (not a training run)")
    return tags["genrec.run_dir"]


def run_own_config(cfg: Any, run: str, overrides: Sequence[str] = (),
                   section: str = "evaluate") -> tuple[Any, str, str | None]:
    """``(config, run dir, source)`` where the config is the one the run saved when it started (``config.yaml``)
    with the command's ``overrides`` on top; ``cfg`` (defaults + overrides, which located the run) and source
    ``None`` for a run from before runs saved their config. ``section``: the job whose bare override keys these are
    (``jobs/recommend.py``: ``k=50`` is ``recommend.k``)."""
    found = find_run_dir(cfg, run)
    source = storage.join(found, CONFIG_FILE)
    try:
        saved = read_run_config(found, cfg.storage)
        if saved is None:
            return cfg, found, None
        return config_from_dict(saved, source, list(overrides), section), found, source
    except ConfigError as exc:
        raise ConfigError(f"{exc} (pass --config to use another config)") from None


def resolve_run(cfg: Any, run: str, overrides: Sequence[str], job: str,
                own_config: bool) -> tuple[Any, str, str | None]:
    """``(config, run dir, config source)`` for a job's ``--run``: with ``own_config`` (no ``--config``) the run's
    saved config with ``overrides`` on top (:func:`run_own_config`), else ``cfg`` itself. A local run dir comes back
    absolute (Ray workers and replicas do not share this process's working directory); under ``ray job submit
    --working-dir`` a relative one is refused, as it would name a folder of the job's temporary copy. The command's
    ``model.<model>.*`` overrides are checked against the exported model (:func:`inference_overrides`)."""
    if own_config:
        cfg, found, source = run_own_config(cfg, run, overrides, job)
    else:
        found, source = find_run_dir(cfg, run), None
    if not storage.is_remote(found):
        if ray_job_working_dir() is not None and not os.path.isabs(found):
            raise ConfigError(f"running as a Ray job with a working_dir (ray job submit --working-dir): --run {found} "
                              "would be read from its temporary copy; give an absolute run dir every node sees "
                              "(shared storage) or s3://")
        found = os.path.abspath(found)
    meta = read_meta(storage.join(found, "model"), cfg.storage)
    inference_overrides(cfg, overrides, meta["model"], found, meta["model_config"][meta["model"]])
    return cfg, found, source
