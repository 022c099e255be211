"""Pure residual k-means: numpy reference vs torch path, split independence, seeding, re-seeding, de-dup."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tokenization.kmeans import (KMeansError, KMeansParams, KMeansShard, Partial, dedup_level, f32_gap_bound,
                                 kmeans_local, kmeans_pp, local_call, split_rows, update)


def _mixture(n=600, d=8, c=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 4
    return (centers[rng.integers(0, c, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_numpy_torch_and_any_split_give_the_same_codes():
    x = _mixture()
    p = KMeansParams(k=8, seed=3)
    ref = kmeans_local(x, 3, p, dedup=True)
    for shards, backend in [(3, "numpy"), (1, "torch"), (4, "torch")]:
        other = kmeans_local(x, 3, p, dedup=True, shards=shards, backend=backend)
        np.testing.assert_array_equal(other.codes, ref.codes)
        for a, b in zip(other.codebooks, ref.codebooks):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    assert ref.codes.shape == (600, 4)
    assert ref.stats["reconstruction_rel"] < 0.5  # 3 x 8 centroids explain most of a 12-cluster mixture


def test_lloyd_lowers_inertia_against_a_plain_assignment():
    x = _mixture(seed=1).astype(np.float64)
    res = kmeans_local(x, 1, KMeansParams(k=12, seed=0, max_iters=100))
    # Every point sits at its nearest final centroid, and no other labelling of these centroids does better.
    c = res.codebooks[0]
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.codes[:, 0], d.argmin(1))
    assert res.stats["levels"][0]["inertia"] == pytest.approx(d.min(1).sum(), rel=1e-9)
    assert res.stats["levels"][0]["converged"]


def test_seeding_is_deterministic_and_depends_on_the_seed():
    x = _mixture().astype(np.float64)
    a, b, c = kmeans_pp(x, 8, seed=1), kmeans_pp(x, 8, seed=1), kmeans_pp(x, 8, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # k-means++ picks distinct rows of x
    assert len({tuple(r) for r in a}) == 8 and all((x == r).all(1).any() for r in a)


def test_kmeans_pp_on_duplicate_rows_still_returns_k_centroids():
    x = np.repeat(np.eye(2), 5, axis=0)  # 2 distinct points, 10 rows
    c = kmeans_pp(x, 4, seed=0)
    assert c.shape == (4, 2)


def test_empty_cluster_reseeded_with_the_farthest_row():
    x = np.array([[0.0], [0.1], [0.2], [10.0]])
    shard = KMeansShard(x, np.arange(4))
    centroids = np.array([[0.1], [100.0]])  # cluster 1 gets nobody
    stats = shard.partial(centroids)
    assert list(stats.counts) == [4, 0]
    new, reseeded = update(stats, centroids, local_call([shard]))
    assert reseeded == 1
    np.testing.assert_allclose(new[1], [10.0])  # the farthest row moved into the empty cluster
    np.testing.assert_allclose(new[0], [0.1])  # and left its donor
    # Without a way to ask the shards, an empty cluster keeps its centroid.
    same, r = update(Partial(stats.sums, stats.counts, stats.inertia), centroids, None)
    assert r == 0 and same[1, 0] == 100.0


def test_reseeding_tie_goes_to_the_lower_global_row_whatever_the_split():
    x = np.array([[0.0], [5.0], [-5.0], [0.0]])  # rows 1 and 2 equally far from 0
    centroids = np.array([[0.0], [1e6]])
    for cut in (1, 2, 3):
        shards = [KMeansShard(x[:cut], np.arange(cut)), KMeansShard(x[cut:], np.arange(cut, 4))]
        call = local_call(shards)
        from tokenization.kmeans import reduce_partials

        new, _ = update(reduce_partials(call("partial", centroids)), centroids, call)
        assert new[1, 0] == 5.0


def test_dedup_level_makes_codes_unique_in_item_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    extra, size = dedup_level(codes)
    assert list(extra) == [0, 0, 1, 2, 0] and size == 3
    full = np.concatenate([codes, extra[:, None]], 1)
    assert len(np.unique(full, axis=0)) == len(codes)
    res = kmeans_local(_mixture(n=200), 2, KMeansParams(k=4, seed=0), dedup=True)
    assert len(np.unique(res.codes, axis=0)) == 200
    assert res.codebook_sizes[-1] == res.codes[:, -1].max() + 1


def test_bad_input_errors():
    x = _mixture(n=10)
    with pytest.raises(KMeansError, match="K=16 clusters is more than the 10 points"):
        kmeans_local(x, 1, KMeansParams(k=16))
    x[7, 2] = np.nan
    with pytest.raises(KMeansError, match="row 7 has a NaN"):
        kmeans_local(x, 1, KMeansParams(k=2))
    x[7, 2] = np.inf
    with pytest.raises(KMeansError, match="row 7"):
        kmeans_local(x, 1, KMeansParams(k=2))


def test_max_iters_bounds_the_lloyd_steps():
    res = kmeans_local(_mixture(), 1, KMeansParams(k=8, seed=0, max_iters=1, tol=0.0))
    assert res.stats["levels"][0]["iterations"] == 1 and not res.stats["levels"][0]["converged"]


def test_core_modules_import_without_engines():
    """The pure core never imports ray, deepspeed or mlflow (STYLE practice 1)."""
    code = ("import sys\n"
            "for m in ('ray', 'deepspeed', 'mlflow'): sys.modules[m] = None\n"
            "import tokenization.kmeans, tokenization.embed, tokenization.embedding_store\n"
            "import tokenization.balanced, tokenization.collision_free\n"
            "import genrec_dist.data.semantic_ids\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_torch_on_cuda_gives_the_numpy_codes():
    x = _mixture(n=5000, d=64, c=40)
    p = KMeansParams(k=32, seed=0)
    ref = kmeans_local(x, 3, p, dedup=True)
    gpu = kmeans_local(x, 3, p, dedup=True, shards=2, backend="torch", device="cuda")
    np.testing.assert_array_equal(gpu.codes, ref.codes)


def _near_ties(seed=0, k=6, d=16, n=400):
    """Rows on (or 1e-12..1e-6 relative off) the bisector of two centroids: float32 cannot rank those, float64 can
    (or they tie exactly: small integers, so every float64 operation is exact and the lower index must win)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(-8, 9, size=(k, d)).astype(np.float64) * 2.0  # even, so midpoints are integers
    rows = []
    for i in range(n):
        a, b = rng.choice(k, 2, replace=False)
        mid, u = (c[a] + c[b]) / 2, c[a] - c[b]
        off = 0.0 if i % 4 == 0 else rng.choice([-1, 1]) * 10.0 ** rng.uniform(-12, -6)
        rows.append(mid + off * u + (rng.normal(size=d) * 5 if i % 5 == 4 else 0.0))  # some ordinary rows too
    x = np.array(rows) + 100.0  # an offset: large norms make the float32 scores coarser still
    return x, c + 100.0


