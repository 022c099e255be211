"""Batch recommendations on Ray Data (``jobs/recommend.py``): read a users table, ``map_batches`` the
:class:`~genrec_dist.evaluation.recommend.Recommender` over an actor pool (each actor loads the exported model once,
on a GPU when the cluster has one), write Parquet shards ``user, items[k], scores[k]`` from the workers and commit
them with a manifest (:func:`genrec_dist.storage.commit_dir`): a failed run leaves nothing at the output.

Users: the run's prepared dataset (history = each user's whole sequence, so the list is for the item after the last
one), or ``recommend.users``: a Parquet file or folder of ``user, history`` rows, local or ``s3://``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import polars as pl

from genrec_dist import storage
from genrec_dist.config import to_dict
from genrec_dist.evaluation.recommend import Recommender, RecommendInputError
from genrec_dist.runs.export import inference_overrides, read_meta
from genrec_dist.runs.rundir import open_run_dataset, read_run

OUTPUT_DIR = "recommendations"
# Users per output shard (the writer bundles the actors' batches up to this): 20M users -> ~200 files, not 20k.
ROWS_PER_FILE = 100_000
PROGRESS_EVERY_S = 10.0


def output_path(cfg: Any, run_dir: str) -> str:
    return cfg.recommend.output or storage.join(run_dir, OUTPUT_DIR)


def _tracker(cfg: Any, run_dir: str, tracking: Callable) -> Any:
    """The job's MLflow run (``tracking``: the job's tracker factory), beside the training run (its id, dir and
    model as tags; the dataset's tags when the users are the run's dataset)."""
    info = read_run(run_dir, cfg.storage) or {}
    meta = read_meta(storage.join(run_dir, "model"), cfg.storage)
    tags = {"genrec.train_run_id": str(info.get("mlflow_run_id")), "genrec.run_dir": run_dir,
            "genrec.model": meta["model"]}
    if not cfg.recommend.users:
        tags.update(open_run_dataset(cfg, info).tags())
    return tracking(cfg, "recommend", 0, run_name=f"{info.get('run_name', meta['model'])}-recommend",
                    extra_tags=tags, spool_dir=run_dir)


def _ray_path(path: str, storage_cfg: Any) -> tuple[str, Any]:
    """A path and the pyarrow filesystem Ray Data reads it with: the project's own fsspec filesystem (endpoint,
    retries and timeouts of ``storage``) for ``s3://``, Ray's default for local paths."""
    if not storage.is_remote(path):
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, fs_path = storage.filesystem(path, storage_cfg)
    return fs_path, PyFileSystem(FSSpecHandler(fs))


