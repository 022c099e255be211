"""Residual (hierarchical) k-means as pure functions over shards of rows: numpy reference and torch path.

The driver never needs all rows in one place. Every row lives in exactly one :class:`KMeansShard` (a slice of the
embedding matrix with its *global* row indices); the driver talks to the shards through one function
``call(method, *args) -> [result per shard]`` (plain method calls here, Ray actor calls in ``ray_kmeans.py``).
One Lloyd step = one map (:meth:`KMeansShard.partial`: per-cluster sums / counts / inertia in float64) and one
reduce (:func:`reduce_partials`) + :func:`update` on the driver.

Why the codes do not depend on how rows are split (tested: 1 vs 3 Ray workers, numpy vs torch):
- seeding is k-means++ on the driver over a sample of rows chosen by global index from ``(seed, level)``
  (:func:`sample_rows`), fetched from whichever shard holds them; never "per worker";
- statistics are sums, accumulated in float64, so a split changes them only by float64 rounding (~1e-16);
- empty-cluster re-seeding is a rule over global quantities (:func:`update`): the empty clusters, in index order,
  take the rows farthest from their assigned centroid (largest squared distance, ties to the lower global row),
  and each donor cluster loses that row from its sums (as scikit-learn's ``_relocate_empty_clusters``);
- ties in the nearest-centroid search go to the lower centroid index in both numpy and torch.

Residual k-means (UNGER §3.3.5, Eq. 6-9; TIGER §3.1 with k-means in place of RQ-VAE): level l clusters the residuals
left by levels < l, assigns every row to its nearest centroid and subtracts it. An optional last level
(:func:`dedup_level`) numbers the items that share a full code, making codes unique (TIGER §3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# Rows per distance block: bounds the (rows, K) distance matrix to ~64 MiB at K = 256 in float64.
_BLOCK = 32768


class KMeansError(ValueError):
    """Input k-means cannot run on (K > N, NaN/inf, empty shards); the message says which."""


@dataclass
class KMeansParams:
    """Per-level Lloyd settings. Stop when the inertia improves by less than ``tol`` (relative) or after
    ``max_iters`` steps. k-means++ runs on a sample of ``seed_sample`` rows (0: ``max(10_000, 64 K)``)."""

    k: int
    max_iters: int = 50
    tol: float = 1e-4
    seed: int = 0
    seed_sample: int = 0


@dataclass
class Partial:
    """One shard's statistics for one Lloyd step (at the current centroids)."""

    sums: np.ndarray  # (K, D) float64, sum of the rows assigned to each cluster
    counts: np.ndarray  # (K,) int64
    inertia: float  # sum of squared distances to the assigned centroid


@dataclass
class LevelStats:
    level: int
    k: int
    iterations: int
    converged: bool
    inertia: float
    used: int
    utilisation: float
    empty_reseeded: int
    history: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# array backends: the numpy reference and the torch path do the same float64 arithmetic
# ----------------------------------------------------------------------------------------------------------------

