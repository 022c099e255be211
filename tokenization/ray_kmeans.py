"""Residual k-means on Ray: one actor per shard of rows (on its GPU when there is one); the driver loop is
:func:`tokenization.kmeans.residual_kmeans`, and every Lloyd step is one map over the actors and one reduce here.

Given embedding shard files (``[(file, rows)]``, see ``tokenization.embedding_store``), each actor reads its own
rows (:func:`~tokenization.embedding_store.shards_for` of its rank) and keeps their residuals from level to level;
the driver sends centroids and receives per-cluster sums / counts / inertia, the seeding sample and the codes.
"""

from __future__ import annotations

import math
import socket
from typing import Any, Callable

import numpy as np
import ray

from tokenization.embedding_store import EmbeddingError, read_rows, shards_for
from tokenization.kmeans import (KMeansError, KMeansParams, KMeansShard, ResidualResult, check_finite,
                                 residual_kmeans, split_rows)
from tokenization.progress import Progress


class FileShard(KMeansShard):
    """A k-means shard that reads its own rows (rank ``rank`` of ``world_size`` over ``files``) in :meth:`load`,
    inside the actor: the vectors never pass through the driver or its object store."""

    def __init__(self, files: list[tuple[str, int]], rank: int, world_size: int, storage_cfg: Any = None,
                 backend: str = "numpy", device: str | None = None):
        self.slices = shards_for(files, rank, world_size)
        self.rank, self.storage_cfg, self._args = rank, storage_cfg, (backend, device)

    def load(self) -> dict:
        rows, x = read_rows(self.slices, self.storage_cfg)
        super().__init__(x, rows, *self._args, give=True)  # its own read: the first level's float32 copy
        return self.where()

    def where(self) -> dict:
        """Which node read which files: {rank, node (Ray node id), host, files, rows}."""
        return {"rank": self.rank, "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "files": [s.file for s in self.slices], "rows": int(self.x.shape[0])}


def ray_residual_kmeans(
    x: np.ndarray | list[tuple[str, int]],
    levels: int,
    params: KMeansParams,
    dedup: bool = False,
    num_workers: int = 2,
    use_gpu: bool | None = None,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
    storage_cfg: Any = None,
    collision_free: bool = False,
) -> ResidualResult:
    """L x K residual k-means over ``num_workers`` actors, each holding a contiguous row shard of ``x``: an
    (N, D) array in this process, or embedding shard files ``[(file, rows)]`` the actors read themselves
    (``storage_cfg`` for s3). With files, ``stats["readers"]`` says which node read which files. ``collision_free``
    and ``params.balance``: see :func:`~tokenization.kmeans.residual_kmeans` (their per-row work is on the actors,
    the decisions on the driver).

    ``backend`` "auto": torch on GPU actors, the numpy reference on CPU actors. The codes are the same for any
    ``num_workers`` (see the module docstring of ``tokenization.kmeans``)."""
    from_files = isinstance(x, list)
    if not from_files:
        x = np.asarray(x)
        check_finite(x)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    n = sum(r for _, r in x) if from_files else x.shape[0]
    num_workers = max(1, min(num_workers, n))  # no empty shards
    gpus = ray.cluster_resources().get("GPU", 0.0) >= 1 if use_gpu is None else use_gpu
    if backend == "auto":
        backend = "torch" if gpus else "numpy"
    # An equal share of the CPUs (whole CPUs when there are enough: Ray sizes the actor's BLAS threads by it, and
    # no more than one node has), fractional when the workers outnumber the CPUs; SPREAD puts actors on
    # different nodes of a cluster.
    share = ray.cluster_resources().get("CPU", 1.0) / num_workers
    node_max = max((nd["Resources"].get("CPU", 0.0) for nd in ray.nodes() if nd["Alive"]), default=1.0)
    share = min(share, node_max)
    opts = dict(num_cpus=math.floor(share) if share >= 1 else share, num_gpus=1 if gpus else 0,
                scheduling_strategy="SPREAD")
    device = "cuda" if gpus else None
    readers = None
    if from_files:
        actors = [ray.remote(FileShard).options(**opts).remote(x, r, num_workers, storage_cfg, backend, device)
                  for r in range(num_workers)]
    else:
        actors = [ray.remote(KMeansShard).options(**opts).remote(ray.put(xs), rows, backend, device)
                  for xs, rows in split_rows(x, num_workers)]

    def call(method: str, *args):
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # one copy per step, not per actor
        return ray.get([getattr(a, method).remote(*refs) for a in actors])

    try:
        if from_files:
            reading = Progress("read embedding rows:", n, log, unit="rows")
            pending = {a.load.remote(): a for a in actors}
            readers = []
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                pending.pop(done)
                readers.append(ray.get(done))
                reading.add(readers[-1]["rows"])
            readers.sort(key=lambda r: r["rank"])
        result = residual_kmeans(call, levels, params, dedup, log, collision_free)
    except ray.exceptions.RayTaskError as exc:  # bad input found in an actor: its own one-line error
        if isinstance(exc.cause, (EmbeddingError, KMeansError)):
            raise exc.cause from None
        raise
    finally:
        for a in actors:
            ray.kill(a)
    if readers is not None:
        result.stats["readers"] = readers
    return result