def read_users(cfg: Any, run_dir: str) -> tuple[Any, int, str]:
    """``(Ray dataset of user, history, path rows, number of users, description)``."""
    import ray.data

    users = cfg.recommend.users
    if not users:
        dataset = open_run_dataset(cfg, read_run(run_dir, cfg.storage) or {})
        files = [_ray_path(f, cfg.storage) for f in dataset.shard_files]
        ds = ray.data.read_parquet([p for p, _ in files], filesystem=files[0][1], include_paths=True)
        ds = ds.select_columns(["user", "items", "path"]).rename_columns({"items": "history"})
        return ds, dataset.num_users, f"dataset {dataset.path}"
    path, fs = _ray_path(users, cfg.storage)
    try:
        ds = ray.data.read_parquet(path, filesystem=fs, include_paths=True, file_extensions=["parquet"])
        names = ds.schema().names
    except (FileNotFoundError, OSError) as exc:
        raise RecommendInputError(f"recommend.users={users}: cannot read Parquet there ({exc})") from None
    missing = [c for c in ("user", "history") if c not in names]
    if missing:
        raise RecommendInputError(f"recommend.users={users}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                                  "a users table has 'user' and 'history' (list of item ids, oldest first)")
    return ds.select_columns(["user", "history", "path"]), ds.count(), f"users table {users}"


def _write_shard(batch: dict[str, Any], staging: str, storage_cfg: Any) -> dict[str, Any]:
    """Write one batch of recommendations as a Parquet shard of the staged output; returns its name and rows."""
    n = len(batch["user"])
    if n == 0:
        return {"file": np.array([], dtype=object), "rows": np.array([], dtype=np.int64)}
    df = pl.DataFrame({"user": batch["user"],
                       "items": pl.Series(np.asarray(batch["items"])).cast(pl.List(pl.Int64)),
                       "scores": pl.Series(np.asarray(batch["scores"], dtype=np.float32)).cast(pl.List(pl.Float32))})
    # Named by its users: a write task run again (Ray re-runs it when the node holding its result is lost) writes the
    # same file over itself, not a second copy of the same users.
    name = f"part-{hashlib.sha256(chr(10).join(map(str, batch['user'].tolist())).encode()).hexdigest()[:20]}.parquet"
    storage.write_bytes(storage.join(staging, name), storage.parquet_bytes(df), storage_cfg)
    return {"file": np.array([name], dtype=object), "rows": np.array([n], dtype=np.int64)}


def _stream(ds: Any, rc: Any, cpus: float, use_gpu: bool, run_dir: str, storage_cfg: Any, inference: dict,
            staging: str, total: int, start: float, log: Callable[[str], None]) -> tuple[list[str], int]:
    """One pass of the pipeline: every user through the actor pool, written as shards into ``staging``; returns the
    shards' names and the users written."""
    import ray

    # max_restarts=0: an actor lost with its node fails this pass (the job runs it again, sized to the nodes that are
    # left) instead of Ray Data restarting it on a surviving node with the CPUs the read and write tasks need there
    recs = ds.map_batches(
        Recommender, batch_size=rc.batch_size, batch_format="numpy", max_restarts=0,
        compute=ray.data.ActorPoolStrategy(size=rc.num_workers), num_gpus=1 if use_gpu else 0, num_cpus=cpus,
        fn_constructor_kwargs={"run_dir": run_dir, "k": rc.k, "exclude_seen": rc.exclude_seen,
                               "storage_cfg": storage_cfg, "inference": inference, "beam_width": rc.beam_width,
                               "device": "cuda" if use_gpu else "cpu", "threads": max(1, int(cpus))})
    written = recs.map_batches(_write_shard, batch_size=ROWS_PER_FILE, batch_format="numpy",
                               fn_kwargs={"staging": staging, "storage_cfg": storage_cfg})
    shards, done, last = [], 0, start
    for row in written.iter_rows():  # one row per shard written by a worker
        shards.append(str(row["file"]))
        done += int(row["rows"])
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            rate = done / (now - start)
            log(f"recommend: {done:,}/{total:,} users ({100 * done / max(total, 1):.0f}%), {rate:,.0f} "
                f"users/s, ETA {_duration((total - done) / rate) if rate > 0 else '?'}")
            last = now
    return shards, done


# What Ray says when a node went away under a job (its exceptions, or their text once Ray Data has wrapped them in
# one it could not deserialize): the job may run again on the nodes that are left.
_NODE_LOST = ("its node has died", "node was terminated unexpectedly", "node died", "ObjectLostError",
              "ActorDiedError", "NodeDiedError", "OwnerDiedError")


def node_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its chain) says a node of the cluster was lost."""
    import ray

    lost = (ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.ActorDiedError,
            ray.exceptions.OwnerDiedError)
    return any(isinstance(e, lost) or any(s in str(e) for s in _NODE_LOST) for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: Ray's ``RayTaskError.cause``, ``__cause__``, ``__context__``."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]


def _lost_line(exc: BaseException) -> str:
    text = str(exc)
    line = next((ln for ln in text.splitlines() if any(s in ln for s in _NODE_LOST)), text.splitlines()[0] if text
                else type(exc).__name__)
    return line.strip()[:200]


def _drop_unreported(staging: str, reported: set[str], storage_cfg: Any) -> None:
    """Remove staged files no worker reported (a write that failed half-way, or whose task was re-run with other
    batches): the output holds every user once."""
    fs, root = storage.filesystem(staging, storage_cfg)
    if fs.exists(root):
        for f in fs.ls(root, detail=False):
            if os.path.basename(f.rstrip("/")) not in reported:
                fs.rm(f, recursive=True)


def worker_cpus(cfg_cpus: float, workers: int, cluster_cpus: float, node_cpus: float) -> float:
    """CPUs one actor reserves: ``recommend.cpus_per_worker``, or (0) the cluster's CPUs but one shared among the
    actors, at most one node's; the free CPU runs the read and write tasks beside a full actor pool."""
    if cfg_cpus > 0:
        return cfg_cpus
    # at most a node's CPUs but one: on a cluster of small nodes the free CPU must be whole on some node, not half a
    # CPU on each of two (two 2-CPU nodes with 1.5-CPU actors left no node a CPU for a read task: a hang)
    return max(min((cluster_cpus - 1) / max(workers, 1), node_cpus - 1 if node_cpus >= 2 else node_cpus / 2), 0.1)


def _worker_cpus(rc: Any) -> float:
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    return worker_cpus(rc.cpus_per_worker, rc.num_workers, sum(n["Resources"].get("CPU", 0) for n in alive),
                       max((n["Resources"].get("CPU", 0) for n in alive), default=1))


