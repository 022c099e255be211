"""Collision-free last level: every item its own full code of L learned levels, no de-duplication token.

After the last level's codebook is fit, the items that share the first L-1 codes (a *prefix group*) get their last
code by a minimum-cost matching on squared distance to that level's centroids, each code used once (arXiv
2605.25330: reassigning the last code inside each shared-prefix group by a distance matching made RK-means codes
collision-free and lifted item-level Hit@10 on Beauty by 21%). A group of more than K items cannot fit: its items
farthest from the prefix's reconstruction (largest residual norm; ties: the higher global row leaves) move to the
nearest prefix with room first, where

- "nearest" is the squared distance from the item to the prefix's reconstruction (the sum of its centroids);
- the candidates are the prefixes that differ from the item's only in the last prefix level (its siblings, among
  them prefixes no item has yet); only when all K siblings are full (more than K^2 items share the first L-2 codes)
  the search widens to the last two prefix levels, and so on up to every prefix (K^(L-1) candidates), so a code is
  found whenever N <= K^L;
- movers go in global row order; a tie in distance goes to the lower prefix; items with identical vectors take the
  codes the matching gave them in row order.

Groups whose nearest last codes are already distinct keep them (each item's own minimum is the matching's optimum),
so only colliding groups and the groups movers land in change. Everything is decided on the driver from vectors
fetched by global row (:meth:`KMeansShard.take`), a batch of whole groups at a time (at most ``batch_rows`` rows
and (rows, D) floats in memory), and rows are always sorted by global index: the codes are the same for any number
of workers. Pure numpy/scipy: it talks to the shards through ``call`` like ``kmeans.residual_kmeans``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

from tokenization.kmeans_call import Call, KMeansError, Override

# Rows fetched from the shards per batch: 8192 x D float64 (24 MiB at D = 384) plus their (rows, K) costs (16 MiB at
# K = 256) and ~32 MiB of distance temporaries: the pass's driver memory beyond a few int64 arrays of N.
BATCH_ROWS = 8192


def check_capacity(n: int, k: int, levels: int, setting: str = "tokenize.collision_free") -> None:
    """N items need N distinct codes: K^L >= N."""
    if k ** levels < n:
        raise KMeansError(f"{setting}: {n} items cannot have distinct codes of {levels} levels x {k} codes "
                          f"(K^L = {k ** levels}); raise tokenize.codebook_size or tokenize.levels")


def prefix_keys(codes: np.ndarray, k: int) -> np.ndarray:
    """(N,) int64 key of each row's code tuple, mixed radix K (the first level most significant)."""
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for col in codes.T:
        key = key * k + col
    return key


def _digits(key: int, k: int, width: int) -> list[int]:
    out = []
    for _ in range(width):
        key, d = divmod(key, k)
        out.append(d)
    return out[::-1]


