"""Experiment tracking behind a small protocol (``log``, ``log_params``, ``log_config``, ``log_artifact``,
``log_input`` (an MLflow dataset input), ``log_model`` (a saved MLflow model, registered), ``close``).

The only module that imports ``mlflow``; training loops and tokenizers take a :class:`Tracker` and never know
which one (torchtune's ``MLFlowLogger`` shape). Only rank 0 gets a real tracker; other ranks get
:class:`NullTracker`, so a multi-process run makes one MLflow run.

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
does its own retrying, so while its requests run it sets them small (see :func:`_quick_requests`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Protocol

from genrec_dist import spool as spool_file
from genrec_dist import storage
from genrec_dist.config import flatten, to_dict

# MLflow 3 opens an experiment in its GenAI view unless the experiment says it holds model training runs.
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_CHARS = 6000
# MLflow's caps per log_batch request (mlflow.utils.validation.MAX_METRICS_PER_BATCH / MAX_PARAMS_TAGS_PER_BATCH).
_MAX_METRICS, _MAX_PARAMS = 1000, 100
_RETRY_MIN_S = 0.5
# MLflow keeps at most 36 characters of a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE): a sha256
# is logged as its first 32 hex digits (128 bits), the whole one in the dataset's profile.
_DIGEST_CHARS = 32
_CLOSE = object()  # queue sentinel: close() asks the delivery thread to finish
_log = logging.getLogger("genrec_dist.tracking")


class TrackingError(RuntimeError):
    """The tracking server could not be reached when the run had to start, or a replay could not finish."""


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_config(self, cfg: Any) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_input(self, name: str, source: str, digest: str, context: str, schema: dict[str, str] | None = None,
                  profile: dict[str, Any] | None = None) -> None: ...
    def log_model(self, model_dir: str, registered_name: str | None = None, step: int = 0) -> None: ...
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

    def log_input(self, name: str, source: str, digest: str, context: str, schema: dict[str, str] | None = None,
                  profile: dict[str, Any] | None = None) -> None:
        pass

    def log_model(self, model_dir: str, registered_name: str | None = None, step: int = 0) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker:
    """One MLflow run. ``run_id`` given: continue that run (``--resume``, or evaluation of a training run).

    Calls return at once; a background thread delivers (module docstring). ``spool_dir``: a local folder for the
    spool (default: the temp dir). ``flush_timeout_s``: how long ``close()`` waits for the server.
    ``request_timeout_s``: one request's limit. ``retry_max_s``: the longest wait between retries.
    ``system_metrics_s`` > 0: MLflow's system metrics (``system/...``: CPU, memory, disk, network, GPU where
    ``nvidia-ml-py`` finds one) sampled at that interval and logged like any other metric (:class:`_SystemMetrics`).
    """

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, artifact_location: str | None = None, spool_dir: str | None = None,
                 flush_timeout_s: float = 60.0, request_timeout_s: float = 10.0, retry_max_s: float = 30.0,
                 system_metrics_s: float = 0.0):
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.flush_timeout_s, self.request_timeout_s = flush_timeout_s, request_timeout_s
        self.retry_max_s = max(retry_max_s, _RETRY_MIN_S)
        try:
            with _quick_requests(retries=2, timeout_s=request_timeout_s):
                exp_id = self._experiment(experiment, artifact_location)
                if run_id is None:
                    run_id = self._client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
                    tags = None
                else:
                    self._client.update_run(run_id, status="RUNNING")
        except mlflow.exceptions.MlflowException as exc:
            if _rejected(exc):
                raise
            raise TrackingError(f"MLflow tracking server {uri} cannot be reached to start the run "
                                f"({_short(exc)}). Start it (cluster/mlflow_server.sh), point tracking.uri at a "
                                "running one, or set tracking.enabled=false.") from None
        self.run_id, self.experiment_id = run_id, exp_id

        path = os.path.join(spool_dir or os.path.join(tempfile.gettempdir(), "genrec-dist"),
                            f"tracking_spool-{run_id}{spool_file.SUFFIX}")
        self.spool_path = os.path.abspath(path)
        self._spool = spool_file.Spool(self.spool_path, {"uri": uri, "run_id": run_id})
        self._sender = _Sender(self._client, uri, run_id, self.spool_path, request_timeout_s)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the spool, _inflight and _abandoned between the two threads
        self._inflight: list[dict[str, Any]] = []  # taken off the queue, not yet delivered nor spooled
        self._abandoned = False  # close() gave up on the thread and took over the spool
        self._closed = False
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._deliver_forever, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)  # a job that dies of an exception still flushes what it logged
        if tags:
            self.set_tags(tags)
        self._system = _SystemMetrics(self, system_metrics_s) if system_metrics_s > 0 else None

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

    def _put(self, item: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"MLflow tracker of run {self.run_id} is closed")
        self._queue.put(item)

    def _at_exit(self) -> None:
        if not self._closed:
            if self._system is not None:
                self._system.stop()
            self._finish(None)

    def _finish(self, last: dict[str, Any] | None) -> None:
        if last is not None:
            self._queue.put(last)
        self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join(self.flush_timeout_s + self.request_timeout_s + 5.0)
        with self._lock:
            # Still stuck in one request (or dead of an error): keep what it holds and what it never took.
            self._abandoned = self._thread.is_alive()
            self._spool.append(self._inflight + [i for i in _drain(self._queue) if i is not _CLOSE])
            left = self._spool.pending()
        if not left:
            spool_file.remove(self.spool_path)  # the artifacts' (now empty) folder
        else:
            values = sum(len(i["metrics"]) for i in left if i["op"] == "metrics")
            _log.warning("MLflow tracking server %s still unreachable after %.0f s at the end of run %s: %d "
                         "tracking items (%d metric values) are kept in %s. When the server is back, deliver them "
                         "with: python -m genrec_dist.tracking replay %s", self.uri, self.flush_timeout_s,
                         self.run_id, len(left), values, self.spool_path, self.spool_path)

    # ----- the delivery thread -----------------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        try:
            self._deliver_until_closed()
        except Exception:  # noqa: BLE001 - e.g. the spool's disk is full; close() keeps what it can
            _log.exception("MLflow tracking of run %s stopped delivering; undelivered items go to %s at the end",
                           self.run_id, self.spool_path)

    def _deliver_until_closed(self) -> None:
        deadline: float | None = None  # set once close() asked to finish
        retry_at, backoff = 0.0, _RETRY_MIN_S
        while True:
            now = time.monotonic()
            wait = max(0.0, retry_at - now) if len(self._spool) else None
            if deadline is not None:
                wait = max(0.0, min(deadline - now, wait if wait is not None else 0.0))
            batch = _take(self._queue, wait)
            if batch and batch[-1] is _CLOSE:
                batch.pop()
                deadline = time.monotonic() + self.flush_timeout_s
            err = self._deliver_new(batch) if batch else None
            if err is None and len(self._spool) and (time.monotonic() >= retry_at or
                                                     (deadline is not None and time.monotonic() >= deadline)):
                err = self._deliver_spool()
            if self._abandoned:
                return
            if err is not None:
                self._went_down(err)
                retry_at, backoff = time.monotonic() + backoff, min(2 * backoff, self.retry_max_s)
            elif self._down_since is not None and not len(self._spool):
                _log.warning("MLflow tracking server %s is reachable again after %.0f s: the tracking items of run "
                             "%s kept meanwhile are delivered, in order.", self.uri,
                             time.monotonic() - self._down_since, self.run_id)
                self._down_since, backoff = None, _RETRY_MIN_S
            if deadline is not None and self._queue.empty() and (
                    not len(self._spool) or time.monotonic() >= deadline):
                return

    def _deliver_new(self, batch: list[dict[str, Any]]) -> Exception | None:
        """Items fresh off the queue: straight to the server, unless older ones wait in the spool (then behind
        them). What fails is spooled, in order."""
        with self._lock:
            if self._abandoned:
                return None
            if len(self._spool):
                self._spool.append(batch)
                return None
            self._inflight = batch
        done: set[int] = set()
        err = self._sender.deliver(batch, lambda items: done.update(id(i) for i in items))
        with self._lock:
            if not self._abandoned:
                self._inflight = []
                if err is not None:
                    self._spool.append([i for i in batch if id(i) not in done])
        return err

    def _deliver_spool(self) -> Exception | None:
        with self._lock:
            pending = self._spool.pending()

        def acked(items: list[dict[str, Any]]) -> None:
            with self._lock:
                if not self._abandoned:
                    self._spool.ack(i["seq"] for i in items)

        return self._sender.deliver(pending, acked)

    def _went_down(self, err: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            _log.warning("MLflow tracking server %s is unreachable (%s); the job goes on. Tracking items of run %s "
                         "are kept in %s and delivered in order when the server is back.", self.uri, _short(err),
                         self.run_id, self.spool_path)


class _Sender:
    """Delivers spool-format items to one run, in order; consecutive metric items go as one request."""

    def __init__(self, client: Any, uri: str, run_id: str, spool_path: str, request_timeout_s: float,
                 retries: int = 0):
        self.client, self.uri, self.run_id, self.spool_path = client, uri, run_id, spool_path
        self.request_timeout_s, self.retries = request_timeout_s, retries

    def deliver(self, items: list[dict[str, Any]], done: Callable[[list[dict[str, Any]]], None]
                ) -> Exception | None:
        """Send ``items`` in order, calling ``done(group)`` after each group the server took (or that was set
        aside as rejected). Returns the error that stopped it (the server looks unreachable), None when all went."""
        with _quick_requests(self.retries, self.request_timeout_s):
            for group in _groups(items):
                try:
                    self._send(group)
                except Exception as exc:  # noqa: BLE001 - anything but a rejection counts as an outage
                    if not _rejected(exc):
                        return exc
                    for item in group:  # one of them is bad: the others still go
                        try:
                            self._send([item])
                        except Exception as one:  # noqa: BLE001
                            if not _rejected(one):
                                return one
                            self._set_aside(item, one)
                        done([item])
                    continue
                done(group)
        return None

    def _send(self, group: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op, item = group[0]["op"], group[0]
        if op == "metrics":
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for it in group
                                                        for k, v, ts, step in it["metrics"]])
        elif op == "params":
            params = [Param(k, v) for k, v in item["params"].items()]
            for i in range(0, len(params), _MAX_PARAMS):
                self.client.log_batch(self.run_id, params=params[i:i + _MAX_PARAMS])
        elif op == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in item["tags"].items()])
        elif op == "text":
            self.client.log_text(self.run_id, item["text"], item["file"])
        elif op == "artifact":
            path = os.path.join(os.path.dirname(self.spool_path), item["files"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the artifact's copy beside the spool is gone")
            if item["dir"]:
                self.client.log_artifacts(self.run_id, path, item["artifact_path"])
            else:
                self.client.log_artifact(self.run_id, path, item["artifact_path"])
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        elif op == "input":
            self.client.log_inputs(self.run_id, datasets=[_dataset_input(item)])
        elif op == "model":
            path = os.path.join(os.path.dirname(self.spool_path), item["files"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the model's copy beside the spool is gone")
            self._log_model(path, item["registered_name"], item["step"])
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        elif op == "terminate":
            self.client.set_terminated(self.run_id, status=item["status"], end_time=item["end_time"])
        else:
            raise ValueError(f"unknown tracking item {op!r}")

    def _log_model(self, path: str, registered_name: str | None, step: int) -> None:
        """What ``mlflow.pyfunc.log_model`` does with a model saved beforehand: a LoggedModel of the run (its
        ``MLmodel`` rewritten to name it), its files, READY; then a registry version whose source is that model."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        run = self.client.get_run(self.run_id)
        mlmodel = Model.load(path)
        logged = self.client.create_logged_model(run.info.experiment_id, name="model", source_run_id=self.run_id,
                                                 tags={"mlflow.modelFlavor": ",".join(mlmodel.flavors)})
        mlmodel.run_id, mlmodel.model_id, mlmodel.model_uuid = self.run_id, logged.model_id, logged.model_id
        mlmodel.artifact_path = logged.artifact_location
        os.remove(os.path.join(path, "MLmodel"))  # a link to the caller's file: write a new one, not through it
        mlmodel.save(os.path.join(path, "MLmodel"))
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        self.client.log_model_artifacts(logged.model_id, path)
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        if registered_name:
            self._register(registered_name, logged.model_id, logged.artifact_location)

    def _register(self, name: str, model_id: str, location: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            # source: the model's artifact location itself (a "models:/<id>" source is resolved against the
            # process's default tracking URI, not this client's)
            version = self.client.create_model_version(name, location, run_id=self.run_id, model_id=model_id,
                                                       await_creation_for=0)
        except MlflowException as exc:
            if not _rejected(exc):
                raise
            _log.warning("MLflow %s did not register the model of run %s as %r (%s): the model stays logged on the "
                         "run; a store without a Model Registry cannot register it", self.uri, self.run_id, name,
                         _short(exc))
            return
        self.client.set_tag(self.run_id, "genrec.registered_model", f"{name}/{version.version}")
        _log.info("model of run %s registered as models:/%s/%s", self.run_id, name, version.version)

    def _set_aside(self, item: dict[str, Any], exc: Exception) -> None:
        path = os.path.join(os.path.dirname(self.spool_path), f"tracking_rejected-{self.run_id}.jsonl")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**item, "error": str(exc)[:2000]}) + "\n")
        _log.warning("MLflow %s rejected a %r item of run %s (%s); it is kept in %s", self.uri, item["op"],
                     self.run_id, _short(exc), path)