def _input_error(exc: BaseException) -> str | None:
    """The message of a :class:`RecommendInputError` a worker raised, out of Ray's wrappers: the exception itself
    when it crossed the process boundary intact (``RayTaskError.cause``, ``__cause__``), else the line Ray's worker
    traceback ends it with (Ray Data wraps it in ``UserCodeException``, which keeps only the text)."""
    for e in _chain(exc):
        if type(e) is RecommendInputError:
            return str(e)
    found = re.search(rf"{RecommendInputError.__name__}: (.+)", str(exc))
    return found.group(1).strip() if found else None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_recommend(cfg: Any, run_dir: str, overrides: Sequence[str], *, tracking: Callable,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Top-``recommend.k`` items and scores for every user of the users table, committed at the output; the
    counts, users/s and the output location logged to the job's MLflow run (``tracking``: the job's tracker factory,
    e.g. ``genrec_dist.tracking.make_tracker``; the run ends FAILED when the job fails).
    ``overrides`` (the command line's) may change the exported model's inference-time fields
    (``model.car.inference=slow``), nothing else of it."""
    tracker = _tracker(cfg, run_dir, tracking)
    try:
        summary = _run(cfg, run_dir, overrides, tracker, log)
    except Exception as exc:
        tracker.close("FAILED")
        err = _input_error(exc)
        if err is not None:  # one line naming the file and user, not Ray's wrapped worker traceback
            raise RecommendInputError(err) from None
        raise
    tracker.log({k: summary[k] for k in ("users", "users_per_s", "seconds", "files")})
    tracker.close()
    return {**summary, "mlflow_run_id": tracker.run_id}


def _run(cfg: Any, run_dir: str, overrides: Sequence[str], tracker: Any, log: Callable[[str], None]
         ) -> dict[str, Any]:
    import ray

    from genrec_dist.ray_runtime import ensure_ray

    rc = cfg.recommend
    meta = read_meta(storage.join(run_dir, "model"), cfg.storage)
    inference = inference_overrides(cfg, overrides, meta["model"], run_dir, meta["model_config"][meta["model"]])
    output = output_path(cfg, run_dir)
    tracker.log_config(cfg)
    tracker.set_tags({"genrec.recommend_output": output})
    # Entered first: an existing output is refused before Ray starts; a failure below commits nothing.
    with storage.commit_dir(output, cfg.storage, overwrite=rc.overwrite) as out:
        how = ensure_ray(rc.ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours: users/s and ETA, below
        use_gpu = rc.device == "cuda" or (rc.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
        cpus = _worker_cpus(rc)
        ds, total, source = read_users(cfg, run_dir)
        # Blocks of one batch each, streamed: a read gives one block per file (or fewer), and an actor pool only
        # runs as many batches at once as there are blocks in flight (a 2-file dataset kept a 2nd actor idle).
        ds = ds.repartition(target_num_rows_per_block=rc.batch_size)
        tracker.set_tags({"genrec.users": source})
        log(f"recommend: {meta['model']} of {run_dir} -> top {rc.k} for {total:,} users of {source}, "
            f"{rc.num_workers} workers ({cpus:g} CPUs{', 1 GPU' if use_gpu else ''} each) on Ray ({how}); "
            f"exclude_seen={rc.exclude_seen}" + "".join(f", {k}={v}" for k, v in inference.items()))
        start = time.perf_counter()  # users/s counts the actors' start and model load: the job's own rate
        for attempt in range(rc.node_retries + 1):
            try:
                cpus = cpus if attempt == 0 else _worker_cpus(rc)  # the cluster that is left
                shards, done = _stream(ds, rc, cpus, use_gpu, run_dir, cfg.storage, inference, out.staging, total,
                                       start, log)
                break
            except Exception as exc:  # noqa: BLE001 - only a lost node is retried; anything else goes up as it is
                if attempt == rc.node_retries or not node_lost(exc):
                    raise
                log(f"recommend: a node of the cluster was lost ({_lost_line(exc)}); every user again, attempt "
                    f"{attempt + 2} of {rc.node_retries + 1}")
        seconds = time.perf_counter() - start
        _drop_unreported(out.staging, set(shards), cfg.storage)
        out.files += shards  # (what an s3:// commit copies)
        out.manifest = {"kind": "genrec-dist recommendations", "users": done, "files": sorted(shards),
                        "columns": {"user": "as in the users table", "items": f"list<int64> of {rc.k}, best first, "
                                    "0 = none", "scores": f"list<float32> of {rc.k}, -inf = none"},
                        "run_dir": run_dir, "model": meta["model"], "model_step": meta.get("step"),
                        "users_source": source, "inference_overrides": inference, "config": to_dict(rc)}
    rate = done / seconds if seconds > 0 else 0.0
    log(f"recommend: {done:,} users in {seconds:.1f} s ({rate:,.0f} users/s), {len(shards)} files -> {output}")
    return {"output": output, "users": done, "seconds": seconds, "users_per_s": rate, "files": len(shards)}
