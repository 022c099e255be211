"""Where a config's runs are tracked and finding them again: the store's URI, the pipeline's name, a run's tags
(``jobs/evaluate.py --run <MLflow run id>``), a UI link, an MLflow model to serve."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from typing import Any

from genrec_dist import storage


# MLflow 3's UI (3.17) opens an experiment in its GenAI view (Overview of traces, Judges, Prompts) unless the browser
# chose "Model training" in the switch at its top left (kept in the browser's local storage) or the link says so:
# it reads the view from the link's ``workflowType`` before the experiment's ``mlflow.experimentKind`` tag.
_TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None, page: str = "") -> str:
    """Link to the experiment's runs in the MLflow UI's "Model training" view of a server ``uri`` (or to one run,
    and its ``page``: ``system-metrics``, ``artifacts/<path>``). For a local store, the same path under ``mlflow
    ui``'s address."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    path = f"/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + (f"/{page}" if page else "")
    return f"{base}{path}?{_TRAINING_VIEW}"


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


def run_tags(cfg: Any, run_id: str) -> dict[str, str]:
    """Tags of run ``run_id`` in the config's tracking store (``jobs/evaluate.py --run <id>`` finds the run dir in
    ``genrec.run_dir``). Raises ``KeyError`` when the store has no such run."""
    import mlflow

    uri = default_uri(cfg)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        raise KeyError(f"no MLflow store at {uri}")  # (asking MLflow would create an empty one there)
    try:
        return dict(mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.tags)
    except mlflow.exceptions.MlflowException as exc:
        raise KeyError(f"no MLflow run {run_id} in {default_uri(cfg)}: {exc}") from None


def find_run(cfg: Any, tags: dict[str, str]) -> str | None:
    """The newest run of the config's experiment carrying all of ``tags``, or None (none, or no store yet)."""
    import mlflow

    from genrec_dist.tracking.outbox import _quick_requests

    uri = default_uri(cfg)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return None
    client = mlflow.MlflowClient(tracking_uri=uri)
    with _quick_requests(retries=2, timeout_s=cfg.tracking.request_timeout_s):
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = client.search_runs([exp.experiment_id], query, max_results=1, order_by=["start_time DESC"])
    return found[0].info.run_id if found else None


def tag_run(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on an existing run now (e.g. ``mlflow.parentRunId`` on a table row trained earlier)."""
    import mlflow
    from mlflow.entities import RunTag

    from genrec_dist.tracking.outbox import _quick_requests

    with _quick_requests(retries=2, timeout_s=10.0):
        mlflow.MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def check_model(uri: str, model_uri: str) -> str:
    """The run id behind MLflow model ``model_uri`` (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/<model id>``, ``runs:/<run id>/<path>``) in the store ``uri``; ``KeyError`` with MLflow's reason when
    there is no such model (asked before a server starts loading it)."""
    import mlflow

    from genrec_dist.tracking.outbox import _quick_requests

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    rest = model_uri.split(":/", 1)[1].strip("/") if ":/" in model_uri else ""
    try:
        with _quick_requests(retries=2, timeout_s=10.0):
            if model_uri.startswith("runs:/"):
                return client.get_run(rest.split("/", 1)[0]).info.run_id
            if not model_uri.startswith("models:/") or not rest:
                raise KeyError(f"{model_uri}: not an MLflow model URI (models:/<name>/<version> or runs:/<id>/<path>)")
            name, _, version = rest.partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            if version:
                return client.get_model_version(name, version).run_id
            return client.get_logged_model(name).source_run_id  # models:/<model id> (a logged, unregistered model)
    except mlflow.exceptions.MlflowException as exc:
        raise KeyError(f"{model_uri}: no such model in {uri} ({str(exc).splitlines()[0]})") from None


def download_model(uri: str, model_uri: str, dst: str) -> str:
    """Download MLflow model ``model_uri`` of the store ``uri`` into the local folder ``dst``; returns the model's
    folder (``MLmodel``, ``artifacts/``, ``code/``)."""
    import mlflow

    # MLflow resolves models:/ through the process's registry URI whatever registry_uri says (mlflow 3.17:
    # ModelsArtifactRepository._get_model_uri_infos reads mlflow.get_registry_uri()): set it for the download.
    saved = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst, tracking_uri=uri,
                                                   registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