def gather(call: Call, rows: np.ndarray, batch: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The shards' current residuals of the sorted global ``rows``, ``batch`` rows at a time, in row order."""
    for s in range(0, len(rows), batch):
        want = rows[s:s + batch]
        got = call("take", want)
        r = np.concatenate([g[0] for g in got])
        v = np.concatenate([g[1] for g in got])
        order = np.argsort(r, kind="stable")
        if not np.array_equal(r[order], want):
            raise KMeansError(f"collision-free pass: the shards returned {len(r)} of {len(want)} rows asked for")
        yield want, np.asarray(v[order], dtype=np.float64)


def sq_dist(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(m, P) exact squared distances sum_d (a_id - c_pd)^2, row by row (no matmul: the same bits however the rows
    are batched)."""
    out = np.empty((a.shape[0], c.shape[0]), dtype=np.float64)
    step = max(1, (1 << 22) // max(1, c.size))  # (step, P, D) temporaries of ~32 MiB
    for s in range(0, a.shape[0], step):
        diff = a[s:s + step, None, :] - c[None, :, :]
        out[s:s + step] = (diff * diff).sum(-1)
    return out


class _Sizes:
    """Items per prefix key: the groups' sizes at the start (sorted arrays) plus the prefixes that changed."""

    def __init__(self, keys: np.ndarray, sizes: np.ndarray):
        self.keys, self.sizes, self.changed = keys, sizes.copy(), {}

    def get(self, cand: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.keys, cand), len(self.keys) - 1)
        out = np.where(self.keys[pos] == cand, self.sizes[pos], 0)
        if self.changed:
            out = out.copy()
            for i, c in enumerate(cand.tolist()):
                if c in self.changed:
                    out[i] = self.changed[c]
        return out

    def add(self, key: int, delta: int) -> None:
        self.changed[key] = int(self.get(np.array([key]))[0]) + delta


def _move_overflow(call: Call, codes: np.ndarray, key: np.ndarray, codebooks: list[np.ndarray],
                   batch: int, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Move the farthest items out of prefix groups of more than K items (module doc). Updates ``codes`` and ``key``
    in place; returns (moved rows, sorted; shifts (m, D) = old prefix reconstruction minus the new one). ``cap``
    (balanced levels): a move may not take a prefix level's code to ``cap`` items or more, unless no prefix with room
    is left otherwise."""
    n, levels = codes.shape
    k = codebooks[-1].shape[0]
    dim = codebooks[-1].shape[1]
    empty = (np.zeros(0, dtype=np.int64), np.zeros((0, dim)))
    uniq, inverse, size = np.unique(key, return_inverse=True, return_counts=True)
    over = np.flatnonzero(size > k)
    if not len(over):
        return empty
    rows_over = np.flatnonzero(np.isin(inverse, over))
    dist = np.concatenate([(v * v).sum(1) for _, v in gather(call, rows_over, batch)])  # to the prefix's recon
    # Within each group: nearest first (ties: lower row); the K nearest stay.
    order = np.lexsort((rows_over, dist, inverse[rows_over]))
    g = inverse[rows_over][order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    movers = np.sort(rows_over[order[rank >= k]])
    sizes = _Sizes(uniq, size)
    for gi in over:
        sizes.add(int(uniq[gi]), k - int(size[gi]))  # the movers leave
    shifts = np.zeros((len(movers), dim))
    used = [np.bincount(codes[:, l], minlength=k) for l in range(levels - 1)] if cap else None
    done = 0
    for rows, r in gather(call, movers, batch):
        for row, v in zip(rows.tolist(), r):
            prefix = codes[row, :-1]
            best = None
            for capped in ([True, False] if cap else [False]):
                for w in range(1, levels):  # free prefix levels: the last w of the L-1
                    free = list(range(levels - 1 - w, levels - 1))
                    base = v + sum(codebooks[l][prefix[l]] for l in free)  # the item minus the fixed levels' recon
                    head = (int(key[row]) // k ** w) * k ** w
                    allowed = ([(used[l] < cap) | (np.arange(k) == prefix[l]) for l in free] if capped else None)
                    best = _nearest_with_room(base, [codebooks[l] for l in free], head, sizes, k, allowed)
                    if best is not None:
                        break
                if best is not None:
                    break
            if best is None:  # unreachable when K^L >= N (check_capacity)
                raise KMeansError(f"collision-free pass: no prefix has room for row {row}")
            new = _digits(best, k, levels - 1)
            shifts[done] = sum(codebooks[l][prefix[l]] - codebooks[l][new[l]] for l in free)
            if cap:
                for l in free:
                    used[l][prefix[l]] -= 1
                    used[l][new[l]] += 1
            sizes.add(best, 1)  # its old group already counts it gone
            codes[row, :-1] = new
            key[row] = best
            done += 1
    return movers, shifts


def _nearest_with_room(base: np.ndarray, books: list[np.ndarray], head: int, sizes: _Sizes, k: int,
                       allowed: list[np.ndarray] | None = None) -> int | None:
    """The key of the nearest prefix ``head + j`` (j enumerating the free levels' codes ``books``, mixed radix) with
    fewer than K items, or None. ``allowed`` (per free level, (K,) bool): the codes a candidate may use there (the
    balanced cap). Candidates are scored a chunk at a time (their reconstructions, (chunk, D))."""
    total = k ** len(books)
    chunk = max(k, 1 << 12)
    best, best_d = None, np.inf
    for s in range(0, total, chunk):
        j = np.arange(s, min(total, s + chunk))
        digits = np.unravel_index(j, (k,) * len(books))
        recon = sum(b[d] for b, d in zip(books, digits))  # (chunk, D)
        d = sq_dist(base[None, :], recon)[0]
        ok = sizes.get(head + j) < k
        for a, dg in zip(allowed or [], digits):
            ok &= a[dg]
        if ok.any():
            i = int(np.argmin(np.where(ok, d, np.inf)))  # first minimum: ties -> the lower prefix
            if d[i] < best_d:
                best, best_d = head + int(j[i]), d[i]
    return best


def collision_free(call: Call, codes: np.ndarray, codebooks: list[np.ndarray], batch_rows: int = BATCH_ROWS,
                   log: Callable[[str], None] | None = None, cap: int = 0) -> tuple[Override, dict]:
    """Make the full codes unique (module doc). ``codes`` (N, L): the learned prefix and, in the last column, each
    row's nearest last-level centroid; ``codebooks`` the L levels' (K, D) centroids; the shards hold each row's
    residual after the first L-1 levels (the last level not yet subtracted). ``codes`` is updated in place.

    Returns the :class:`Override` the shards advance the last level with (the rows whose code changed, their last
    code, the moved rows' residual shifts) and stats: groups matched, items recoded (full code changed), items moved
    (prefix changed), and how far the recoded items moved: mean distance ||x - x^|| to their reconstruction before
    and after, and the mean increase.

    ``cap`` (balanced levels, ``tokenization/balanced.py``): keep every codeword at most ``cap`` items where the
    groups allow it. Groups are matched in prefix order; a last code already at ``cap`` items costs more than any
    matching without it (so it is taken only when a group has fewer free codes than items), and moves avoid prefix
    codes at ``cap`` likewise."""
    n, levels = codes.shape
    k = codebooks[-1].shape[0]
    check_capacity(n, k, levels)
    if k ** levels >= 2 ** 62:
        raise KMeansError(f"collision-free pass: K^L = {k}^{levels} codes do not fit in a 64-bit key")
    batch = max(batch_rows, k)
    old_last = codes[:, -1].copy()
    key = prefix_keys(codes[:, :-1], k)
    movers, shifts = _move_overflow(call, codes, key, codebooks, batch, cap)
    # Groups to match: those with a repeated last code, and those movers landed in.
    full, counts = np.unique(key * k + codes[:, -1], return_counts=True)
    match = np.union1d(full[counts > 1] // k, key[movers])
    rows = np.flatnonzero(np.isin(key, match))
    rows = rows[np.lexsort((rows, key[rows]))]  # by group, rows ascending inside a group
    g = key[rows]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1, len(g)] if len(g) else np.zeros(1, dtype=np.int64)
    last = codebooks[-1]
    new_last = codes[:, -1].copy()
    used = np.bincount(old_last, minlength=k) if cap else None
    before, after = [], []
    changed_rows = []
    i = 0
    while i < len(starts) - 1:  # a batch of whole groups, at most `batch` rows (a group has at most K <= batch)
        j = i + 1
        while j < len(starts) - 1 and starts[j + 1] - starts[i] <= batch:
            j += 1
        part = rows[starts[i]:starts[j]]
        want = np.sort(part)
        (_, r), = gather(call, want, len(want))
        r = r[np.searchsorted(want, part)]  # back to group order
        old_d = sq_dist_at(r, last, old_last[part])
        m = np.searchsorted(movers, part)
        is_mover = np.zeros(len(part), dtype=bool)
        if len(movers):
            is_mover = (m < len(movers)) & (movers[np.minimum(m, len(movers) - 1)] == part)
            r[is_mover] += shifts[m[is_mover]]
        for a, b in zip(starts[i:j], starts[i + 1:j + 1]):
            a, b = a - starts[i], b - starts[i]
            cost = sq_dist(r[a:b], last)  # (m, K)
            pick = cost
            if cap:  # a code at the cap costs more than any matching of this group without it
                np.subtract.at(used, old_last[part[a:b]], 1)
                full = used >= cap
                if full.any():
                    pick = cost + np.where(full, cost.max() * (b - a) + 1.0, 0.0)[None, :]
            _, col = linear_sum_assignment(pick)
            col = _rows_in_order(r[a:b], col)
            if cap:
                np.add.at(used, col, 1)
            new_last[part[a:b]] = col
            new_d = cost[np.arange(b - a), col]
            moved = (col != old_last[part[a:b]]) | is_mover[a:b]
            changed_rows.append(part[a:b][moved])
            before.append(np.sqrt(old_d[a:b][moved]))
            after.append(np.sqrt(new_d[moved]))
        i = j
    codes[:, -1] = new_last
    changed = np.sort(np.concatenate(changed_rows)) if changed_rows else np.zeros(0, dtype=np.int64)
    before = np.concatenate(before) if before else np.zeros(0)
    after = np.concatenate(after) if after else np.zeros(0)
    stats = {
        "groups_matched": int(len(match)),
        "items_moved": int(len(movers)),
        "items_recoded": int(len(changed)),
        "mean_distance_before": float(before.mean()) if len(before) else 0.0,
        "mean_distance_after": float(after.mean()) if len(after) else 0.0,
        "mean_distance_increase": float((after - before).mean()) if len(after) else 0.0,
    }
    if log:
        log(f"collision-free last level: {stats['groups_matched']} prefix groups matched, "
            f"{stats['items_recoded']} items recoded ({stats['items_moved']} moved to another prefix), mean "
            f"distance to their reconstruction {stats['mean_distance_before']:.4g} -> {stats['mean_distance_after']:.4g}")
    return Override(rows=changed, labels=new_last[changed], moved=movers, shifts=shifts), stats


def _rows_in_order(r: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Items with identical residuals are interchangeable in the matching, and which of them the solver gives which
    code turns on the last bits of the centroids (a split changes those by float64 rounding): they take their codes
    in ascending order, in row order."""
    _, inverse, counts = np.unique(r, axis=0, return_inverse=True, return_counts=True)
    if counts.max() == 1:
        return col
    col = col.copy()
    inverse = np.asarray(inverse).reshape(-1)
    for g in np.flatnonzero(counts > 1):
        at = np.flatnonzero(inverse == g)
        col[at] = np.sort(col[at])
    return col


def sq_dist_at(r: np.ndarray, c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(m,) squared distance of each row to its own centroid ``c[labels]``."""
    diff = r - c[labels]
    return (diff * diff).sum(1)
