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


# A shard whose worker is lost more often than this fails the job (one clear error) instead of being replaced again.
MAX_REPLACEMENTS = 3
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)  # its worker, or the node it ran on, is gone


class Shards:
    """The k-means actors, one per shard of rows, and what replaces a lost one.

    A shard's state is its rows' residuals, changed only by :meth:`FileShard.load` and ``advance`` (the end of a
    level), both deterministic given their arguments. Every other call (a Lloyd step's partial sums, labels,
    samples) reads that state. So when an actor dies, with its worker or with its whole node, a new actor is made
    for the same shard (on a node that is still there), the changing calls are replayed on it in order, and the
    call that failed is sent again to that shard alone: the codes are the same as without the loss. A shard lost
    more than :data:`MAX_REPLACEMENTS` times fails the job with a :class:`KMeansError` naming it."""

    MUTATING = ("load", "advance")

    def __init__(self, make: Callable[[int, bool], Any], world_size: int, log: Callable[[str], None] | None = None):
        self.make, self.log = make, log
        self.actors = [make(r, False) for r in range(world_size)]
        self.journal: list[tuple[str, tuple]] = []  # the changing calls so far, their arguments as object refs
        self.lost = [0] * world_size

    def call(self, method: str, *args, on_result: Callable[[Any], None] | None = None) -> list:
        """``method(*args)`` on every shard; the results in shard order (``on_result`` sees each as it arrives)."""
        refs = tuple(ray.put(a) if isinstance(a, np.ndarray) else a for a in args)  # one copy, not one per actor
        out: list = [None] * len(self.actors)
        pending = {getattr(a, method).remote(*refs): r for r, a in enumerate(self.actors)}
        if on_result is None:  # every Lloyd step: one get for all shards; shard by shard only once one was lost
            try:
                out, pending = ray.get(list(pending)), {}
            except _LOST:
                pass  # the shards that answered are fetched again below from their results, not run again
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ref)
            try:
                out[r] = ray.get(ref)
            except _LOST as exc:
                self._replace(r, exc)
                pending[getattr(self.actors[r], method).remote(*refs)] = r
                continue
            if on_result:
                on_result(out[r])
        if method in self.MUTATING:
            self.journal.append((method, refs))
        return out

    def _replace(self, r: int, exc: BaseException) -> None:
        """A new actor for shard ``r``, brought to the others' state by replaying :attr:`journal`."""
        while True:
            self.lost[r] += 1
            if self.lost[r] > MAX_REPLACEMENTS:
                raise KMeansError(f"k-means shard {r} of {len(self.actors)} lost its worker {self.lost[r]} times "
                                  f"(last: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the cluster has "
                                  "no node that keeps it: rerun tokenize once the cluster is whole") from None
            if self.log:
                self.log(f"k-means shard {r}: its worker was lost ({type(exc).__name__}); a new one replays "
                         f"{len(self.journal)} calls")
            try:
                ray.kill(self.actors[r], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            self.actors[r] = self.make(r, True)
            try:
                for method, refs in self.journal:
                    ray.get(getattr(self.actors[r], method).remote(*refs))
                return
            except _LOST as again:  # lost again while catching up
                exc = again

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass


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
    the decisions on the driver). A worker lost with its node is replaced (:class:`Shards`): the same codes.

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
    # A replacement reserves no CPU: the lost node's CPUs are gone with it, and a replacement that waited for them
    # would wait for a node that may never come back; it shares a surviving node's.
    again = {**opts, "num_cpus": 0}
    device = "cuda" if gpus else None
    readers = None
    pieces = None if from_files else [(ray.put(xs), rows) for xs, rows in split_rows(x, num_workers)]

    def make(r: int, replacement: bool) -> Any:
        o = again if replacement else opts
        if from_files:
            return ray.remote(FileShard).options(**o).remote(x, r, num_workers, storage_cfg, backend, device)
        return ray.remote(KMeansShard).options(**o).remote(pieces[r][0], pieces[r][1], backend, device)

    shards = Shards(make, num_workers, log)
    try:
        if from_files:
            reading = Progress("read embedding rows:", n, log, unit="rows")
            readers = sorted(shards.call("load", on_result=lambda got: reading.add(got["rows"])),
                             key=lambda r: r["rank"])
        result = residual_kmeans(shards.call, levels, params, dedup, log, collision_free)
    except ray.exceptions.RayTaskError as exc:  # bad input found in an actor: its own one-line error
        if isinstance(exc.cause, (EmbeddingError, KMeansError)):
            raise exc.cause from None
        raise
    finally:
        shards.close()
    if readers is not None:
        result.stats["readers"] = readers
    if any(shards.lost):
        result.stats["workers_replaced"] = {str(r): k for r, k in enumerate(shards.lost) if k}
    return result
