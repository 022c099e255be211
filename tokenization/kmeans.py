"""Residual (hierarchical) k-means as pure functions over shards of rows: numpy reference and torch path.

The driver never needs all rows in one place. Every row lives in exactly one :class:`KMeansShard` (a slice of the
embedding matrix with its *global* row indices); the driver talks to the shards through one function
``call(method, *args) -> [result per shard]`` (plain method calls here, Ray actor calls in ``ray_kmeans.py``).
One Lloyd step = one map (:meth:`KMeansShard.partial`: per-cluster sums / counts / inertia in float64) and one
reduce (:func:`reduce_partials`) + :func:`update` on the driver.

Why the codes do not depend on how rows are split (tested: 1 vs 3 Ray workers, 1-4 shards, numpy vs torch):
- seeding is greedy k-means++ on the driver over a sample of rows chosen by global index from ``(seed, level)``
  (:func:`sample_rows`), fetched from whichever shard holds them; never "per worker";
- the nearest centroid is the one float64 distances give: a float32 matmul scores all rows (its rounding depends
  on how BLAS blocks the rows, so it alone could differ between splits), and every row whose best two scores are
  within the rigorous error bound :func:`f32_gap_bound` is scored again in float64 (typically < 1% of rows);
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
from threadpoolctl import threadpool_limits

from tokenization.balanced import balanced_labels, capacity
from tokenization.collision_free import check_capacity
from tokenization.collision_free import collision_free as make_unique
from tokenization.kmeans_call import Call, KMeansError, Override
from tokenization.progress import Progress

# Rows per distance block: bounds the (rows, K) distance matrix to ~64 MiB at K = 256 in float64.
_BLOCK = 32768


@dataclass
class KMeansParams:
    """Per-level Lloyd settings. Stop when the inertia improves by less than ``tol`` (relative) or after
    ``max_iters`` steps. Greedy k-means++ runs on a sample of ``seed_sample`` rows (0: ``max(10_000, 64 K)``)
    with ``seed_trials`` candidates per step (0: 2 + ln K, scikit-learn's ``n_local_trials``).

    The defaults keep inertia over seeding time; the measurements behind them are in docs/results.md ("k-means
    seeding"). ``seed_trials=3`` is the cheaper knob for small data."""

    k: int
    max_iters: int = 50
    tol: float = 1e-4
    seed: int = 0
    seed_sample: int = 0
    seed_trials: int = 0
    # Rows per mini-batch Lloyd step (Sculley, "Web-scale k-means clustering", WWW 2010, Alg. 1; 0: full Lloyd).
    # Each of the ``max_iters`` steps assigns a fresh uniform sample of rows (chosen by global index from
    # (seed, level, step), so still split-independent) and moves each centroid to the running mean of every row
    # it was given so far (per-centre learning rate 1 / count). No inertia test: all ``max_iters`` steps run.
    minibatch: int = 0
    # Capacity-constrained (balanced) levels, OneRec's balanced k-means (tokenization/balanced.py): no codeword
    # takes more than ceil(balance * N / K) rows, in every Lloyd step and in the level's codes; 0: off.
    balance: float = 0.0


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


# float32 unit roundoff and the float64 one (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §2.1).
_U32, _U64 = 2.0 ** -24, 2.0 ** -53
# Above this (||x|| + max ||c||)^2 float32 could overflow (max 2^128): such blocks are assigned in float64 only.
_F32_SAFE = 2.0 ** 100


def f32_gap_bound(x_norm: np.ndarray, c_norm_max: float, dim: int, u_in: float = 0.0) -> np.ndarray:
    """Per row, the gap between the best and second-best float32 score above which the float32 argmin is *provably*
    the float64 argmin (so only rows at or under it need recomputing in float64).

    Scores: the nearest centroid minimises t(c) = ||c||^2 - 2 x.c (||x||^2 is common to every c). The fast path
    computes t^ = fl32(fl32(||c||^2) + fl32(x^ . (-2 c^))) with x^, c^ = x, c rounded to float32 (and once more to
    ``u_in`` inside the matmul: 2^-11 for TF32, 2^-8 for bf16, 0 for IEEE float32). Error of each term, u = 2^-24:
    - rounding the inputs: |x^.c^ - x.c| <= (2v + v^2) ||x|| ||c||, v = u + u_in;
    - the dot product, in *any* summation order, blocked or not, with or without FMA (Higham Eq. 3.5):
      <= gamma_D |x^|.|c^| <= gamma_D (1 + v)^2 ||x|| ||c||, gamma_D = D u / (1 - D u);
    - ||c||^2 (float64, then rounded to float32): <= (u + gamma64_D) ||c||^2; the final addition: <= u |t^|.
    Summed: |t^ - t| <= E32 = 1.05 ((D + 4) u + 2 u_in) (||x|| + ||c||)^2 for D u <= 0.01 (the 1.05 covers the
    second-order terms). The float64 reference d = fl64(||x||^2 - 2 x.c + ||c||^2) itself is off the exact
    ||x||^2 + t by at most E64 = 1.05 (D + 4) 2^-53 (||x|| + ||c||)^2 (same argument). With flush-to-zero every
    float32 operation may also lose up to 2^-126 absolutely; eta = 2^-120 (D + sqrt(D) (||x|| + ||c||)) bounds
    the sum of those. So if t^_2nd - t^_best > 2 (E32 + E64 + eta), every other centroid is farther in exact
    arithmetic by more than 2 E64, hence also in the float64 reference: the labels agree bit for bit.
    ``c_norm_max`` (max_c ||c||) makes the bound uniform over centroids.
    """
    s = x_norm + c_norm_max
    e = 1.05 * ((dim + 4) * (_U32 + _U64) + 2.0 * u_in) * s * s + 2.0 ** -120 * (dim + math.sqrt(dim) * s)
    return 2.0 * e


class KMeansShard:
    """A slice of rows (their residuals) plus the per-shard half of every k-means step.

    ``x`` (n, D) any float dtype, kept as float64 (and a float32 copy for the fast distance pass); ``rows`` (n,)
    the global row indices. ``backend`` "numpy" or "torch" (``device`` e.g. "cuda" for the torch path; on a GPU
    actor the shard lives in GPU memory).

    Nearest-centroid search (:meth:`assign`) is exact in the float64 sense at float32 speed: scores by a float32
    matmul, then the rows whose best and second-best scores are within :func:`f32_gap_bound` (typically < 1%)
    are scored again in float64, as :meth:`assign_f64` does for all rows. The labels are therefore those of the
    float64 computation whatever the BLAS, the blocking or the split into shards.
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray, backend: str = "numpy", device: str | None = None,
                 give: bool = False):
        """``give``: the caller gives ``x`` away (never uses it again), so a float32 ``x`` becomes the first
        level's float32 copy as it is (it equals the float64 rows rounded back) instead of a second one."""
        x = np.asarray(x)
        rows = np.asarray(rows, dtype=np.int64)
        if x.ndim != 2 or x.shape[0] != rows.shape[0]:
            raise KMeansError(f"shard: {x.shape} rows for {rows.shape[0]} indices")
        check_finite(x, rows)
        self.rows = rows
        self.backend = backend
        first32 = None
        if backend == "numpy":
            self.x = np.array(x, dtype=np.float64, order="C", copy=True)  # advanced in place: never the caller's
            if give and x.dtype == np.float32 and x.flags.c_contiguous:
                first32 = x
        elif backend == "torch":
            import torch

            self._torch = torch
            self.device = torch.device(device or "cpu")
            self.x = torch.tensor(np.asarray(x, dtype=np.float64), device=self.device)  # a copy
        else:
            raise KMeansError(f"unknown k-means backend {backend!r} (numpy, torch)")
        self._refresh(first32)

    def _refresh(self, x32: np.ndarray | None = None) -> None:
        """Per-row caches of the current residuals, reused by every Lloyd step of a level. On numpy the old caches go
        before the new ones are made and the squared norms are summed a block of rows at a time (the same per-row
        sums as one call): never an (n, D) temporary beside the rows and their float32 copy."""
        self._biased_cache = None  # balanced scores of the old residuals
        if self.backend == "numpy":
            self._x32 = self._x_sq = self._x_norm = None
            n = self.x.shape[0]
            self._x_sq = np.empty(n, dtype=np.float64)
            for s in range(0, n, _BLOCK):
                xb = self.x[s:s + _BLOCK]
                self._x_sq[s:s + _BLOCK] = (xb * xb).sum(1)
            self._x32 = self.x.astype(np.float32) if x32 is None else x32
            self._x_norm = np.sqrt(self._x_sq)
        else:
            self._x_sq = (self.x * self.x).sum(1)  # (n,) float64
            self._x32 = self.x.float()
            self._x_norm = self._x_sq.sqrt()

    # --- shape ---
    def info(self) -> tuple[int, int]:
        return int(self.x.shape[0]), int(self.x.shape[1])

    # --- nearest centroid ---
    def _u_in(self) -> float:
        """Extra rounding of the float32 matmul's inputs: torch may run it in TF32 or bf16 when allowed to."""
        if self.backend == "numpy":
            return 0.0
        torch = self._torch
        prec = torch.get_float32_matmul_precision()
        if prec == "highest" and not torch.backends.cuda.matmul.allow_tf32:
            return 0.0
        return 2.0 ** -8 if prec == "medium" else 2.0 ** -11

    def assign_f64(self, c: np.ndarray, idx: Any = None, bias: np.ndarray | None = None) -> Any:
        """Reference labels: nearest centroid by float64 squared distances (ties -> lower centroid index), for all
        rows or those at ``idx``; ``bias`` (K,) is added to each centroid's distances first."""
        xb = self.x if idx is None else self.x[idx]
        x_sq = self._x_sq if idx is None else self._x_sq[idx]
        if self.backend == "numpy":
            out = np.empty(xb.shape[0], dtype=np.int64)
            c_sq = (c * c).sum(1) if bias is None else (c * c).sum(1) + bias
            for s in range(0, xb.shape[0], _BLOCK):
                d = x_sq[s:s + _BLOCK, None] - 2.0 * (xb[s:s + _BLOCK] @ c.T) + c_sq[None, :]  # (b, K)
                out[s:s + _BLOCK] = d.argmin(1)  # first minimum: ties -> lower centroid index
            return out
        torch = self._torch
        ct = torch.as_tensor(c, device=self.device)
        c_sq = (ct * ct).sum(1) if bias is None else (ct * ct).sum(1) + torch.as_tensor(bias, device=self.device)
        out = [(x_sq[s:s + _BLOCK, None] - 2.0 * (xb[s:s + _BLOCK] @ ct.T) + c_sq[None, :]).argmin(1)
               for s in range(0, xb.shape[0], _BLOCK)]  # torch also returns the first minimal index
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=self.device)

    def assign(self, c: np.ndarray, idx: Any = None) -> Any:
        """Labels of the nearest centroid for all rows (n,) or those at ``idx``: float32 scores, float64 for the
        rows too close to call (class doc)."""
        x32 = self._x32 if idx is None else self._x32[idx]
        x_norm = self._x_norm if idx is None else self._x_norm[idx]
        n, dim = x32.shape
        c_sq = (c * c).sum(1)
        c_norm_max = float(np.sqrt(c_sq.max())) if len(c) else 0.0
        if n == 0 or len(c) < 2 or (float(x_norm.max()) + c_norm_max) ** 2 > _F32_SAFE:
            return self.assign_f64(c, idx)
        u_in = self._u_in()
        if self.backend == "numpy":
            cm2 = (-2.0 * c).astype(np.float32)  # (K, D); times -2 is exact
            c_sq32 = c_sq.astype(np.float32)
            labels = np.empty(n, dtype=np.int64)
            unsure = np.empty(n, dtype=bool)
            for s in range(0, n, _BLOCK):
                t = x32[s:s + _BLOCK] @ cm2.T  # (b, K) float32: -2 x.c
                t += c_sq32
                lb = t.argmin(1)
                r = np.arange(len(t))
                best = t[r, lb].astype(np.float64)
                t[r, lb] = np.inf
                gap = t.min(1) - best  # float64
                labels[s:s + _BLOCK] = lb
                # "not (gap > bound)": a NaN gap is unsure too
                unsure[s:s + _BLOCK] = ~(gap > f32_gap_bound(x_norm[s:s + _BLOCK], c_norm_max, dim, u_in))
            redo = np.flatnonzero(unsure)
            if len(redo):
                labels[redo] = self.assign_f64(c, redo if idx is None else idx[redo])
            return labels
        torch = self._torch
        ct = torch.as_tensor(c, device=self.device)
        cm2 = (-2.0 * ct).float()
        c_sq32 = torch.as_tensor(c_sq, device=self.device).float()
        labels, unsure = [], []
        for s in range(0, n, _BLOCK):
            t = x32[s:s + _BLOCK] @ cm2.T
            t += c_sq32
            best, lb = t.min(1)  # torch.min returns the first minimal index, like argmin
            t.scatter_(1, lb[:, None], float("inf"))
            gap = t.min(1).values.double() - best.double()
            labels.append(lb)
            unsure.append(~(gap > f32_gap_bound(x_norm[s:s + _BLOCK], c_norm_max, dim, u_in)))
        labels, unsure = torch.cat(labels), torch.cat(unsure)
        redo = torch.nonzero(unsure)[:, 0]
        if len(redo):
            labels[redo] = self.assign_f64(c, redo if idx is None else idx[redo])
        return labels

    def labelled(self, c: np.ndarray, how: Override | None = None, idx: Any = None) -> np.ndarray:
        """Labels (numpy) of all rows or those at ``idx`` under ``how``: nearest centroid (float64 after ``bias``,
        when there is one), then the rows ``how`` fixes take its labels."""
        if how is None or how.bias is None:
            labels = self.assign(c, idx)
        elif idx is None:
            labels = self.biased(c, how.bias)[0].copy()
        else:
            labels = self.assign_f64(c, idx, how.bias)
        if self.backend == "torch" and not isinstance(labels, np.ndarray):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels, dtype=np.int64)
        if how is not None and len(how.rows):
            mine = self.rows if idx is None else self.rows[np.asarray(idx.cpu() if hasattr(idx, "cpu") else idx)]
            pos = np.flatnonzero(np.isin(mine, how.rows))
            labels[pos] = how.labels[np.searchsorted(how.rows, mine[pos])]
        return labels

    def scores(self, c: np.ndarray, bias: np.ndarray | None, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float64 squared distances (+ ``bias``) of those of the global ``rows`` held here to every centroid:
        (rows present, (m, K))."""
        idx = np.flatnonzero(np.isin(self.rows, rows))
        xb = self.x[idx] if self.backend == "numpy" else self.x[self._torch.as_tensor(idx)].cpu().numpy()
        xb = np.asarray(xb, dtype=np.float64)
        d = (xb * xb).sum(1)[:, None] - 2.0 * (xb @ c.T) + (c * c).sum(1)[None, :]
        return self.rows[idx], d if bias is None else d + bias[None, :]

    def margins(self, c: np.ndarray, bias: np.ndarray, over: np.ndarray, limit: np.ndarray
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each cluster of ``over``, this shard's rows labelled there (under ``bias``) with the smallest margins
        (second-best biased score minus best), at most ``limit`` of them: [(margins ascending, global rows)]. The
        balanced assignment raises the cluster's bias past the margin of its excess-th row (balanced.py)."""
        labels, margin = self.biased(c, bias)
        out = []
        for j, m in zip(over, limit):
            idx = np.flatnonzero(labels == j)
            order = idx[np.lexsort((self.rows[idx], margin[idx]))[: int(m)]]
            out.append((margin[order], self.rows[order]))
        return out

    def counts(self, c: np.ndarray, how: Override | None = None) -> np.ndarray:
        """(K,) rows per cluster under ``how``."""
        return np.bincount(self.labelled(c, how), minlength=len(c)).astype(np.int64)

    def biased(self, c: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels under ``bias`` (as :meth:`assign_f64`: the same float64 scores, first minimum) and each row's margin
        (second-best score minus best), numpy. Kept for the last (centroids, bias) asked: a balanced round asks for
        the counts and then the margins at the same prices, one pass over the rows for both."""
        import hashlib

        key = hashlib.blake2b(np.ascontiguousarray(c).tobytes() + np.ascontiguousarray(bias).tobytes()).digest()
        cached = getattr(self, "_biased_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        self._biased_cache = None
        n = self.x.shape[0]
        labels, margin = np.empty(n, dtype=np.int64), np.empty(n)
        if self.backend == "numpy":
            c_sq = (c * c).sum(1) + bias
            for s in range(0, n, _BLOCK):
                d = self._x_sq[s:s + _BLOCK, None] - 2.0 * (self.x[s:s + _BLOCK] @ c.T) + c_sq[None, :]  # (b, K)
                self._best_two(d, labels[s:s + _BLOCK], margin[s:s + _BLOCK])
        else:
            torch = self._torch
            ct = torch.as_tensor(c, device=self.device)
            c_sq = (ct * ct).sum(1) + torch.as_tensor(bias, device=self.device)
            for s in range(0, n, _BLOCK):
                d = self._x_sq[s:s + _BLOCK, None] - 2.0 * (self.x[s:s + _BLOCK] @ ct.T) + c_sq[None, :]
                self._best_two(d.cpu().numpy(), labels[s:s + _BLOCK], margin[s:s + _BLOCK])
        self._biased_cache = (key, labels, margin)
        return labels, margin

    @staticmethod
    def _best_two(d: np.ndarray, labels: np.ndarray, margin: np.ndarray) -> None:
        lb = d.argmin(1)
        r = np.arange(len(d))
        best = d[r, lb]
        d[r, lb] = np.inf
        labels[:] = lb
        margin[:] = d.min(1) - best if d.shape[1] > 1 else np.inf

    def _local(self, rows: np.ndarray | None) -> Any:
        """Positions in this shard of the global ``rows`` held here (None: all rows)."""
        if rows is None:
            return None
        idx = np.flatnonzero(np.isin(self.rows, rows))
        return idx if self.backend == "numpy" else self._torch.as_tensor(idx, device=self.device)

    def partial(self, centroids: np.ndarray, rows: np.ndarray | None = None, how: Override | None = None) -> Partial:
        """Map step: per-cluster sums/counts and inertia of this shard at ``centroids`` (K, D), over all its rows
        or only those of the global ``rows`` it holds (a mini-batch).

        inertia = sum_i ||x_i||^2 - sum_j (2 c_j . S_j - n_j ||c_j||^2) with S_j, n_j the cluster's sum and count:
        O(K D) from the sums, no per-row distance (float64; cancellation costs ~1e-16 * energy / inertia)."""
        k, d = centroids.shape
        idx = self._local(rows)
        labels = self.assign(centroids, idx) if how is None else self.labelled(centroids, how, idx)
        if how is not None and self.backend == "torch":
            labels = self._torch.as_tensor(labels, device=self.device)
        x = self.x if idx is None else self.x[idx]
        x_sq = self._x_sq if idx is None else self._x_sq[idx]
        if self.backend == "numpy":
            counts = np.bincount(labels, minlength=k).astype(np.int64)
            sums = _segment_sum(labels, x, k)
            energy = float(x_sq.sum())
        else:
            torch = self._torch
            counts = torch.bincount(labels, minlength=k).cpu().numpy().astype(np.int64)
            sums = torch.zeros((k, d), dtype=torch.float64, device=self.device).index_add_(0, labels, x)
            sums, energy = sums.cpu().numpy(), float(x_sq.sum().item())
        inertia = energy - float((2.0 * (centroids * sums).sum(1) - counts * (centroids * centroids).sum(1)).sum())
        return Partial(sums, counts, max(inertia, 0.0))

    def farthest(self, centroids: np.ndarray, m: int, how: Override | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This shard's ``m`` rows farthest from their nearest centroid (their centroid under ``how``, the
        balanced assignment): (dist, global rows, labels, vectors).

        Distances are ||x - c||^2 row by row in float64, so they do not depend on how rows are split."""
        labels = self.assign(centroids) if how is None else self.labelled(centroids, how)
        if self.backend == "torch":
            labels = labels if isinstance(labels, np.ndarray) else labels.cpu().numpy()
            x = self.x.cpu().numpy()
        else:
            x = self.x
        dist = ((x - centroids[labels]) ** 2).sum(1)
        # Sort by distance descending, then global row ascending: the same order the driver merges with.
        order = np.lexsort((self.rows, -dist))[:m]
        return dist[order], self.rows[order], labels[order], np.array(x[order])

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The current residuals of those of ``rows`` (global, sorted) held here: (rows present, vectors)."""
        mask = np.isin(self.rows, rows)
        idx = np.flatnonzero(mask)
        vecs = self.x[idx] if self.backend == "numpy" else self.x[self._torch.as_tensor(idx)].cpu().numpy()
        return self.rows[idx], np.asarray(vecs)

    def labels(self, centroids: np.ndarray, how: Override | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(global rows, labels) at ``centroids`` under ``how``, residuals left as they are."""
        return self.rows, self.labelled(centroids, how)

    def advance(self, centroids: np.ndarray, how: Override | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """End of a level: assign (under ``how``), subtract the centroid (residual for the next level). Returns
        (global rows, labels, sum of squared residual norms after the subtraction)."""
        if how is None:
            labels = self.assign(centroids)
        else:
            labels = self.labelled(centroids, how)
            if len(how.moved):  # rows moved to another prefix: residual against the new prefix first
                pos = np.flatnonzero(np.isin(self.rows, how.moved))
                shift = how.shifts[np.searchsorted(how.moved, self.rows[pos])]
                if self.backend == "numpy":
                    self.x[pos] += shift
                else:
                    self.x[self._torch.as_tensor(pos, device=self.device)] += self._torch.as_tensor(
                        shift, device=self.device)
            if self.backend == "torch":
                labels = self._torch.as_tensor(labels, device=self.device)
        if self.backend == "numpy":
            for s in range(0, len(labels), _BLOCK):  # a block at a time: no (n, D) temporary of centroids
                self.x[s:s + _BLOCK] -= centroids[labels[s:s + _BLOCK]]
        else:
            self.x -= self._torch.as_tensor(centroids, device=self.device)[labels]
            labels = labels.cpu().numpy()
        self._refresh()
        return self.rows, labels, self.energy()

    def energy(self) -> float:
        """Sum of squared norms of the current residuals (of the raw rows before level 0)."""
        return float(self._x_sq.sum()) if self.backend == "numpy" else float(self._x_sq.sum().item())


def _segment_sum(labels: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """(K, D) float64 ``sums[labels[i]] += x[i]``, each cluster's rows added in row order (deterministic), as a
    sparse (K, n) one-hot times x: one streaming pass over x (np.add.at and sort + reduceat copy x; 4-6x slower)."""
    from scipy import sparse

    n = len(labels)
    onehot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# driver side: seeding, reduce, update
# ----------------------------------------------------------------------------------------------------------------

def local_call(shards: Sequence[KMeansShard]) -> Call:
    """The ``call`` for shards in this process."""
    return lambda method, *args: [getattr(s, method)(*args) for s in shards]


def sample_rows(n: int, size: int, seed: int, level: int, step: int = -1) -> np.ndarray:
    """Sorted global rows for seeding (``step`` -1) or for mini-batch step ``step``: a function of (n, size, seed,
    level, step) only, never of the shards. O(size) memory when size << n (numpy's Floyd sampling)."""
    rng = np.random.default_rng([seed, level, 1] if step < 0 else [seed, level, 3, step])
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def kmeans_pp(x: np.ndarray, k: int, seed: int, level: int = 0, trials: int = 0,
              log: Callable[[str], None] | None = None) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007) on ``x`` (n, D): each step draws ``trials`` candidates
    (0: 2 + ln K, scikit-learn's ``n_local_trials``) with probability proportional to D(x)^2 and keeps the one
    that lowers the potential most; all candidates of a step are scored in one matmul.

    Distances are float32 (the skinny (trials, D) x (D, n) products are memory-bound: half the bytes of float64),
    potentials are summed in float64, and a distance within float32 resolution of 0 (``f32_gap_bound``'s
    argument: |error| <= (D + 4) u (||a|| + ||b||)^2) counts as 0, so duplicate rows are never drawn twice.
    The K steps run with one BLAS thread: each product reads all n rows for a few output rows (memory-bound), so
    threads only add a synchronisation per step (5-15x slower on a busy 2-core machine, measured).
    Deterministic for (x, k, seed, level, trials). When every remaining row already coincides with a centroid the
    next centroid is the lowest-index row not chosen yet, so K centroids always come back.
    """
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    if k > n:
        raise KMeansError(f"k-means++: K={k} centroids from {n} rows")
    rng = np.random.default_rng([seed, level, 2])
    trials = trials or (2 + int(math.log(k)) if k > 1 else 1)
    x32 = x.astype(np.float32)
    x_sq = (x * x).sum(1).astype(np.float32)  # (n,) once: every step needs distances from a few rows to all rows
    zero_tol = np.float32(2.1 * (dim + 4) * _U32)  # * (||a||^2 + ||b||^2) >= (D + 4) u (||a|| + ||b||)^2 * 1.05

    def dist_to(idx: np.ndarray) -> np.ndarray:  # (len(idx), n) float32
        d = x32[idx] @ x32.T
        d *= -2.0
        d += x_sq[None, :]
        d += x_sq[idx][:, None]
        d[d <= zero_tol * (x_sq[None, :] + x_sq[idx][:, None])] = 0.0
        return d

    with threadpool_limits(limits=1, user_api="blas"):
        chosen = _greedy_pp(n, k, trials, rng, dist_to, Progress(f"k-means++ seeding on {n} rows:", k, log,
                                                                   unit="centroids"))
    return x[chosen].copy()


def _greedy_pp(n: int, k: int, trials: int, rng: np.random.Generator,
               dist_to: Callable[[np.ndarray], np.ndarray], progress: Progress | None = None) -> list[int]:
    """The K sequential steps of :func:`kmeans_pp`: indices of the chosen rows."""
    progress = progress or Progress("", k, None)
    chosen = [int(rng.integers(n))]
    progress.add(1)
    closest = dist_to(np.array(chosen))[0]  # (n,)
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    for _ in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        pot = cum[-1]
        if pot <= 0.0:
            nxt = int(np.flatnonzero(~taken)[0])
            closest = np.minimum(closest, dist_to(np.array([nxt]))[0])
        else:
            cand = np.minimum(np.searchsorted(cum, rng.uniform(size=trials) * pot), n - 1)
            d = np.minimum(closest[None, :], dist_to(cand))  # (trials, n)
            best = int(np.argmin(d.sum(1, dtype=np.float64)))
            nxt = int(cand[best])
            closest = d[best]
        chosen.append(nxt)
        taken[nxt] = True
        progress.add(1)
    return chosen


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


def update(stats: Partial, centroids: np.ndarray, call: Call | None = None,
           how: Override | None = None) -> tuple[np.ndarray, int]:
    """New centroids from reduced statistics; returns (centroids (K, D), number of empty clusters re-seeded).

    Re-seeding rule (deterministic, split-independent): empty clusters j_1 < j_2 < ... take the rows farthest
    from their nearest centroid, farthest first (ties: lower global row), one row each; the donor cluster's sums
    and count lose that row. Needs ``call`` to fetch the candidates from the shards (only when a cluster is empty).
    """
    sums, counts = stats.sums.copy(), stats.counts.copy()
    empty = np.flatnonzero(counts == 0)
    if len(empty) and call is not None:
        m = len(empty)
        got = call("farthest", centroids, m, how)  # the rows' clusters as in stats (``how``: balanced)
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


def fit_level(call: Call, n: int, params: KMeansParams, level: int = 0,
              log: Callable[[str], None] | None = None) -> tuple[np.ndarray, LevelStats]:
    """Lloyd's algorithm (or mini-batch steps, ``params.minibatch``) on the shards' current residuals; returns the
    codebook (K, D) and its stats. The driver holds only the seeding sample, (K, D) centroids and sums.

    The level is *not* advanced (see :func:`residual_kmeans`)."""

    k = params.k
    if k < 1 or params.max_iters < 1:
        raise KMeansError(f"K and max_iters must be >= 1, got K={k}, max_iters={params.max_iters}")
    if k > n:
        raise KMeansError(f"K={k} clusters is more than the {n} points to cluster; lower tokenize.codebook_size")
    if params.balance and params.minibatch:
        raise KMeansError("tokenize.balance needs full Lloyd steps (tokenize.kmeans.minibatch=0)")
    cap = capacity(n, k, params.balance) if params.balance else 0
    size = params.seed_sample or max(10_000, 64 * k)
    rows = sample_rows(n, max(size, k), params.seed, level)
    got = call("take", rows)
    sample_rows_got = np.concatenate([g[0] for g in got])
    sample = np.concatenate([g[1] for g in got])
    sample = sample[np.argsort(sample_rows_got, kind="stable")]  # global order, whatever the split
    centroids = kmeans_pp(sample, k, params.seed, level, params.seed_trials, log)
    del sample
    batch = min(params.minibatch, n) if params.minibatch > 0 else 0
    if batch:
        return _minibatch(call, n, params, level, centroids, batch, log)
    history: list[float] = []
    reseeded = 0
    converged = False
    it = 0
    progress = Progress(f"k-means level {level + 1} Lloyd steps (at most {params.max_iters}):",
                        n * params.max_iters, log, unit="rows")
    how = None
    for it in range(1, params.max_iters + 1):
        if cap:  # the step's assignment is the capacity-constrained one (OneRec's balanced k-means)
            how, _ = balanced_labels(call, centroids, cap)
        stats = reduce_partials(call("partial", centroids, None, how))
        progress.add(n)
        history.append(stats.inertia)
        centroids, r = update(stats, centroids, call, how)
        reseeded += r
        if len(history) > 1 and r == 0:
            prev, cur = history[-2], history[-1]
            if prev - cur <= params.tol * max(cur, 1e-300):
                converged = True
                break
    if cap:
        how, _ = balanced_labels(call, centroids, cap)
    counts = reduce_partials(call("partial", centroids, None, how)).counts
    used = int((counts > 0).sum())
    return centroids, LevelStats(level, k, it, converged, float(history[-1]), used, used / k, reseeded, history)


def _minibatch(call: Call, n: int, params: KMeansParams, level: int, centroids: np.ndarray, batch: int,
               log: Callable[[str], None] | None) -> tuple[np.ndarray, LevelStats]:
    """Mini-batch k-means (Sculley, WWW 2010, Alg. 1), the batch form scikit-learn's ``MiniBatchKMeans`` uses:
    per step, each centre moves to the mean of all rows ever assigned to it, c <- c + (S - m c) / v with S, m the
    step's sum and count for the centre and v its running count. Each step reads ``batch`` rows, not N."""
    k = params.k
    seen = np.zeros(k, dtype=np.float64)  # v: rows each centre has been given so far
    centroids = centroids.copy()
    history: list[float] = []
    progress = Progress(f"k-means level {level + 1} mini-batch steps ({batch} rows each):",
                        batch * params.max_iters, log, unit="rows")
    for step in range(params.max_iters):
        st = reduce_partials(call("partial", centroids, sample_rows(n, batch, params.seed, level, step)))
        nz = st.counts > 0
        seen[nz] += st.counts[nz]
        centroids[nz] += (st.sums[nz] - st.counts[nz, None] * centroids[nz]) / seen[nz, None]
        history.append(st.inertia * n / batch)  # the batch's inertia scaled to N rows: an estimate
        progress.add(batch)
    counts = reduce_partials(call("partial", centroids)).counts
    used = int((counts > 0).sum())
    return centroids, LevelStats(level, k, params.max_iters, False, float(history[-1]), used, used / k, 0, history)


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
                    log: Callable[[str], None] | None = None, collision_free: bool = False) -> ResidualResult:
    """L levels x K residual k-means over the shards behind ``call``; shards' residuals are advanced in place.

    ``params.balance``: every level's assignment is capacity-constrained (``tokenization/balanced.py``).
    ``collision_free``: the last level is assigned by a matching inside each group of rows sharing the first L-1
    codes, so no two rows share a full code (``tokenization/collision_free.py``); no de-dup level is appended then,
    whatever ``dedup`` says (the codes are already unique).

    Stats: per level (inertia, utilisation, empty clusters re-seeded, iterations, largest codeword share, perplexity
    share exp(H)/K), the collision rate of the full learned codes, and the reconstruction error
    ``sum ||x - sum_l c_l||^2`` (mean per row, and relative to ``sum ||x||^2``)."""

    if levels < 1:
        raise KMeansError(f"levels must be >= 1, got {levels}")
    info = call("info")
    n = sum(i[0] for i in info)
    dims = {i[1] for i in info if i[0] > 0}
    if len(dims) > 1:
        raise KMeansError(f"shards disagree on the dimension: {sorted(dims)}")
    if n == 0:
        raise KMeansError("no rows to cluster")
    if collision_free:
        check_capacity(n, params.k, levels)
    cap = capacity(n, params.k, params.balance) if params.balance else 0
    energy = sum(call("energy"))
    codes = np.zeros((n, levels), dtype=np.int64)
    codebooks, level_stats = [], []
    residual = energy
    unique_stats = None
    for level in range(levels):
        centroids, st = fit_level(call, n, params, level, log)
        how = balanced_labels(call, centroids, cap)[0] if cap else None
        if collision_free and level == levels - 1:
            for rows, labels in call("labels", centroids, how):
                codes[rows, level] = labels
            cf, unique_stats = make_unique(call, codes, [*codebooks, centroids], log=log, cap=cap)
            fixed = cf.rows if how is None else np.union1d(how.rows, cf.rows)
            how = Override(bias=None if how is None else how.bias, rows=fixed, labels=codes[fixed, level],
                           moved=cf.moved, shifts=cf.shifts)
        residual = 0.0
        for rows, labels, sq in call("advance", centroids, how):
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
                    "empty_reseeded": s.empty_reseeded, **level_shares(codes[:, s.level], s.k)}
                   for s in level_stats],
        "unique_codes": int(len(counts)),
        "items_in_collision": in_collision,
        "collision_rate": in_collision / n,
        "reconstruction_mse": residual / n,
        "reconstruction_rel": residual / energy if energy > 0 else 0.0,
    }
    if cap:
        stats["balance_capacity"] = cap
    if unique_stats is not None:
        stats["collision_free"] = unique_stats
    sizes = [params.k] * levels
    if dedup and not collision_free:
        extra, size = dedup_level(codes)
        codes = np.concatenate([codes, extra[:, None]], axis=1)
        sizes.append(size)
        stats["dedup_size"] = size
    stats["codebook_sizes"] = sizes
    return ResidualResult(codes, codebooks, sizes, stats)