def test_fast_assignment_is_the_float64_assignment_on_near_ties():
    x, c = _near_ties()
    ref = KMeansShard(x, np.arange(len(x))).assign_f64(c)
    # The float32 argmin alone gets some of these rows wrong, so the float64 re-check is really exercised.
    x32, c32 = x.astype(np.float32), c.astype(np.float32)
    assert ((c32 * c32).sum(1)[None] - 2 * x32 @ c32.T).argmin(1).tolist() != ref.tolist()
    for backend in ("numpy", "torch"):
        for parts in (1, 2, 3, 4):
            got = np.concatenate([np.asarray(KMeansShard(xs, rows, backend).assign(c)) for xs, rows in
                                  split_rows(x, parts)])
            np.testing.assert_array_equal(got, ref)


def test_f32_gap_bound_covers_the_float32_score_error():
    rng = np.random.default_rng(1)
    for scale, offset in [(1.0, 0.0), (1e-3, 30.0), (50.0, 0.0)]:
        x = rng.normal(size=(500, 96)) * scale + offset
        c = rng.normal(size=(64, 96)) * scale + offset
        x32, c32 = x.astype(np.float32), (-2.0 * c).astype(np.float32)
        t32 = (x32 @ c32.T + (c * c).sum(1).astype(np.float32)).astype(np.float64)
        xl, cl = x.astype(np.longdouble), c.astype(np.longdouble)
        exact = (cl * cl).sum(1)[None] - 2 * xl @ cl.T  # extended precision: the reference for the error
        err = np.abs(t32 - exact).max(1).astype(np.float64)
        bound = f32_gap_bound(np.sqrt((x * x).sum(1)), float(np.sqrt((c * c).sum(1).max())), 96) / 2
        assert (err <= bound).all() and (err > bound / 1e4).any()  # holds, and is not vacuously loose


def test_residual_kmeans_codes_equal_the_all_float64_run(monkeypatch):
    x = _mixture(n=3000, d=24, c=30, seed=4)
    p = KMeansParams(k=16, seed=1)
    fast = kmeans_local(x, 3, p, dedup=True, shards=3)
    monkeypatch.setattr(KMeansShard, "assign", lambda self, c, idx=None: self.assign_f64(c, idx))
    slow = kmeans_local(x, 3, p, dedup=True)
    np.testing.assert_array_equal(fast.codes, slow.codes)
    for a, b in zip(fast.codebooks, slow.codebooks):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