class _SystemMetrics:
    """MLflow's system metrics through the tracker: MLflow's own monitors (``SystemMetricsMonitor``: CPU and memory
    via psutil, disk, network, NVIDIA GPUs via ``nvidia-ml-py``) sampled every ``interval_s`` on a thread, each sample
    logged as ``system/<name>`` at steps 0, 1, 2, ... (MLflow's names and steps, so the run page's System metrics
    charts show them). Through :meth:`MLflowTracker.log`, not MLflow's own logging thread: an unreachable server
    spools them like every other metric and never blocks ``close()``. A last sample is taken when it stops, so
    even a run shorter than ``interval_s`` has one."""

    def __init__(self, tracker: MLflowTracker, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker, self.interval_s = tracker, interval_s
        # Its monitors only (no request is made: its own loop, which polls the run over HTTP, never starts).
        self.monitors = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s,
                                             tracking_uri=tracker.uri).monitors
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"system-metrics-{tracker.run_id[:8]}", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self.tracker.log({f"system/{k}": v for k, v in values.items()}, self.step)
        self.step += 1

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except Exception:  # noqa: BLE001 - a monitor that fails (a GPU gone) ends the sampling, never the job
            _log.warning("system metrics of run %s stopped", self.tracker.run_id, exc_info=True)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._sample()
        except Exception:  # noqa: BLE001
            _log.debug("last system metrics sample failed", exc_info=True)


