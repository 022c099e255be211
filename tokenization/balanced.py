"""Capacity-constrained (balanced) assignment of rows to centroids: no codeword takes more than ``cap`` rows.

OneRec (Deng et al., "OneRec: Unifying Retrieve and Rank with Generative Recommender", arXiv 2502.18965, §2.1)
tokenizes with balanced k-means: every cluster holds N/K items, so no codeword is dominated by one cluster. Its
greedy (each cluster in turn takes its nearest unassigned items) is sequential over clusters; here the same
constraint is met in the shape of our distributed Lloyd step, by per-cluster prices (the dual of the
capacity-constrained transport problem, as in Bertsekas' auction algorithm):

- every row takes the centroid minimising squared distance + ``bias[j]`` (bias 0: plain nearest centroid);
- one round = one map (rows per cluster, :meth:`KMeansShard.counts`) and one reduce; each cluster over ``cap`` with
  ``e`` rows too many raises its bias just past the e-th smallest margin of its rows (second-best biased score minus
  best; :meth:`KMeansShard.margins`, the shards' smallest e merged on the driver), so at least e rows leave at once;
- prices only rise and are sums of float64 margins computed row by row, merged in (margin, global row) order: the
  same for any split of the rows;
- after ``rounds`` rounds, the rows still too many in a cluster (smallest margins first, ties: lower row) are placed
  one by one, in that order, on their best cluster with room (a fix-up, rarely needed) and sent as fixed labels.

The driver holds K prices and, per round, the margins of the clusters' excess rows.
"""

from __future__ import annotations

import math

import numpy as np

from tokenization.kmeans_call import Call, KMeansError, Override


def capacity(n: int, k: int, balance: float, setting: str = "tokenize.balance") -> int:
    """Most rows per codeword: ceil(balance * N / K); ``balance`` >= 1 (1: every codeword at most ceil(N/K))."""
    if balance < 1.0:
        raise KMeansError(f"{setting}={balance}: a codeword's capacity is balance x N/K, so balance must be >= 1 "
                          f"(1.0: equal sizes) or 0 (off)")
    return max(1, math.ceil(balance * n / k - 1e-9))


def balanced_labels(call: Call, centroids: np.ndarray, cap: int, rounds: int = 10) -> tuple[Override, dict]:
    """The :class:`Override` (prices, and fixed labels if the rounds did not settle it) under which every cluster
    holds at most ``cap`` rows; and {rounds, fixed rows}."""
    k = len(centroids)
    bias = np.zeros(k)
    scale = float((centroids * centroids).sum(1).mean()) + 1.0  # for a strict step past a margin of 0
    counts = np.sum(call("counts", centroids, Override(bias=bias)), axis=0)
    n = int(counts.sum())
    if cap * k < n:
        raise KMeansError(f"balanced assignment: {k} clusters of at most {cap} rows cannot hold {n} rows")
    r = 0
    for r in range(1, rounds + 1):
        over = np.flatnonzero(counts > cap)
        if not len(over):
            return Override(bias=bias), {"rounds": r - 1, "fixed": 0}
        excess = counts[over] - cap
        got = call("margins", centroids, bias, over, excess)
        for i, (j, e) in enumerate(zip(over, excess)):
            m = np.concatenate([g[i][0] for g in got])
            rows = np.concatenate([g[i][1] for g in got])
            m = m[np.lexsort((rows, m))]
            step = float(m[e - 1])
            bias[j] += step + 1e-9 * (abs(step) + abs(bias[j]) + scale)
        counts = np.sum(call("counts", centroids, Override(bias=bias)), axis=0)
    over = np.flatnonzero(counts > cap)
    if not len(over):
        return Override(bias=bias), {"rounds": r, "fixed": 0}
    # Fix-up: the excess rows of each cluster still over, smallest margins first, to their best cluster with room.
    excess = counts[over] - cap
    got = call("margins", centroids, bias, over, excess)
    keep = []  # each shard sent up to e rows per cluster; the cluster's e smallest of them leave
    for i, e in enumerate(excess):
        mi = np.concatenate([g[i][0] for g in got])
        ri = np.concatenate([g[i][1] for g in got])
        o = np.lexsort((ri, mi))[:e]
        keep.append((mi[o], ri[o]))
    m = np.concatenate([a for a, _ in keep])
    rows = np.concatenate([b for _, b in keep])
    order = np.lexsort((rows, m))
    rows = rows[order]
    want = np.sort(rows)
    got = call("scores", centroids, bias, want)
    srows = np.concatenate([g[0] for g in got])
    scores = np.concatenate([g[1] for g in got])[np.argsort(srows, kind="stable")]
    scores = scores[np.searchsorted(want, rows)]  # in placement order
    room = cap - counts
    room[over] = 0  # the movers leave their clusters, which end exactly at cap
    labels = np.empty(len(rows), dtype=np.int64)
    for i, s in enumerate(scores):
        s = np.where(room > 0, s, np.inf)
        j = int(np.argmin(s))
        if not np.isfinite(s[j]):
            raise KMeansError("balanced assignment: no cluster has room (capacity below N / K)")
        labels[i] = j
        room[j] -= 1
    o = np.argsort(rows)
    return Override(bias=bias, rows=rows[o], labels=labels[o]), {"rounds": r, "fixed": int(len(rows))}