def level_shares(column: np.ndarray, k: int) -> dict[str, float]:
    """How evenly a level's codes are used: the largest codeword's share of rows, and the perplexity share
    exp(H)/K (1.0: every codeword equally often)."""
    counts = np.bincount(column, minlength=k)
    p = counts[counts > 0] / len(column)
    return {"max_share": float(counts.max() / len(column)), "perplexity_share": float(np.exp(-(p * np.log(p)).sum()) / k)}


def split_rows(x: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (x_slice, global rows) pieces, for local shards and Ray actors alike."""
    bounds = np.linspace(0, x.shape[0], parts + 1).astype(int)
    return [(x[a:b], np.arange(a, b, dtype=np.int64)) for a, b in zip(bounds[:-1], bounds[1:])]


def kmeans_local(x: np.ndarray, levels: int, params: KMeansParams, dedup: bool = False, shards: int = 1,
                 backend: str = "numpy", device: str | None = None,
                 log: Callable[[str], None] | None = None, collision_free: bool = False) -> ResidualResult:
    """Residual k-means in this process (``shards`` pieces, to test split independence without Ray)."""
    check_finite(np.asarray(x))
    pieces = [KMeansShard(xs, rows, backend, device) for xs, rows in split_rows(np.asarray(x), shards)]
    return residual_kmeans(local_call(pieces), levels, params, dedup, log, collision_free)