def _dataset_input(item: dict[str, Any]) -> Any:
    """An ``input`` spool item as MLflow's DatasetInput: a MetaDataset (metadata only, nothing uploaded) whose source
    MLflow resolves from the path (local, s3://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def col_type(t: str) -> Any:
        return Array(DataType[t[6:-1]]) if t.startswith("array<") else DataType[t]

    schema = Schema([ColSpec(col_type(t), n) for n, t in item["schema"].items()]) if item["schema"] else None
    with warnings.catch_warnings():  # a relative path "can be interpreted in multiple ways" (all of them local)
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(item["source"])
    d = MetaDataset(source, name=item["name"], digest=item["digest"], schema=schema).to_dict()
    entity = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                     json.dumps(item["profile"]) if item["profile"] else None)
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, item["context"])])


def _groups(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive metric items joined up to MLflow's batch cap; every other item alone."""
    group: list[dict[str, Any]] = []
    size = 0
    for item in items:
        n = len(item["metrics"]) if item["op"] == "metrics" else 0
        if group and (item["op"] != "metrics" or size + n > _MAX_METRICS):
            yield group
            group, size = [], 0
        group.append(item)
        size += n
        if item["op"] != "metrics":
            yield group
            group, size = [], 0
    if group:
        yield group


def _take(q: queue.Queue, wait: float | None) -> list[Any]:
    """The next queued item (waiting up to ``wait`` s; None: until one comes) and whatever else is queued."""
    try:
        batch = [q.get(timeout=wait)]
    except queue.Empty:
        return []
    while len(batch) < 10 * _MAX_METRICS and batch[-1] is not _CLOSE:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            break
    return batch


