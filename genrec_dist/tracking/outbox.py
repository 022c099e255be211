"""The outbox of an MLflow run: calls only queue items; one background thread delivers them in order; what the
server does not take waits in a spool file (:mod:`genrec_dist.spool`) and is delivered once it answers, or later by
``python -m genrec_dist.tracking replay <spool>`` (:func:`replay`). The package docstring tells the whole story."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from genrec_dist import spool as spool_file
from genrec_dist.tracking.base import TrackingError
from genrec_dist.tracking.failures import rejected, short
from genrec_dist.tracking.model_items import dataset_input, log_saved_model

# MLflow's caps per log_batch request (mlflow.utils.validation.MAX_METRICS_PER_BATCH / MAX_PARAMS_TAGS_PER_BATCH).
_MAX_METRICS, _MAX_PARAMS = 1000, 100
_RETRY_MIN_S = 0.5
_CLOSE = object()  # queue sentinel: close() asks the delivery thread to finish
_log = logging.getLogger("genrec_dist.tracking")


class Outbox:
    """The queue, delivery thread and spool of one run (:class:`~genrec_dist.tracking.mlflow_client.MLflowTracker`
    is one). :meth:`_open_outbox` starts it once the run exists; :meth:`_put` queues an item; :meth:`_finish` waits
    up to ``flush_timeout_s`` and leaves what is undelivered in the spool."""

    def _open_outbox(self, client: Any, uri: str, run_id: str, spool_dir: str | None, flush_timeout_s: float,
                     request_timeout_s: float, retry_max_s: float) -> None:
        self.uri, self.run_id = uri, run_id
        self.flush_timeout_s, self.request_timeout_s = flush_timeout_s, request_timeout_s
        self.retry_max_s = max(retry_max_s, _RETRY_MIN_S)
        path = os.path.join(spool_dir or os.path.join(tempfile.gettempdir(), "genrec-dist"),
                            f"tracking_spool-{run_id}{spool_file.SUFFIX}")
        self.spool_path = os.path.abspath(path)
        self._spool = spool_file.Spool(self.spool_path, {"uri": uri, "run_id": run_id})
        self._sender = _Sender(client, uri, run_id, self.spool_path, request_timeout_s)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the spool, _inflight and _abandoned between the two threads
        self._inflight: list[dict[str, Any]] = []  # taken off the queue, not yet delivered nor spooled
        self._abandoned = False  # close() gave up on the thread and took over the spool
        self._closed = False
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._deliver_forever, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)  # a job that dies of an exception still flushes what it logged

    def _put(self, item: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"MLflow tracker of run {self.run_id} is closed")
        self._queue.put(item)

    def _at_exit(self) -> None:
        if not self._closed:
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
                         "are kept in %s and delivered in order when the server is back.", self.uri, short(err),
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
                    if not rejected(exc):
                        return exc
                    for item in group:  # one of them is bad: the others still go
                        try:
                            self._send([item])
                        except Exception as one:  # noqa: BLE001
                            if not rejected(one):
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
            self.client.log_inputs(self.run_id, datasets=[dataset_input(item)])
        elif op == "model":
            path = os.path.join(os.path.dirname(self.spool_path), item["files"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the model's copy beside the spool is gone")
            log_saved_model(self, path, item["registered_name"], item["step"])
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        elif op == "terminate":
            self.client.set_terminated(self.run_id, status=item["status"], end_time=item["end_time"])
        else:
            raise ValueError(f"unknown tracking item {op!r}")

    def _set_aside(self, item: dict[str, Any], exc: Exception) -> None:
        path = os.path.join(os.path.dirname(self.spool_path), f"tracking_rejected-{self.run_id}.jsonl")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**item, "error": str(exc)[:2000]}) + "\n")
        _log.warning("MLflow %s rejected a %r item of run %s (%s); it is kept in %s", self.uri, item["op"],
                     self.run_id, short(exc), path)


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


_env_lock = threading.Lock()


@contextlib.contextmanager
def _quick_requests(retries: int, timeout_s: float) -> Iterator[None]:
    """MLflow's per-request HTTP retries and timeout set small for this process (module docstring: mlflow reads them
    from the environment at each request and has no per-client setting), before the block runs.

    They are set, never removed again: removing an environment variable while another thread copies
    ``os.environ`` (botocore does at every S3 request, e.g. a checkpoint upload beside the delivery thread) raised
    ``KeyError`` in that thread. Only the tracker's own requests go to MLflow in a job, and all of them want these
    small values; a block with other values replaces them (a key that exists changes value in place, which no
    concurrent reader of ``os.environ`` trips over)."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(round(timeout_s))))}
    with _env_lock:
        for k, v in values.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
    yield


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
        raise TrackingError(f"MLflow tracking server {uri} unreachable ({short(err)}): "
                            f"{len(pending)} of {len(items)} items are still in {path}")
    spool_file.remove(path)
    return len(items), header["run_id"], uri
