"""Residual k-means on Ray: one actor per shard of rows (on its GPU when there is one); the driver loop is
:func:`tokenization.kmeans.residual_kmeans`, and every Lloyd step is one map over the actors and one reduce here.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import ray

from tokenization.kmeans import (KMeansParams, KMeansShard, ResidualResult, check_finite, residual_kmeans,
                                 split_rows)


def ray_residual_kmeans(
    x: np.ndarray,
    levels: int,
    params: KMeansParams,
    dedup: bool = False,
    num_workers: int = 2,
    use_gpu: bool | None = None,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
) -> ResidualResult:
    """L x K residual k-means of ``x`` (N, D) over ``num_workers`` actors, each holding a contiguous row shard.

    ``backend`` "auto": torch on GPU actors, the numpy reference on CPU actors. The codes are the same for any
    ``num_workers`` (see the module docstring of ``tokenization.kmeans``)."""
    x = np.asarray(x)
    check_finite(x)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    gpus = ray.cluster_resources().get("GPU", 0.0) >= 1 if use_gpu is None else use_gpu
    if backend == "auto":
        backend = "torch" if gpus else "numpy"
    # An equal share of the CPUs (whole CPUs when there are enough: Ray sizes the actor's BLAS threads by it, and
    # no more than one node has), fractional when the workers outnumber the CPUs; SPREAD puts actors on
    # different nodes of a cluster.
    share = ray.cluster_resources().get("CPU", 1.0) / num_workers
    node_max = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    share = min(share, node_max)
    actor_cls = ray.remote(KMeansShard).options(
        num_cpus=math.floor(share) if share >= 1 else share, num_gpus=1 if gpus else 0,
        scheduling_strategy="SPREAD")
    actors = [actor_cls.remote(ray.put(xs), rows, backend, "cuda" if gpus else None)
              for xs, rows in split_rows(x, num_workers)]

    def call(method: str, *args):
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # one copy per step, not per actor
        return ray.get([getattr(a, method).remote(*refs) for a in actors])

    try:
        return residual_kmeans(call, levels, params, dedup, log)
    finally:
        for a in actors:
            ray.kill(a)
