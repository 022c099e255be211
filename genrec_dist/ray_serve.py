"""Online recommendations on Ray Serve (``jobs/serve.py``): a trained model behind HTTP, in replicas spread over a Ray
cluster, concurrent requests batched into one model call.

The request and response are the MLflow pyfunc's (:mod:`genrec_dist.serve_request`), so a client of ``mlflow models
serve`` works unchanged::

    POST /invocations  {"dataframe_records": [{"user": "A1", "history": [12, 7, 93]}], "params": {"k": 10}}
                    -> {"predictions": [{"user": "A1", "items": [...], "scores": [...]}]}
    GET  /ping         200 once a replica has the model loaded (liveness)
    GET  /ready        200 with the replica's model, pid and batching counts (readiness: it ranked a warm-up user)

A bad request is a 400 ``{"error_code": "INVALID_PARAMETER_VALUE", "message": "<one line>"}`` (the message is the
pyfunc's); a body that is not JSON is a 400 ``BAD_REQUEST``.

**Batching.** Each replica's :meth:`GenRecServer.rank_batch` is a ``@serve.batch`` method: requests that arrive
within ``serve.batch_wait_timeout_s`` of each other go through the model together, up to ``serve.max_batch_size``
users (a request with more users than that is one batch of its own). Every history is left-padded to the model's own
``max_history``, so a user's answer never depends on who shared its batch; requests whose ``k`` or inference settings
differ share the wait but not the model call.

**The model** is the run's export, under the settings it was exported with (a CAR run keeps the inference mode and the
``slow_weight`` chosen on validation); ``model.<name>.<field>=value`` overrides change its inference-time fields, as
for ``jobs/evaluate.py``. Sources: a run dir (local path every node sees, or ``s3://``), a run name, a training run's
MLflow run id, or an MLflow model URI (``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/...``) that
each replica downloads from the tracking store.

Started by ``jobs/serve.py`` (a local Ray, or the cluster of ``RAY_ADDRESS`` under ``ray job submit``), or by Ray
Serve's own CLI with :func:`build`::

    serve run genrec_dist.ray_serve:build run=<run dir | models:/...> [config=configs/x.yaml] [serve.num_replicas=2]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from genrec_dist import serve_request as R
from genrec_dist import storage
from genrec_dist.config import ConfigError, load_config
from genrec_dist.runs.export import inference_overrides, load_exported, read_meta
from genrec_dist.runs.find import resolve_run
from genrec_dist.runs.rundir import RunNotFoundError

MLFLOW_SCHEMES = ("models:/", "runs:/")
HAPROXY_FLAGS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")  # Ray Serve's (2.60) feature flags


@dataclass(frozen=True)
class ModelSource:
    """Where the replicas load the model from: a run dir, or an MLflow model URI of a tracking store."""

    run_dir: str = ""
    model_uri: str = ""
    tracking_uri: str = ""

    def __str__(self) -> str:
        return self.run_dir or f"{self.model_uri} ({self.tracking_uri})"


def resolve(cfg: Any, run: str, overrides: Sequence[str] = (), own_config: bool = True) -> tuple[Any, ModelSource]:
    """``(config, source)`` for ``--run``: an MLflow model URI is checked in ``tracking.uri``'s store; a run dir, run
    name or MLflow run id goes through the jobs' one resolver (:func:`genrec_dist.runs.find.resolve_run`: with
    ``own_config``, no ``--config``, the run's own saved config with ``overrides`` on top; inference overrides
    checked; the run dir absolute, and refused when relative under ``ray job submit --working-dir``)."""
    from genrec_dist.tracking import check_model, default_uri

    if run.startswith(MLFLOW_SCHEMES):
        uri = default_uri(cfg)
        try:
            check_model(uri, run)
        except KeyError as exc:
            raise RunNotFoundError(f"--run {exc.args[0]}") from None
        return cfg, ModelSource(model_uri=run, tracking_uri=uri)
    cfg, run_dir, _ = resolve_run(cfg, run, overrides, "serve", own_config)
    return cfg, ModelSource(run_dir=run_dir)


def load_model(source: ModelSource, cfg: Any, overrides: Sequence[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model of ``source`` with the inference-time ``overrides`` applied (a downloaded MLflow model is
    read from a temporary folder, removed once loaded)."""
    tmp = None
    try:
        if source.model_uri:
            from genrec_dist.tracking import download_model

            tmp = tempfile.mkdtemp(prefix="genrec-serve-")
            where, storage_cfg = os.path.join(download_model(source.tracking_uri, source.model_uri, tmp),
                                              "artifacts"), None  # the export is the MLflow model's artifacts/model
        else:
            where, storage_cfg = source.run_dir, cfg.storage
        meta = read_meta(storage.join(where, "model"), storage_cfg)
        inference = inference_overrides(cfg, overrides, meta["model"], str(source), meta["model_config"][meta["model"]])
        return load_exported(where, storage_cfg, inference)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _rows(items: list[tuple[np.ndarray, int, tuple]]) -> int:
    """A batch's size for ``@serve.batch``: users, not requests."""
    return sum(len(h) for h, _, _ in items)


