"""The Ray layer on the session's local Ray: k-means split over actors, embedding with a worker that dies."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from tokenization.embed import TextEmbedder
from tokenization.kmeans import KMeansParams, kmeans_local


def _mixture(n=900, d=16, c=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 3
    return (centers[rng.integers(0, c, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_one_and_three_ray_workers_give_the_same_codes(ray_local):
    from tokenization.ray_kmeans import ray_residual_kmeans

    x = _mixture()
    p = KMeansParams(k=16, seed=7)
    one = ray_residual_kmeans(x, 3, p, dedup=True, num_workers=1)
    three = ray_residual_kmeans(x, 3, p, dedup=True, num_workers=3)
    np.testing.assert_array_equal(one.codes, three.codes)
    np.testing.assert_array_equal(one.codes, kmeans_local(x, 3, p, dedup=True).codes)
    assert one.stats["levels"] == three.stats["levels"] or all(
        a["inertia"] == pytest.approx(b["inertia"], rel=1e-9) for a, b in zip(one.stats["levels"],
                                                                              three.stats["levels"]))
    assert len(np.unique(one.codes, axis=0)) == len(x)
    # A different seed gives a different tokenization (the seed is really used).
    other = ray_residual_kmeans(x, 3, KMeansParams(k=16, seed=8), num_workers=2)
    assert not np.array_equal(other.codes, one.codes[:, :3])


def _crash_once(marker: str) -> type:
    # Defined in a function so cloudpickle ships the class by value to the Ray workers.
    class CrashOnce(TextEmbedder):
        def __call__(self, batch):
            if not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(str(os.getpid()))
                os._exit(1)  # the worker process dies mid-batch, as on a lost node
            return super().__call__(batch)

    return CrashOnce


def test_worker_killed_during_embedding_output_unchanged(ray_local, tmp_path):
    from tokenization.ray_embed import embed_items

    rng = np.random.default_rng(0)
    words = ["probe", "meter", "glove", "sensor", "cable", "valve", "pump", "filter", "lamp", "tape"]
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(48)]
    items = pl.DataFrame({"item_id": np.arange(1, 49, dtype=np.int32), "text": texts})
    ids_a, emb_a, info = embed_items(items, num_workers=2, batch_size=8)
    marker = str(tmp_path / "crashed")
    ids_b, emb_b, _ = embed_items(items, num_workers=2, batch_size=8, embedder_cls=_crash_once(marker))
    assert os.path.exists(marker)  # a worker really died
    np.testing.assert_array_equal(ids_a, np.arange(1, 49))
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(emb_a, emb_b, atol=1e-5)
    assert info["dim"] == 384 and emb_a.dtype == np.float32