def check_finite(x: np.ndarray, rows: np.ndarray | None = None, where: str = "embeddings") -> None:
    """Refuse NaN/inf, naming the first bad row (its global index when ``rows`` is given)."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(rows[i]) if rows is not None else i
        raise KMeansError(f"{where}: row {row} has a NaN or infinite value ({int(bad.sum())} bad rows in all); "
                          f"k-means needs finite vectors")


class KMeansShard:
    """A slice of rows (their residuals) plus the per-shard half of every k-means step.

    ``x`` (n, D) any float dtype, kept as float64; ``rows`` (n,) the global row indices. ``backend`` "numpy" or
    "torch" (``device`` e.g. "cuda" for the torch path; on a GPU actor the shard lives in GPU memory).
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray, backend: str = "numpy", device: str | None = None):
        x = np.asarray(x)
        rows = np.asarray(rows, dtype=np.int64)
        if x.ndim != 2 or x.shape[0] != rows.shape[0]:
            raise KMeansError(f"shard: {x.shape} rows for {rows.shape[0]} indices")
        check_finite(x, rows)
        self.rows = rows
        self.backend = backend
        if backend == "numpy":
            self.x = np.array(x, dtype=np.float64, order="C", copy=True)  # advanced in place: never the caller's
            self._x_sq = (self.x * self.x).sum(1)  # (n,) row norms, reused by every Lloyd step of a level
        elif backend == "torch":
            import torch

            self._torch = torch
            self.device = torch.device(device or "cpu")
            self.x = torch.tensor(np.asarray(x, dtype=np.float64), device=self.device)  # a copy
            self._x_sq = (self.x * self.x).sum(1)
        else:
            raise KMeansError(f"unknown k-means backend {backend!r} (numpy, torch)")

    # --- shape ---
    def info(self) -> tuple[int, int]:
        return int(self.x.shape[0]), int(self.x.shape[1])

    # --- nearest centroid ---
    def _assign(self, c: np.ndarray) -> tuple[Any, Any]:
        """Labels (n,) and squared distances (n,) to the nearest centroid, in blocks of rows."""
        if self.backend == "numpy":
            c_sq = (c * c).sum(1)
            labels = np.empty(self.x.shape[0], dtype=np.int64)
            dist = np.empty(self.x.shape[0], dtype=np.float64)
            for s in range(0, self.x.shape[0], _BLOCK):
                xb = self.x[s:s + _BLOCK]  # (b, D)
                d = self._x_sq[s:s + _BLOCK, None] - 2.0 * (xb @ c.T) + c_sq[None, :]  # (b, K)
                labels[s:s + _BLOCK] = d.argmin(1)  # first minimum: ties -> lower centroid index
                dist[s:s + _BLOCK] = np.maximum(d[np.arange(len(xb)), labels[s:s + _BLOCK]], 0.0)
            return labels, dist
        torch = self._torch
        ct = torch.as_tensor(c, device=self.device)
        c_sq = (ct * ct).sum(1)
        labels, dist = [], []
        for s in range(0, self.x.shape[0], _BLOCK):
            xb = self.x[s:s + _BLOCK]
            d = self._x_sq[s:s + _BLOCK, None] - 2.0 * (xb @ ct.T) + c_sq[None, :]
            lb = d.argmin(1)  # torch also returns the first minimal index
            labels.append(lb)
            dist.append(d.gather(1, lb[:, None])[:, 0].clamp_min(0.0))
        if not labels:
            return torch.zeros(0, dtype=torch.int64, device=self.device), torch.zeros(0, dtype=torch.float64,
                                                                                       device=self.device)
        return torch.cat(labels), torch.cat(dist)

    def partial(self, centroids: np.ndarray) -> Partial:
        """Map step: per-cluster sums/counts and inertia of this shard at ``centroids`` (K, D)."""
        k, d = centroids.shape
        labels, dist = self._assign(centroids)
        if self.backend == "numpy":
            counts = np.bincount(labels, minlength=k).astype(np.int64)
            sums = np.zeros((k, d), dtype=np.float64)
            _segment_sum(sums, labels, self.x)
            return Partial(sums, counts, float(dist.sum()))
        torch = self._torch
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros((k, d), dtype=torch.float64, device=self.device).index_add_(0, labels, self.x)
        return Partial(sums.cpu().numpy(), counts.cpu().numpy().astype(np.int64), float(dist.sum().item()))

    def farthest(self, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This shard's ``m`` rows farthest from their nearest centroid: (dist, global rows, labels, vectors)."""
        labels, dist = self._assign(centroids)
        if self.backend == "torch":
            labels, dist = labels.cpu().numpy(), dist.cpu().numpy()
        # Sort by distance descending, then global row ascending: the same order the driver merges with.
        order = np.lexsort((self.rows, -dist))[:m]
        vecs = self.x[order] if self.backend == "numpy" else self.x[self._torch.as_tensor(order)].cpu().numpy()
        return dist[order], self.rows[order], labels[order], np.asarray(vecs)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The current residuals of those of ``rows`` (global, sorted) held here: (rows present, vectors)."""
        mask = np.isin(self.rows, rows)
        idx = np.flatnonzero(mask)
        vecs = self.x[idx] if self.backend == "numpy" else self.x[self._torch.as_tensor(idx)].cpu().numpy()
        return self.rows[idx], np.asarray(vecs)

    def advance(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """End of a level: assign, subtract the centroid (residual for the next level). Returns
        (global rows, labels, sum of squared residual norms after the subtraction)."""
        labels, _ = self._assign(centroids)
        if self.backend == "numpy":
            self.x -= centroids[labels]
            self._x_sq = (self.x * self.x).sum(1)
            return self.rows, labels, float(self._x_sq.sum())
        torch = self._torch
        self.x -= torch.as_tensor(centroids, device=self.device)[labels]
        self._x_sq = (self.x * self.x).sum(1)
        return self.rows, labels.cpu().numpy(), float(self._x_sq.sum().item())

    def energy(self) -> float:
        """Sum of squared norms of the current residuals (of the raw rows before level 0)."""
        return float(self._x_sq.sum()) if self.backend == "numpy" else float(self._x_sq.sum().item())


def _segment_sum(out: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    """``out[labels[i]] += x[i]`` by sorting (np.add.at is slow on many rows); stable, so deterministic."""
    if len(labels) == 0:
        return
    order = np.argsort(labels, kind="stable")
    sl = labels[order]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
    out[sl[starts]] += np.add.reduceat(x[order], starts, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# driver side: seeding, reduce, update
# ----------------------------------------------------------------------------------------------------------------

Call = Callable[..., list]  # call(method_name, *args) -> one result per shard, in shard order


def local_call(shards: Sequence[KMeansShard]) -> Call:
    """The ``call`` for shards in this process."""
    return lambda method, *args: [getattr(s, method)(*args) for s in shards]


def sample_rows(n: int, size: int, seed: int, level: int) -> np.ndarray:
    """Sorted global rows for seeding: a function of (n, size, seed, level) only, never of the shards."""
    rng = np.random.default_rng([seed, level, 1])
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def kmeans_pp(x: np.ndarray, k: int, seed: int, level: int = 0) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; 2 + ln k local trials as scikit-learn) on ``x`` (n, D).

    Deterministic for (x, k, seed, level). When every remaining row already coincides with a centroid (duplicate
    rows) the next centroid is the lowest-index row not chosen yet, so K centroids always come back.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if k > n:
        raise KMeansError(f"k-means++: K={k} centroids from {n} rows")
    rng = np.random.default_rng([seed, level, 2])
    trials = 2 + int(math.log(k)) if k > 1 else 1
    x_sq = (x * x).sum(1)  # (n,) once: every step below needs distances from a few rows to all rows

    def dist_to(idx: np.ndarray) -> np.ndarray:  # (len(idx), n)
        return np.maximum(x_sq[idx][:, None] - 2.0 * (x[idx] @ x.T) + x_sq[None, :], 0.0)

    chosen = [int(rng.integers(n))]
    closest = dist_to(np.array(chosen))[0]  # (n,)
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    for _ in range(1, k):
        pot = closest.sum()
        if pot <= 0.0:
            nxt = int(np.flatnonzero(~taken)[0])
            closest = np.minimum(closest, dist_to(np.array([nxt]))[0])
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=trials) * pot)
            cand = np.minimum(cand, n - 1)
            d = np.minimum(closest[None, :], dist_to(cand))  # (trials, n)
            best = int(np.argmin(d.sum(1)))
            nxt = int(cand[best])
            closest = d[best]
        chosen.append(nxt)
        taken[nxt] = True
    return x[chosen].copy()


def reduce_partials(parts: Sequence[Partial]) -> Partial:
    """Reduce step: sum the shards' statistics (in shard order)."""
    sums = np.zeros_like(parts[0].sums)
    counts = np.zeros_like(parts[0].counts)
    inertia = 0.0
    for p in parts:
        sums += p.sums
        counts += p.counts
        inertia += p.inertia
    return Partial(sums, counts, inertia)


def update(stats: Partial, centroids: np.ndarray, call: Call | None = None) -> tuple[np.ndarray, int]:
    """New centroids from reduced statistics; returns (centroids (K, D), number of empty clusters re-seeded).

    Re-seeding rule (deterministic, split-independent): empty clusters j_1 < j_2 < ... take the rows farthest
    from their nearest centroid, farthest first (ties: lower global row), one row each; the donor cluster's sums
    and count lose that row. Needs ``call`` to fetch the candidates from the shards (only when a cluster is empty).
    """
    sums, counts = stats.sums.copy(), stats.counts.copy()
    empty = np.flatnonzero(counts == 0)
    if len(empty) and call is not None:
        m = len(empty)
        got = call("farthest", centroids, m)
        dist = np.concatenate([g[0] for g in got])
        rows = np.concatenate([g[1] for g in got])
        labels = np.concatenate([g[2] for g in got])
        vecs = np.concatenate([g[3] for g in got])
        order = np.lexsort((rows, -dist))[:m]
        for j, i in zip(empty, order):
            donor = labels[i]
            if counts[donor] > 1:  # never empty the donor; a lone row just gets copied
                sums[donor] -= vecs[i]
                counts[donor] -= 1
            sums[j] = vecs[i]
            counts[j] = 1
    new = centroids.copy()
    nz = counts > 0
    new[nz] = sums[nz] / counts[nz, None]
    return new, int(len(empty)) if call is not None else 0


def fit_level(call: Call, n: int, params: KMeansParams, level: int = 0) -> tuple[np.ndarray, LevelStats]:
    """Lloyd's algorithm on the shards' current residuals; returns the codebook (K, D) and its stats.

    The level is *not* advanced (see :func:`residual_kmeans`)."""
    k = params.k
    if k < 1 or params.max_iters < 1:
        raise KMeansError(f"K and max_iters must be >= 1, got K={k}, max_iters={params.max_iters}")
    if k > n:
        raise KMeansError(f"K={k} clusters is more than the {n} points to cluster; lower tokenize.codebook_size")
    size = params.seed_sample or max(10_000, 64 * k)
    rows = sample_rows(n, max(size, k), params.seed, level)
    got = call("take", rows)
    sample_rows_got = np.concatenate([g[0] for g in got])
    sample = np.concatenate([g[1] for g in got])
    sample = sample[np.argsort(sample_rows_got, kind="stable")]  # global order, whatever the split
    centroids = kmeans_pp(sample, k, params.seed, level)
    history: list[float] = []
    reseeded = 0
    converged = False
    it = 0
    for it in range(1, params.max_iters + 1):
        stats = reduce_partials(call("partial", centroids))
        history.append(stats.inertia)
        centroids, r = update(stats, centroids, call)
        reseeded += r
        if len(history) > 1 and r == 0:
            prev, cur = history[-2], history[-1]
            if prev - cur <= params.tol * max(cur, 1e-300):
                converged = True
                break
    counts = reduce_partials(call("partial", centroids)).counts
    used = int((counts > 0).sum())
    return centroids, LevelStats(level, k, it, converged, float(history[-1]), used, used / k, reseeded, history)


def dedup_level(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """The de-duplication level (TIGER §3.1): for each row, its index among the earlier rows with the same full
    code (0 for the first). Returns ((N,) int64, size = largest group); codes + this column are unique."""
    codes = np.asarray(codes)
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), 1
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(inverse, kind="stable")  # groups, rows in original order inside each group
    g = inverse[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank_sorted = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    extra = np.empty_like(rank_sorted)
    extra[order] = rank_sorted
    return extra.astype(np.int64), int(extra.max()) + 1


@dataclass
class ResidualResult:
    codes: np.ndarray  # (N, L) int64, L = levels (+1 with the de-dup level)
    codebooks: list[np.ndarray]  # L_learned x (K, D) float64
    codebook_sizes: list[int]
    stats: dict


def residual_kmeans(call: Call, levels: int, params: KMeansParams, dedup: bool = False,
                    log: Callable[[str], None] | None = None) -> ResidualResult:
    """L levels x K residual k-means over the shards behind ``call``; shards' residuals are advanced in place.

    Stats: per level (inertia, utilisation, empty clusters re-seeded, iterations), the collision rate of the full
    learned codes, and the reconstruction error ``sum ||x - sum_l c_l||^2`` (mean per row, and relative to
    ``sum ||x||^2``)."""
    if levels < 1:
        raise KMeansError(f"levels must be >= 1, got {levels}")
    info = call("info")
    n = sum(i[0] for i in info)
    dims = {i[1] for i in info if i[0] > 0}
    if len(dims) > 1:
        raise KMeansError(f"shards disagree on the dimension: {sorted(dims)}")
    if n == 0:
        raise KMeansError("no rows to cluster")
    energy = sum(call("energy"))
    codes = np.zeros((n, levels), dtype=np.int64)
    codebooks, level_stats = [], []
    residual = energy
    for level in range(levels):
        centroids, st = fit_level(call, n, params, level)
        residual = 0.0
        for rows, labels, sq in call("advance", centroids):
            codes[rows, level] = labels
            residual += sq
        st.inertia = residual  # at the final centroids, after the final assignment
        if log:
            log(f"k-means level {level + 1}/{levels}: K={st.k} iters={st.iterations} inertia={residual:.6g} "
                f"used={st.used}/{st.k} reseeded={st.empty_reseeded}"
                f"{'' if st.converged else ' (max_iters reached)'}")
        codebooks.append(centroids)
        level_stats.append(st)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    in_collision = int(counts[counts > 1].sum())
    stats: dict[str, Any] = {
        "num_items": n,
        "levels": [{"level": s.level, "k": s.k, "iterations": s.iterations, "converged": s.converged,
                    "inertia": s.inertia, "used": s.used, "utilisation": s.utilisation,
                    "empty_reseeded": s.empty_reseeded} for s in level_stats],
        "unique_codes": int(len(counts)),
        "items_in_collision": in_collision,
        "collision_rate": in_collision / n,
        "reconstruction_mse": residual / n,
        "reconstruction_rel": residual / energy if energy > 0 else 0.0,
    }
    sizes = [params.k] * levels
    if dedup:
        extra, size = dedup_level(codes)
        codes = np.concatenate([codes, extra[:, None]], axis=1)
        sizes.append(size)
        stats["dedup_size"] = size
    stats["codebook_sizes"] = sizes
    return ResidualResult(codes, codebooks, sizes, stats)


def split_rows(x: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (x_slice, global rows) pieces, for local shards and Ray actors alike."""
    bounds = np.linspace(0, x.shape[0], parts + 1).astype(int)
    return [(x[a:b], np.arange(a, b, dtype=np.int64)) for a, b in zip(bounds[:-1], bounds[1:])]


def kmeans_local(x: np.ndarray, levels: int, params: KMeansParams, dedup: bool = False, shards: int = 1,
                 backend: str = "numpy", device: str | None = None,
                 log: Callable[[str], None] | None = None) -> ResidualResult:
    """Residual k-means in this process (``shards`` pieces, to test split independence without Ray)."""
    check_finite(np.asarray(x))
    pieces = [KMeansShard(xs, rows, backend, device) for xs, rows in split_rows(np.asarray(x), shards)]
    return residual_kmeans(local_call(pieces), levels, params, dedup, log)