def _json(status: int, body: Any) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(code: str, message: str) -> Response:
    return _json(400, {"error_code": code, "message": message})


@serve.deployment
class GenRecServer:
    """One replica: the model loaded once, HTTP requests checked one by one, ranked in batches (module docstring)."""

    def __init__(self, source: ModelSource, cfg: Any, overrides: Sequence[str] = (), threads: int = 1,
                 device: str = "cpu", max_batch_size: int = 64, batch_wait_timeout_s: float = 0.002):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_model(source, cfg, overrides)
        self.model.to(self.device)
        self.num_items = int(self.meta["num_items"])
        self.max_history = int(self.model.cfg.max_history)
        self.defaults = {"k": R.DEFAULT_K, **R.inference_params(self.model)}
        self.max_batch_size = max_batch_size
        self.rank_batch.set_max_batch_size(max_batch_size)
        self.rank_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.source = str(source)
        self.counts = {"requests": 0, "batches": 0, "users": 0, "largest_batch": 0}
        self._rank(np.ones((1, self.max_history), dtype=np.int64), 1, ())  # warm-up: /ready means it has ranked

    def _rank(self, history: np.ndarray, k: int, params: tuple) -> list[tuple[list[int], list[float]]]:
        return R.rank(self.model, torch.from_numpy(history).to(self.device), k, dict(params))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def rank_batch(self, items: list[tuple[np.ndarray, int, tuple]]) -> list[list]:
        """The requests that arrived together: one model call per distinct ``(k, inference settings)``."""
        out: list[list] = [[] for _ in items]
        groups: dict[tuple, list[int]] = {}
        for i, (_, k, params) in enumerate(items):
            groups.setdefault((k, params), []).append(i)
        for (k, params), members in groups.items():
            ranked = self._rank(np.concatenate([items[i][0] for i in members]), k, params)
            start = 0
            for i in members:
                out[i] = ranked[start:start + len(items[i][0])]
                start += len(items[i][0])
        users = _rows(items)
        self.counts["batches"] += 1
        self.counts["users"] += users
        self.counts["largest_batch"] = max(self.counts["largest_batch"], users)
        return out

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/ping"):
            return Response("\n", media_type="text/plain")
        if request.method == "GET" and path.endswith("/ready"):
            return _json(200, {"ready": True, "model": self.meta["model"], "num_items": self.num_items,
                               "source": self.source, "pid": os.getpid(), "max_batch_size": self.max_batch_size,
                               **self.counts})
        if request.method != "POST" or not path.endswith("/invocations"):
            return _json(404, {"error_code": "ENDPOINT_NOT_FOUND",
                               "message": "POST /invocations, GET /ping or GET /ready"})
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error("BAD_REQUEST", f"the request body is not JSON ({exc})")
        try:
            rows = R.records(body)
            k, params = R.check_params(body.get("params"), self.defaults, self.model, self.num_items)
            history = R.left_pad([R.check_history(r["history"], i, self.num_items) for i, r in enumerate(rows)],
                                 self.max_history).numpy()
        except R.RequestError as exc:
            return _error("INVALID_PARAMETER_VALUE", str(exc))
        self.counts["requests"] += 1
        key = tuple(sorted(params.items()))
        if len(history) > self.max_batch_size:  # already a batch of its own
            ranked = self._rank(history, k, key)
        else:
            ranked = await self.rank_batch((history, k, key))
        users = [r.get("user") for r in rows] if any("user" in r for r in rows) else None
        return _json(200, R.predictions(users, ranked))


