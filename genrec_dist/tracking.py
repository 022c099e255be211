"""Experiment tracking behind a small protocol (``log``, ``log_params``, ``log_config``, ``log_artifact``, ``close``).

The only module that imports ``mlflow``; training loops and tokenizers take a :class:`Tracker` and never know
which one (torchtune's ``MLFlowLogger`` shape). Only rank 0 gets a real tracker; other ranks get
:class:`NullTracker`, so a multi-process run makes one MLflow run.

Runs of one pipeline carry the tag ``genrec.pipeline`` (filter with ``tags.genrec.pipeline = '<name>'`` in the UI)
and ``genrec.job`` (prepare / tokenize / train / evaluate).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from typing import Any, Protocol

from genrec_dist import storage
from genrec_dist.config import flatten, to_dict

# MLflow 3 opens an experiment in its GenAI view unless the experiment says it holds model training runs.
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_CHARS = 6000


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_config(self, cfg: Any) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking off, or a rank other than 0."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_config(self, cfg: Any) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker:
    """One MLflow run. ``run_id`` given: continue that run (``--resume``, or evaluation of a training run)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, artifact_location: str | None = None):
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = self._client.create_experiment(experiment, artifact_location=artifact_location,
                                                        tags={_KIND_TAG: _KIND})
            except mlflow.exceptions.MlflowException:  # another job created it first
                exp_id = self._client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.tags.get(_KIND_TAG) is None:
                self._client.set_experiment_tag(exp_id, _KIND_TAG, _KIND)
        if run_id is None:
            run = self._client.create_run(exp_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(tags)
        self.experiment_id = exp_id

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(key=_metric_key(k), value=float(v), timestamp=now, step=int(step or 0))
                 for k, v in metrics.items()]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_config(self, cfg: Any) -> None:
        d = cfg if isinstance(cfg, dict) else to_dict(cfg)
        self.log_params(flatten(d))
        import yaml

        self.log_text(yaml.safe_dump(d, sort_keys=False), "config.yaml")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if os.path.isdir(local_path):
            self._client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self._client.log_artifact(self.run_id, local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; '@' from "recall@10" becomes '_at_'.
    return key.replace("@", "_at_")


def _param_value(value: Any) -> str:
    s = "" if value is None else str(value)
    return s if len(s) <= _MAX_PARAM_CHARS else s[: _MAX_PARAM_CHARS - 3] + "..."


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Link to the experiment's "Model training" runs view (or one run) in the MLflow UI of a server ``uri``.
    For a local store, the same path under ``mlflow ui``'s address."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")


def default_uri(cfg: Any) -> str:
    """The tracking URI of a config: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under workdir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = cfg.workdir if not storage.is_remote(cfg.workdir) else os.path.join(tempfile.gettempdir(), "genrec-dist")
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def pipeline_name(cfg: Any) -> str:
    if cfg.tracking.pipeline:
        return cfg.tracking.pipeline
    digest = hashlib.sha1(os.path.abspath(cfg.workdir).encode() if not storage.is_remote(cfg.workdir)
                          else cfg.workdir.encode()).hexdigest()[:8]
    return f"{cfg.name}-{digest}"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_tracker(cfg: Any, job: str, rank: int = 0, run_name: str | None = None,
                 extra_tags: dict[str, str] | None = None, run_id: str | None = None) -> Tracker:
    """The tracker for one job of the pipeline: MLflow on rank 0 when tracking is on, else a null tracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    tags = {
        "genrec.pipeline": pipeline_name(cfg),
        "genrec.job": job,
        "genrec.dataset": cfg.name,
        "mlflow.source.git.commit": git_commit(),
        **(extra_tags or {}),
    }
    uri = default_uri(cfg)
    # A local SQLite store keeps its artifacts beside it (MLflow's default is ./mlruns in whatever the cwd is).
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return MLflowTracker(uri, cfg.tracking.experiment, run_name or f"{cfg.name}-{job}", tags, run_id=run_id,
                         artifact_location=artifacts)


def run_tags(cfg: Any, run_id: str) -> dict[str, str]:
    """Tags of run ``run_id`` in the config's tracking store (``jobs/evaluate.py --run <id>`` finds the run dir in
    ``genrec.run_dir``). Raises ``KeyError`` when the store has no such run."""
    import mlflow

    try:
        return dict(mlflow.MlflowClient(tracking_uri=default_uri(cfg)).get_run(run_id).data.tags)
    except mlflow.exceptions.MlflowException as exc:
        raise KeyError(f"no MLflow run {run_id} in {default_uri(cfg)}: {exc}") from None
