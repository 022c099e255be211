"""One MLflow run behind the tracker protocol: starting it (the one moment the server must answer), then queueing
each call into the run's outbox (:mod:`genrec_dist.tracking.outbox`). The package docstring tells the whole story."""

from __future__ import annotations

import atexit
import os
import shutil
import time
import uuid
from typing import Any

from genrec_dist import spool as spool_file
from genrec_dist.config import flatten, to_dict
from genrec_dist.tracking.base import TrackingError
from genrec_dist.tracking.failures import rejected, short
from genrec_dist.tracking.outbox import Outbox, _quick_requests

# MLflow 3 opens an experiment in its GenAI view unless the experiment says it holds model training runs.
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_CHARS = 6000
# MLflow keeps at most 36 characters of a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE): a sha256
# is logged as its first 32 hex digits (128 bits), the whole one in the dataset's profile.
_DIGEST_CHARS = 32


class MLflowTracker(Outbox):
    """One MLflow run. ``run_id`` given: continue that run (``--resume``, or evaluation of a training run).

    Calls return at once; a background thread delivers (module docstring). ``spool_dir``: a local folder for the
    spool (default: the temp dir). ``flush_timeout_s``: how long ``close()`` waits for the server.
    ``request_timeout_s``: one request's limit. ``retry_max_s``: the longest wait between retries.
    ``system_metrics_s`` > 0: MLflow's system metrics (``system/...``: CPU, memory, disk, network, GPU where
    ``nvidia-ml-py`` finds one) sampled at that interval and logged like any other metric
    (:class:`~genrec_dist.tracking.system_metrics.SystemMetrics`).
    """

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, artifact_location: str | None = None, spool_dir: str | None = None,
                 flush_timeout_s: float = 60.0, request_timeout_s: float = 10.0, retry_max_s: float = 30.0,
                 system_metrics_s: float = 0.0):
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=uri)
        try:
            with _quick_requests(retries=2, timeout_s=request_timeout_s):
                exp_id = self._experiment(experiment, artifact_location)
                if run_id is None:
                    run_id = self._client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
                    tags = None
                else:
                    self._client.update_run(run_id, status="RUNNING")
        except mlflow.exceptions.MlflowException as exc:
            if rejected(exc):
                raise
            raise TrackingError(f"MLflow tracking server {uri} cannot be reached to start the run "
                                f"({short(exc)}). Start it (cluster/mlflow_server.sh), point tracking.uri at a "
                                "running one, or set tracking.enabled=false.") from None
        self.experiment_id = exp_id
        self._open_outbox(self._client, uri, run_id, spool_dir, flush_timeout_s, request_timeout_s, retry_max_s)
        if tags:
            self.set_tags(tags)
        self._system = None
        if system_metrics_s > 0:
            from genrec_dist.tracking.system_metrics import SystemMetrics

            self._system = SystemMetrics(self, system_metrics_s)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        import mlflow

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location,
                                                      tags={_KIND_TAG: _KIND})
            except mlflow.exceptions.MlflowException:  # another job created it first
                return self._client.get_experiment_by_name(name).experiment_id
        if exp.tags.get(_KIND_TAG) is None:
            self._client.set_experiment_tag(exp.experiment_id, _KIND_TAG, _KIND)
        return exp.experiment_id

    # ----- the protocol: each call queues one item -------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [[_metric_key(k), float(v), now, int(step or 0)] for k, v in metrics.items()]
        if batch:
            self._put({"op": "metrics", "metrics": batch})

    def log_params(self, params: dict[str, Any]) -> None:
        if params:
            self._put({"op": "params", "params": {k: _param_value(v) for k, v in params.items()}})

    def log_config(self, cfg: Any) -> None:
        d = cfg if isinstance(cfg, dict) else to_dict(cfg)
        self.log_params(flatten(d))
        import yaml

        self.log_text(yaml.safe_dump(d, sort_keys=False), "config.yaml")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents under ``artifact_path``; linked (or copied) at once beside the spool."""
        is_dir = os.path.isdir(local_path)
        folder = os.path.join(spool_file.files_dir(self.spool_path), uuid.uuid4().hex[:12])
        dest = os.path.join(folder, os.path.basename(os.path.normpath(local_path)))
        os.makedirs(folder)
        if is_dir:
            shutil.copytree(local_path, dest, copy_function=_link_or_copy)
        else:
            _link_or_copy(local_path, dest)
        self._put({"op": "artifact", "files": os.path.relpath(dest, os.path.dirname(self.spool_path)),
                   "artifact_path": artifact_path, "dir": is_dir})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put({"op": "text", "text": text, "file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_input(self, name: str, source: str, digest: str, context: str, schema: dict[str, str] | None = None,
                  profile: dict[str, Any] | None = None) -> None:
        """An MLflow dataset input of the run (the UI's Dataset column): ``source`` its path, ``digest`` its content
        hash (a sha256 is cut to what MLflow keeps, the whole one goes to the profile), ``context`` what the run
        used it for (``training``, ``evaluation``, ...), ``schema`` ``{column: MLflow type}`` (``array<long>``
        for a list column), ``profile`` a few numbers (counts)."""
        profile = {**(profile or {}), **({"sha256": digest} if len(digest) > _DIGEST_CHARS else {})}
        self._put({"op": "input", "name": name, "source": source, "digest": digest[:_DIGEST_CHARS],
                   "context": context, "schema": schema or {}, "profile": profile})

    def log_model(self, model_dir: str, registered_name: str | None = None, step: int = 0) -> None:
        """A saved MLflow model folder (``mlflow.pyfunc.save_model``) as the run's logged model at ``step``, and a new
        version of ``registered_name`` in the Model Registry when given (a store without a registry: skipped with a
        warning). The folder is linked (or copied) at once, like an artifact."""
        folder = os.path.join(spool_file.files_dir(self.spool_path), uuid.uuid4().hex[:12])
        dest = os.path.join(folder, "model")
        os.makedirs(folder)
        shutil.copytree(model_dir, dest, copy_function=_link_or_copy)
        self._put({"op": "model", "files": os.path.relpath(dest, os.path.dirname(self.spool_path)),
                   "registered_name": registered_name, "step": int(step)})

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run ``status`` and wait up to ``flush_timeout_s`` for everything to reach the server."""
        if self._closed:
            return
        atexit.unregister(self._at_exit)
        if self._system is not None:
            self._system.stop()
        self._finish({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})


    def _at_exit(self) -> None:
        if not self._closed and self._system is not None:
            self._system.stop()
        super()._at_exit()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; '@' from "recall@10" becomes '_at_'.
    return key.replace("@", "_at_")


def _param_value(value: Any) -> str:
    s = "" if value is None else str(value)
    return s if len(s) <= _MAX_PARAM_CHARS else s[: _MAX_PARAM_CHARS - 3] + "..."