def application(cfg: Any, source: ModelSource, overrides: Sequence[str] = ()) -> Any:
    """The Serve application of ``source`` under ``cfg.serve`` (replicas, resources, batching)."""
    sc = cfg.serve
    if sc.max_batch_size < 1 or sc.num_replicas < 1 or sc.batch_wait_timeout_s < 0:
        raise ConfigError(f"serve.max_batch_size and serve.num_replicas must be >= 1, serve.batch_wait_timeout_s >= 0;"
                          f" got {sc.max_batch_size}, {sc.num_replicas}, {sc.batch_wait_timeout_s}")
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
        "max_ongoing_requests": max(sc.max_ongoing_requests, sc.max_batch_size),
        "logging_config": {"enable_access_log": sc.access_log}}
    if sc.max_replicas > sc.num_replicas:
        options["autoscaling_config"] = {"min_replicas": sc.num_replicas, "max_replicas": sc.max_replicas,
                                         "target_ongoing_requests": sc.max_batch_size}
    else:
        options["num_replicas"] = sc.num_replicas
    return GenRecServer.options(**options).bind(
        source, cfg, list(overrides), threads=max(1, int(sc.cpus_per_replica)),
        device="cuda" if sc.gpus_per_replica > 0 else "cpu", max_batch_size=sc.max_batch_size,
        batch_wait_timeout_s=sc.batch_wait_timeout_s)


def build(args: dict[str, str]) -> Any:
    """The application for ``serve run genrec_dist.ray_serve:build run=... [config=...] [key=value ...]`` (Ray
    Serve's application builder: its ``key=value`` arguments come here as a dict; bare keys are ``serve.*``)."""
    args = dict(args)
    if "run" not in args:
        raise ConfigError("serve run genrec_dist.ray_serve:build needs run=<run dir | run name | MLflow run id | "
                          "models:/name/version>")
    run, config = args.pop("run"), args.pop("config", None)
    overrides = [f"{k}={v}" for k, v in args.items()]
    cfg = load_config(config, overrides, default_section="serve")
    cfg, source = resolve(cfg, run, overrides, own_config=config is None)
    return application(cfg, source, overrides)


def start(cfg: Any, source: ModelSource, overrides: Sequence[str] = (), log: Any = print) -> tuple[str, bool]:
    """Deploy the application on Ray (``serve.ray_address``, ``RAY_ADDRESS``, or a new local Ray) with Serve's HTTP
    ingress on ``serve.host:serve.port`` and wait until its replicas are up; returns the URL of ``/invocations`` and
    whether the Ray is a local one this process started (it ends with the process)."""
    import ray

    from genrec_dist.ray_runtime import ensure_ray

    sc = cfg.serve
    local = not ray.is_initialized() and not (sc.ray_address or os.environ.get("RAY_ADDRESS"))
    if local and sc.haproxy:  # read by the controller, proxies and replicas of the Ray started next (their env)
        os.environ.update({flag: "1" for flag in HAPROXY_FLAGS})
    how = ensure_ray(sc.ray_address)
    ingress = ("HAProxy" if all(os.environ.get(f) == "1" for f in HAPROXY_FLAGS) else "Serve's proxy") if local \
        else "the cluster's"
    # (the proxies' access log too: a line per request costs a busy server CPU it needs for ranking)
    serve.start(http_options={"host": sc.host, "port": sc.port}, logging_config={"enable_access_log": sc.access_log})
    began = time.perf_counter()
    serve.run(application(cfg, source, overrides), name=sc.app_name, route_prefix=sc.route_prefix, blocking=False)
    host = "127.0.0.1" if sc.host in ("0.0.0.0", "::") else sc.host
    url = f"http://{host}:{sc.port}{sc.route_prefix.rstrip('/')}/invocations"
    replicas = f"{sc.num_replicas}..{sc.max_replicas}" if sc.max_replicas > sc.num_replicas else str(sc.num_replicas)
    log(f"serve: {source} on Ray ({how}, {ray.cluster_resources().get('CPU', 0):g} CPUs, {ingress} ingress): "
        f"{replicas} replica(s) of "
        f"{sc.cpus_per_replica:g} CPU{f', {sc.gpus_per_replica:g} GPU' if sc.gpus_per_replica else ''} each, "
        f"batches of up to {sc.max_batch_size} users within {sc.batch_wait_timeout_s * 1000:g} ms; up in "
        f"{time.perf_counter() - began:.1f} s")
    return url, local
