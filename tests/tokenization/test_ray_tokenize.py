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


def test_a_lost_kmeans_worker_is_replaced_and_the_codes_are_the_same(ray_local):
    """A k-means actor killed after the first level (its process SIGKILLed, as when its node goes) is replaced by a
    new one that replays its shard's changes: the job completes with the codes of an undisturbed run."""
    import signal
    import subprocess

    from tokenization.ray_kmeans import ray_residual_kmeans

    x = _mixture(n=1200)
    p = KMeansParams(k=16, seed=7)
    undisturbed = ray_residual_kmeans(x, 3, p, num_workers=2)
    killed = []

    def log(msg: str) -> None:
        if msg.startswith("k-means level 1/") and not killed:  # level 1 is done: shard state has changed once
            # an actor's worker process is titled "ray::KMeansShard" (the GCS actor table has no pid to read here)
            pids = [int(p) for p in subprocess.run(["pgrep", "-f", "^ray::KMeansShard"], capture_output=True,
                                                   text=True).stdout.split()]
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    lost = ray_residual_kmeans(x, 3, p, num_workers=2, log=log)
    assert killed and sum(lost.stats["workers_replaced"].values()) == 1
    np.testing.assert_array_equal(lost.codes, undisturbed.codes)
    np.testing.assert_allclose(lost.codebooks[2], undisturbed.codebooks[2], rtol=0, atol=0)


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


def _stored(root, x, rows_per_shard):
    from genrec_dist import storage
    from tokenization.embedding_store import embedding_shards, list_shards

    for name, data in embedding_shards(np.arange(1, len(x) + 1), x, rows_per_shard).items():
        storage.write_bytes(f"{root}/{name}", data)
    return list_shards(f"{root}/embeddings")


def test_actors_reading_their_own_shards_give_the_in_memory_codes_for_1_and_3_workers(ray_local, tmp_path):
    from tokenization.ray_kmeans import ray_residual_kmeans

    x = _mixture()
    files = _stored(tmp_path, x, rows_per_shard=128)  # 8 files; 3 readers cut through some of them
    p = KMeansParams(k=16, seed=7)
    ref = kmeans_local(x, 3, p, dedup=True)
    one = ray_residual_kmeans(files, 3, p, dedup=True, num_workers=1)
    three = ray_residual_kmeans(files, 3, p, dedup=True, num_workers=3)
    np.testing.assert_array_equal(one.codes, ref.codes)
    np.testing.assert_array_equal(three.codes, ref.codes)
    assert [r["rows"] for r in three.stats["readers"]] == [300, 300, 300]
    assert three.stats["readers"][1]["files"] == [f for f, _ in files[2:5]]  # rows 300..599
    # Mini-batch Lloyd steps (a sample of rows per step): still the same codes for any number of workers, and a
    # clustering nearly as good as full Lloyd's on this mixture.
    mb = KMeansParams(k=16, seed=7, minibatch=200, max_iters=30)
    mb1 = ray_residual_kmeans(files, 2, mb, num_workers=1)
    mb3 = ray_residual_kmeans(files, 2, mb, num_workers=3)
    np.testing.assert_array_equal(mb1.codes, mb3.codes)
    np.testing.assert_array_equal(mb1.codes, kmeans_local(x, 2, mb, shards=2).codes)
    assert not np.array_equal(mb1.codes, ref.codes[:, :2])  # really another algorithm
    assert mb1.stats["levels"][0]["inertia"] < 1.2 * ref.stats["levels"][0]["inertia"]


_CLUSTER_RUN = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from genrec_dist.config import load_config
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20})
for i in range(2):  # two worker nodes, each with its own CPU and a resource naming it
    cluster.add_node(num_cpus=1, resources={f"node{i}": 1}, object_store_memory=80 << 20)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from genrec_dist.tracking import make_tracker
from tokenization.pipeline import run_tokenize
cfg = load_config(sys.argv[1], sys.argv[2:])
summary = run_tokenize(cfg, log=lambda m: print(m, flush=True), tracking=make_tracker)
nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k in ("node0", "node1")) for n in ray.nodes() if n["Alive"]}
print("RESULT " + json.dumps({"readers": summary["stats"]["readers"], "nodes": nodes}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_tokenize_on_a_two_node_cluster_reads_shards_where_their_actor_runs(tiny_dataset, tmp_path):
    """ray.cluster_utils.Cluster: a head without CPUs and two 1-CPU nodes. Each k-means actor lands on its own node
    and reads only its rows' files from the configured embeddings folder; the codes equal one process's."""
    import json
    import subprocess
    import sys

    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.semantic_ids import read_semantic_ids
    from tokenization.embedding_store import shards_for
    from _util import REPO

    n = Dataset.open(tiny_dataset).num_items
    x = _mixture(n=n, d=8, c=10, seed=3)
    files = _stored(tmp_path, x, rows_per_shard=25)
    out = tmp_path / "sids"
    overrides = [f"workdir={tmp_path}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={out}",
                 f"tokenize.embeddings_path={tmp_path}/embeddings", "tokenize.levels=2", "tokenize.codebook_size=8",
                 "tokenize.num_workers=2", "tracking.enabled=false", "seed=5"]
    proc = subprocess.run([sys.executable, "-c", _CLUSTER_RUN, os.path.join(REPO, "configs", "synthetic.yaml"),
                           *overrides], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "read embedding rows:" in proc.stdout and "ETA" in proc.stdout
    got = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    readers, nodes = got["readers"], got["nodes"]
    assert len({r["node"] for r in readers}) == 2  # one actor per node
    assert {tuple(nodes[r["node"]]) for r in readers} == {("node0",), ("node1",)}  # on the worker nodes
    for r in readers:  # each actor read exactly the files of its rows
        assert r["files"] == [s.file for s in shards_for(files, r["rank"], 2)]
    from genrec_dist.config import load_config

    tc = load_config(os.path.join(REPO, "configs", "synthetic.yaml"), overrides).tokenize
    ref = kmeans_local(x, 2, KMeansParams(k=8, max_iters=tc.max_iters, tol=tc.tol, seed=5), dedup=True)
    np.testing.assert_array_equal(read_semantic_ids(str(out)).codes[1:], ref.codes)
    assert sorted(os.listdir(out / "embeddings")) == [f"part-{i:05d}.parquet" for i in range(len(files))]