def _drain(q: queue.Queue) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def _rejected(exc: Exception) -> bool:
    """The server answered no (4xx other than 429), or the item itself is broken: a retry cannot help. Anything
    else (connection refused, timeout, 5xx) counts as an outage."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    code = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError (artifact uploads)
    if isinstance(code, int):
        return 400 <= code < 500 and code != 429
    return isinstance(exc, (FileNotFoundError, ValueError, TypeError, KeyError))


_env_lock = threading.Lock()
_env_users = 0
_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def _quick_requests(retries: int, timeout_s: float) -> Iterator[None]:
    """MLflow's per-request HTTP retries and timeout set small while the block runs (module docstring: mlflow
    reads them from the environment at each request and has no per-client setting). The environment is the
    process's: a request another thread makes meanwhile gets the same settings. Nested or concurrent blocks share
    the first one's values; the last to leave restores what was there."""
    global _env_users
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(round(timeout_s))))}
    with _env_lock:
        if _env_users == 0:
            _env_saved.update({k: os.environ.get(k) for k in values})
            os.environ.update(values)
        _env_users += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:
                for k, v in _env_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                _env_saved.clear()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:237] + "..."


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


def replay(path: str, uri: str | None = None, request_timeout_s: float = 30.0) -> tuple[int, str, str]:
    """Deliver the undelivered items of the spool ``path`` to its run, in order, and remove the spool.
    ``uri``: another address of the same server (default: the one the spool was written for).
    Returns (items delivered, run id, uri). Raises :class:`TrackingError` if the server cannot take them all
    (what it took is marked done; run it again)."""
    import mlflow

    header, _, _ = spool_file.read(path)
    if "run_id" not in header:
        raise TrackingError(f"{path} is not a tracking spool (no header line)")
    uri = uri or header["uri"]
    pending = spool_file.Spool(path, header)
    items = pending.pending()
    sender = _Sender(mlflow.MlflowClient(tracking_uri=uri), uri, header["run_id"], os.path.abspath(path),
                     request_timeout_s, retries=2)
    err = sender.deliver(items, lambda group: pending.ack(i["seq"] for i in group))
    if err is not None:
        raise TrackingError(f"MLflow tracking server {uri} unreachable ({_short(err)}): "
                            f"{len(pending)} of {len(items)} items are still in {path}")
    spool_file.remove(path)
    return len(items), header["run_id"], uri


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

    with _quick_requests(retries=2, timeout_s=10.0):
        mlflow.MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genrec_dist.tracking",
                                     description="Tracking items kept while the MLflow server was unreachable.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="log a spool's undelivered items to its MLflow run, then remove the spool")
    rp.add_argument("spool", nargs="+", help="tracking_spool-<run id>.jsonl (in the run dir)")
    rp.add_argument("--uri", default=None, help="the tracking server (default: the one the spool was written for)")
    args = parser.parse_args(argv)
    for path in args.spool:
        try:
            n, run_id, uri = replay(path, args.uri)
        except (TrackingError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        print(f"{path}: {n} items delivered to run {run_id} at {uri}; spool removed", flush=True)


if __name__ == "__main__":
    main()
