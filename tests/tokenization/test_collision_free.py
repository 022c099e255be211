"""Collision-free last level and balanced levels: unique codes, split independence, oversized groups, the cap."""

from __future__ import annotations

import numpy as np
import pytest

from tokenization.balanced import capacity
from tokenization.kmeans import KMeansError, KMeansParams, kmeans_local


def _mixture(n=500, d=8, c=6, seed=0, spread=0.3):
    """Few tight clusters: plain residual k-means gives many items the same full code."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 4
    return (centers[rng.integers(0, c, n)] + rng.normal(size=(n, d)) * spread).astype(np.float32)


def _shared(codes: np.ndarray) -> int:
    """Items that share their full code with another item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return int((counts[np.asarray(inverse).reshape(-1)] > 1).sum())


def _recon_sq(x: np.ndarray, res) -> np.ndarray:
    recon = sum(cb[res.codes[:, lv]] for lv, cb in enumerate(res.codebooks))
    return ((np.asarray(x, dtype=np.float64) - recon) ** 2).sum(1)


def test_no_two_items_share_a_code_and_codes_do_not_depend_on_the_split():
    x = _mixture()
    p = KMeansParams(k=8, seed=1)
    plain = kmeans_local(x, 3, p)
    assert _shared(plain.codes) > 100  # the test is not vacuous: today's codes collide
    free = kmeans_local(x, 3, p, collision_free=True)
    assert free.codes.shape == (500, 3)  # L learned levels, no de-dup level even though dedup could add one
    assert _shared(free.codes) == 0 and free.stats["collision_rate"] == 0.0
    for shards, backend in [(3, "numpy"), (2, "torch")]:
        other = kmeans_local(x, 3, p, shards=shards, backend=backend, collision_free=True)
        np.testing.assert_array_equal(other.codes, free.codes)
    # The shards' residuals follow the new codes (moved items included): the reported error is the real one.
    assert free.stats["reconstruction_mse"] == pytest.approx(_recon_sq(x, free).mean(), rel=1e-9)
    cf = free.stats["collision_free"]
    changed = (free.codes != plain.codes).any(1)
    assert cf["items_recoded"] == int(changed.sum()) > 0
    # Each recoded item's distance to its reconstruction: before = its plain code's, after = its new code's.
    d_plain, d_free = np.sqrt(_recon_sq(x, plain)), np.sqrt(_recon_sq(x, free))
    assert cf["mean_distance_before"] == pytest.approx(d_plain[changed].mean(), rel=1e-6)
    assert cf["mean_distance_increase"] == pytest.approx((d_free - d_plain)[changed].mean(), rel=1e-6)
    assert cf["mean_distance_increase"] > 0
    # Groups with no collision that no moved item joined keep today's codes.
    pk = plain.codes[:, 0] * 8 + plain.codes[:, 1]
    full, counts = np.unique(pk * 8 + plain.codes[:, 2], return_counts=True)
    moved = (free.codes[:, :2] != plain.codes[:, :2]).any(1)
    joined = free.codes[moved, 0] * 8 + free.codes[moved, 1]
    untouched = ~np.isin(pk, full[counts > 1] // 8) & ~np.isin(pk, joined)
    assert untouched.sum() > 0
    np.testing.assert_array_equal(free.codes[untouched], plain.codes[untouched])


def test_matching_inside_a_group_is_the_minimum_cost_one():
    """Every final prefix group (moved items included) has the optimal one-code-each assignment of its residuals."""
    from itertools import permutations

    x = _mixture(n=60, seed=3)
    p = KMeansParams(k=4, seed=0)
    free = kmeans_local(x, 3, p, collision_free=True)
    last = free.codebooks[-1]
    prefix_recon = free.codebooks[0][free.codes[:, 0]] + free.codebooks[1][free.codes[:, 1]]
    r = x.astype(np.float64) - prefix_recon
    _, inv = np.unique(free.codes[:, :2], axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    checked = 0
    for g in np.unique(inv):
        rows = np.flatnonzero(inv == g)
        if len(rows) < 2:
            continue
        cost = ((r[rows, None, :] - last[None]) ** 2).sum(-1)  # (m, K)
        best = min(sum(cost[i, c] for i, c in enumerate(perm)) for perm in permutations(range(4), len(rows)))
        got = cost[np.arange(len(rows)), free.codes[rows, 2]].sum()
        assert got == pytest.approx(best, rel=1e-9)
        checked += 1
    assert checked >= 3


def test_a_group_larger_than_k_is_split_onto_the_nearest_prefixes():
    rng = np.random.default_rng(0)
    # 30 copies of one point (one prefix group of 30 > K = 4) and 20 points around it: 50 items, K^L = 64 codes.
    x = np.concatenate([np.tile(rng.normal(size=(1, 6)), (30, 1)), rng.normal(size=(20, 6)) * 3]).astype(np.float32)
    p = KMeansParams(k=4, seed=0)
    plain = kmeans_local(x, 3, p)
    assert np.unique(plain.codes[:30], axis=0).shape[0] == 1  # all copies share one full code today
    free = kmeans_local(x, 3, p, collision_free=True)
    assert _shared(free.codes) == 0
    cf = free.stats["collision_free"]
    assert cf["items_moved"] >= 26  # at most K copies stay in their prefix
    kept = (free.codes[:30, :2] == plain.codes[0, :2]).all(1)
    assert kept.sum() == 4  # the group ends with exactly K items (the others went to the nearest prefixes)
    assert free.stats["reconstruction_mse"] == pytest.approx(_recon_sq(x, free).mean(), rel=1e-9)
    np.testing.assert_array_equal(kmeans_local(x, 3, p, shards=3, collision_free=True).codes, free.codes)


def test_too_few_codes_for_the_items_is_a_clear_error():
    x = _mixture(n=70)
    with pytest.raises(KMeansError, match=r"tokenize.collision_free: 70 items cannot have distinct codes .*K\^L = 64"):
        kmeans_local(x, 3, KMeansParams(k=4), collision_free=True)


def test_balanced_levels_cap_every_codeword_and_do_not_depend_on_the_split():
    x = _mixture(n=600, c=3, seed=2)  # 3 tight clusters for K = 8 codewords: plain k-means is skewed
    p = KMeansParams(k=8, seed=0, balance=1.25)
    cap = capacity(600, 8, 1.25)
    assert cap == 94
    plain = kmeans_local(x, 3, KMeansParams(k=8, seed=0))
    assert max(np.bincount(plain.codes[:, lv]).max() for lv in range(3)) > cap  # today's codes break the cap
    bal = kmeans_local(x, 3, p)
    for lv in range(3):
        assert np.bincount(bal.codes[:, lv], minlength=8).max() <= cap
        assert bal.stats["levels"][lv]["max_share"] <= cap / 600
    assert bal.stats["balance_capacity"] == cap
    np.testing.assert_array_equal(kmeans_local(x, 3, p, shards=3).codes, bal.codes)
    tb = kmeans_local(x, 3, p, shards=2, backend="torch")  # the torch path keeps the cap as well
    assert all(np.bincount(tb.codes[:, lv], minlength=8).max() <= cap for lv in range(3))
    # Exactly balanced (1.0): ceil(N / K) each.
    even = kmeans_local(x, 2, KMeansParams(k=8, seed=0, balance=1.0))
    assert all(np.bincount(even.codes[:, lv], minlength=8).max() <= 75 for lv in range(2))
    # With collision-free codes as well: unique, and the matching and the moves keep to the cap where groups allow.
    p9 = KMeansParams(k=9, seed=0, balance=1.05)  # tight: ignoring the cap in the pass breaks it here (72 > 70)
    both = kmeans_local(x, 3, p9, collision_free=True)
    assert _shared(both.codes) == 0 and both.stats["collision_free"]["items_recoded"] > 0
    for lv in range(3):
        assert np.bincount(both.codes[:, lv], minlength=9).max() <= capacity(600, 9, 1.05)
    np.testing.assert_array_equal(kmeans_local(x, 3, p9, shards=2, collision_free=True).codes, both.codes)
    with pytest.raises(KMeansError, match="balance must be >= 1"):
        kmeans_local(x, 1, KMeansParams(k=8, balance=0.5))


def test_code_settings_refused_before_embedding():
    from types import SimpleNamespace

    from genrec_dist.errors import ConfigError
    from tokenization.pipeline import check_code_settings

    tc = SimpleNamespace(method="rkmeans", collision_free=True, balance=0.0, levels=2, codebook_size=8,
                         kmeans=SimpleNamespace(minibatch=0))
    with pytest.raises(ConfigError, match=r"tokenize.collision_free: 120 items .*tokenize.levels=2 x "
                                          r"tokenize.codebook_size=8 \(K\^L = 64\)"):
        check_code_settings(tc, 120)
    check_code_settings(tc, 64)
    tc.balance = 0.5
    with pytest.raises(ConfigError, match=r"tokenize.balance=0.5"):
        check_code_settings(tc, 64)
    tc.balance, tc.method = 1.0, "import"
    with pytest.raises(ConfigError, match="tokenize.method=import"):
        check_code_settings(tc, 64)


def test_one_and_three_ray_workers_give_the_same_collision_free_balanced_codes(ray_local):
    from tokenization.ray_kmeans import ray_residual_kmeans

    x = _mixture(n=400, seed=5)
    p = KMeansParams(k=8, seed=7, balance=1.5)
    one = ray_residual_kmeans(x, 3, p, dedup=True, num_workers=1, collision_free=True)
    three = ray_residual_kmeans(x, 3, p, dedup=True, num_workers=3, collision_free=True)
    np.testing.assert_array_equal(one.codes, three.codes)
    np.testing.assert_array_equal(one.codes, kmeans_local(x, 3, p, collision_free=True).codes)
    assert one.codes.shape == (400, 3) and _shared(one.codes) == 0
    a, b = one.stats["collision_free"], three.stats["collision_free"]
    assert a == pytest.approx(b, rel=1e-9)  # counts exactly; distances up to float64 rounding of the centroids
    assert a["items_recoded"] > 0


def test_collisions_without_an_oversized_group():
    """Groups of at most K items that collide: matched, nothing moved."""
    x = _mixture(n=60, c=20, seed=4, spread=1.0)
    p = KMeansParams(k=16, seed=0)
    plain = kmeans_local(x, 2, p)
    assert _shared(plain.codes) > 0 and np.unique(plain.codes[:, 0], return_counts=True)[1].max() <= 16
    free = kmeans_local(x, 2, p, collision_free=True)
    assert _shared(free.codes) == 0 and free.stats["collision_free"]["items_moved"] == 0
    np.testing.assert_array_equal(free.codes[:, 0], plain.codes[:, 0])


def test_batches_of_groups_do_not_change_the_codes():
    """The driver's batches of whole groups (batch_rows) and the shards' split are invisible in the result."""
    from tokenization.collision_free import collision_free
    from tokenization.kmeans import KMeansShard, local_call, split_rows

    x = _mixture(n=300, seed=6).astype(np.float64)
    plain = kmeans_local(x, 3, KMeansParams(k=8, seed=2))
    books = plain.codebooks
    prefix_recon = books[0][plain.codes[:, 0]] + books[1][plain.codes[:, 1]]
    runs = []
    for batch, shards in [(8, 3), (100_000, 1)]:
        call = local_call([KMeansShard(xs, rows) for xs, rows in split_rows(x - prefix_recon, shards)])
        codes = plain.codes.copy()
        how, stats = collision_free(call, codes, books, batch_rows=batch)
        runs.append((codes, how, stats))
    (a, ha, sa), (b, hb, sb) = runs
    assert _shared(a) == 0 and sa["items_recoded"] > 0 and sa["items_moved"] > 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ha.rows, hb.rows)
    np.testing.assert_array_equal(ha.shifts, hb.shifts)
    assert sa == sb


@pytest.mark.gpu
def test_collision_free_and_balanced_on_cuda():
    x = _mixture(n=3000, d=32, c=10)
    p = KMeansParams(k=16, seed=0)
    ref = kmeans_local(x, 3, p, collision_free=True)
    gpu = kmeans_local(x, 3, p, shards=2, backend="torch", device="cuda", collision_free=True)
    np.testing.assert_array_equal(gpu.codes, ref.codes)
    # Balanced prices come from float64 margins, whose last bits differ between cuBLAS and the CPU BLAS: the cap and
    # the uniqueness are asserted, not equality with numpy.
    pb = KMeansParams(k=16, seed=0, balance=1.1)
    bal = kmeans_local(x, 3, pb, shards=2, backend="torch", device="cuda", collision_free=True)
    assert _shared(bal.codes) == 0
    assert all(np.bincount(bal.codes[:, lv], minlength=16).max() <= capacity(3000, 16, 1.1) for lv in range(3))
