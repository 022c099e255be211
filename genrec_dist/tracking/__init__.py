"""Experiment tracking behind a small protocol (``log``, ``log_params``, ``log_config``, ``log_artifact``,
``log_input`` (an MLflow dataset input), ``log_model`` (a saved MLflow model, registered), ``close``).

The only package that imports ``mlflow`` (besides :mod:`genrec_dist.serving`, a run as an MLflow model); training
loops and tokenizers take a :class:`Tracker` (made by the job and passed down) and never know which one (torchtune's
``MLFlowLogger`` shape). Only rank 0 gets a real tracker; other ranks get :class:`NullTracker`, so a multi-process
run makes one MLflow run.

Runs of one pipeline carry the tag ``genrec.pipeline`` (filter with ``tags.genrec.pipeline = '<name>'`` in the UI)
and ``genrec.job`` (prepare / tokenize / train / evaluate).

**A tracking server that goes away never stops or slows the job.** Starting the run (experiment, ``create_run``,
or marking a resumed run RUNNING) needs the server: if it cannot be reached in a few seconds the job ends with a
:class:`TrackingError` before any work is done. After that, every call only queues an item (metrics, params, tags,
text, artifacts — artifacts as a hard link or copy, so the caller may delete its file — and the final status);
one background thread delivers the queue in order. A delivery that fails appends the item, and every later one,
to a spool file ``<run dir>/tracking_spool-<run id>.jsonl`` (:mod:`genrec_dist.spool`: appended and flushed line
by line, so a killed job keeps it), logs ONE warning naming the server and the spool, and retries with a backoff
of up to ``tracking.retry_max_s``; once the server answers, the spool is delivered in order (metrics of
consecutive steps in one request), one more warning says so, and the spool is removed. ``close()`` waits at most
``tracking.flush_timeout_s`` for the server; what is still undelivered stays in the spool with a warning naming
the command that replays it::

    python -m genrec_dist.tracking replay <run dir>/tracking_spool-<run id>.jsonl [--uri http://host:5000]

A resumed training run (same run dir, same MLflow run) delivers a spool its killed predecessor left, first. An
item the server answers with a client error (4xx: e.g. a param changed value) cannot succeed on retry; it is set
aside in ``tracking_rejected-<run id>.jsonl`` beside the spool, with a warning.

MLflow retries each HTTP request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, backoff factor 2: minutes
against a stopped server; ``MLFLOW_HTTP_REQUEST_TIMEOUT`` default 120 s) and reads these environment variables at
every request, with no per-client setting (mlflow 3: ``mlflow/utils/rest_utils.py::http_request``). The tracker
does its own retrying, so it sets them small for the process (see ``outbox._quick_requests``).

Modules: ``base`` (the protocol, :class:`NullTracker`, :class:`TrackingError`), ``mlflow_client`` (starting an MLflow
run, the protocol calls), ``outbox`` (queue, delivery thread, spool, :func:`replay`), ``lookup`` (store URI, pipeline
name, a run's tags, a table's parent run, a served MLflow model), ``model_items`` (delivering logged models and dataset
inputs), ``failures`` (a failed request: rejected or an outage), ``system_metrics`` (MLflow's system metrics through the
tracker), ``__main__`` (``python -m genrec_dist.tracking replay``); :func:`make_tracker` here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from genrec_dist import storage
from genrec_dist.tracking.base import NullTracker, Tracker, TrackingError
from genrec_dist.tracking.lookup import (check_model, default_uri, download_model, find_run, git_commit, pipeline_name,
                                        run_tags, tag_run, ui_url)
from genrec_dist.tracking.mlflow_client import MLflowTracker
from genrec_dist.tracking.outbox import replay

__all__ = ["MLflowTracker", "NullTracker", "Tracker", "TrackingError", "check_model", "default_uri", "download_model",
           "find_run", "git_commit", "make_tracker", "pipeline_name", "replay", "run_tags", "tag_run", "ui_url"]


def make_tracker(cfg: Any, job: str, rank: int = 0, run_name: str | None = None,
                 extra_tags: dict[str, str] | None = None, run_id: str | None = None,
                 spool_dir: str | None = None) -> Tracker:
    """The tracker for one job of the pipeline: MLflow on rank 0 when tracking is on, else a null tracker.
    ``spool_dir``: where items the server has not taken yet are kept (the job's run dir; default: workdir; a
    remote path falls back to the local temp dir). The run logs system metrics when ``job`` is one of
    ``tracking.system_metrics``, and is a child of ``tracking.parent_run_id`` when that is set (a table's run)."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    tags = {
        "genrec.pipeline": pipeline_name(cfg),
        "genrec.job": job,
        "genrec.dataset": cfg.name,
        "mlflow.source.git.commit": git_commit(),
        **({"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else {}),
        **(extra_tags or {}),
    }
    uri = default_uri(cfg)
    # A local SQLite store keeps its artifacts beside it (MLflow's default is ./mlruns in whatever the cwd is).
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    spool_dir = spool_dir or cfg.workdir
    if storage.is_remote(spool_dir):
        spool_dir = os.path.join(tempfile.gettempdir(), "genrec-dist", "tracking-spool")
    tc = cfg.tracking
    return MLflowTracker(uri, tc.experiment, run_name or f"{cfg.name}-{job}", tags, run_id=run_id,
                         artifact_location=artifacts, spool_dir=os.path.abspath(spool_dir),
                         flush_timeout_s=tc.flush_timeout_s, request_timeout_s=tc.request_timeout_s,
                         retry_max_s=tc.retry_max_s,
                         system_metrics_s=tc.system_metrics_interval_s if job in tc.system_metrics else 0.0)
