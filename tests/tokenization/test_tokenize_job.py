"""jobs/tokenize.py as users run it (subprocess), its outputs and MLflow run, import/export, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec_dist import storage
from genrec_dist.config import load_config
from genrec_dist.data.dataset import Dataset, write_dataset
from genrec_dist.data.semantic_ids import read_lcrec_index, read_semantic_ids
from genrec_dist.tracking import make_tracker

from _util import REPO, run_job

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")


def _cfg(root, dataset, *overrides):
    return load_config(CONFIG, [f"workdir={root}", f"paths.dataset={dataset}", f"paths.semantic_ids={root}/sids",
                                *overrides])


def test_help_runs_without_shadowing_stdlib_tokenize():
    proc = run_job("tokenize", "--help")
    assert "usage: jobs/tokenize.py" in proc.stdout
    assert proc.stdout.count("usage:") == 1  # the job body did not run a second time as the `tokenize` module


@pytest.fixture(scope="module")
def job_run(tiny_dataset, tmp_path_factory):
    """One end-to-end `python jobs/tokenize.py` on the tiny synthetic dataset (starts its own local Ray)."""
    root = tmp_path_factory.mktemp("tokenize-job")
    proc = run_job("tokenize", "--config", CONFIG, f"workdir={root}", f"paths.dataset={tiny_dataset}",
                   f"paths.semantic_ids={root}/sids", "levels=2", "codebook_size=8", "num_workers=2",
                   env={"HF_HUB_OFFLINE": "1"})
    return root, proc


def test_job_end_to_end_outputs_and_mlflow(job_run, tiny_dataset):
    root, proc = job_run
    out = f"{root}/sids"
    assert "k-means level 2/2" in proc.stdout and "embedded" in proc.stdout
    ds = Dataset.open(tiny_dataset)
    sids = read_semantic_ids(out)
    assert sids.num_items == ds.num_items and sids.num_levels == 3  # 2 learned + de-dup
    assert sids.codebook_sizes[:2] == [8, 8] and sids.has_dedup_level
    assert len(np.unique(sids.codes[1:], axis=0)) == ds.num_items  # unique after de-dup
    stats = json.loads(open(f"{out}/stats.json").read())
    assert [lv["k"] for lv in stats["levels"]] == [8, 8]
    assert 0 < stats["levels"][0]["utilisation"] <= 1 and 0 <= stats["collision_rate"] <= 1
    assert stats["levels"][1]["inertia"] < stats["levels"][0]["inertia"]  # residual levels keep explaining
    assert 0 < stats["reconstruction_rel"] < 1 and stats["embedding"]["empty_text_items"] == 0
    # Embeddings: item order, float32 fixed-size vectors.
    table = pq.read_table(f"{out}/embeddings/part-00000.parquet")
    assert table.column("item_id").to_pylist() == list(range(1, ds.num_items + 1))
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    cb = np.load(f"{out}/codebooks.npz")
    assert cb["level_0"].shape == (8, 384)
    # The exported LC-Rec index reads back to the same codes.
    back = read_lcrec_index(f"{out}/synthetic.index.json", ds.items())
    np.testing.assert_array_equal(back.codes, sids.codes)
    # The MLflow run: config params, stats metrics, files as artifacts.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("genrec-dist").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["genrec.job"] == "tokenize"
    assert run.data.params["tokenize.codebook_size"] == "8"
    assert run.data.metrics["collision_rate"] == pytest.approx(stats["collision_rate"])
    assert run.data.metrics["level1.inertia"] == pytest.approx(stats["levels"][1]["inertia"])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "semantic_ids")}
    assert {"semantic_ids/semantic_ids.parquet", "semantic_ids/stats.json", "semantic_ids/manifest.json"} <= names
    # the per-level codebook-utilisation chart a person looks at in the UI
    assert "reports/codebook_utilisation.png" in {a.path for a in client.list_artifacts(run.info.run_id, "reports")}


def test_import_lcrec_index_and_reuse_embeddings_to_s3(job_run, tiny_dataset, s3_bucket, ray_local):
    from tokenization.pipeline import run_tokenize

    root, _ = job_run
    # method=import: the codes of our exported index come back (the de-dup level is recomputed identically).
    cfg = _cfg(root / "imp", tiny_dataset, "tokenize.method=import", f"tokenize.index_path={root}/sids/synthetic.index.json",
               "tracking.enabled=false")
    summary = run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    imported = read_semantic_ids(summary["path"])
    ours = read_semantic_ids(f"{root}/sids")
    np.testing.assert_array_equal(imported.codes[:, :3], ours.codes)
    assert imported.manifest["source"] == "lcrec-index"
    # Re-quantise saved embeddings with one worker, output on S3: same codes as the 2-worker job.
    endpoint, bucket = s3_bucket
    cfg = _cfg(root / "s3", tiny_dataset, f"paths.semantic_ids={bucket}/sids", f"storage.endpoint_url={endpoint}",
               f"tokenize.embeddings_path={root}/sids/embeddings", "tokenize.levels=2", "tokenize.codebook_size=8",
               "tokenize.num_workers=1", "tracking.enabled=false")
    run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    again = read_semantic_ids(f"{bucket}/sids", cfg.storage)
    np.testing.assert_array_equal(again.codes, ours.codes)


def test_bad_inputs_clear_errors_nothing_committed(job_run, tiny_dataset, tmp_path, ray_local):
    from tokenization.embedding_store import EmbeddingError
    from tokenization.kmeans import KMeansError
    from tokenization.pipeline import run_tokenize

    root, _ = job_run
    emb = f"{root}/sids/embeddings"
    # A dataset directory without a manifest (the CLI prints one line, no traceback).
    bare = tmp_path / "bare"
    bare.mkdir()
    proc = run_job("tokenize", "--config", CONFIG, f"workdir={tmp_path}", f"paths.dataset={bare}", check=False)
    assert proc.returncode == 1 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    # K larger than the number of items.
    cfg = _cfg(tmp_path / "k", tiny_dataset, f"tokenize.embeddings_path={emb}", "tokenize.codebook_size=5000",
               "tracking.enabled=false")
    with pytest.raises(KMeansError, match="K=5000 clusters is more than the"):
        run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    assert not os.path.exists(cfg.semantic_ids_dir)
    # NaN in an embedding file: the error names the file and the item.
    bad = tmp_path / "bad-emb"
    shutil.copytree(emb, bad)
    t = pq.read_table(bad / "part-00000.parquet")
    v = t.column("embedding").combine_chunks().flatten().to_numpy().copy().reshape(t.num_rows, -1)
    v[4, 0] = np.nan
    t = t.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]))
    pq.write_table(t, bad / "part-00000.parquet")
    cfg = _cfg(tmp_path / "nan", tiny_dataset, f"tokenize.embeddings_path={bad}", "tracking.enabled=false")
    with pytest.raises(EmbeddingError, match=r"part-00000.parquet: item_id 5 has a NaN"):
        run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    assert not os.path.exists(cfg.semantic_ids_dir)
    # Empty item text with empty_text=error.
    ds = Dataset.open(tiny_dataset)
    items = ds.items().with_columns(pl.when(pl.col("item_id") == 3).then(pl.lit("  ")).otherwise(pl.col("text"))
                                    .alias("text"))
    write_dataset(str(tmp_path / "blank"), items, ds.sequences(), {"counts": ds.manifest["counts"],
                                                                    "split": ds.manifest["split"]}, 1)
    cfg = _cfg(tmp_path / "e", str(tmp_path / "blank"), "tokenize.empty_text=error", "tracking.enabled=false")
    with pytest.raises(ValueError, match=r"1 items have an empty or whitespace-only text \(item_id \[3\]"):
        run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    # An existing output is not replaced without overwrite.
    cfg = _cfg(root, tiny_dataset, "tracking.enabled=false")
    with pytest.raises(storage.StorageError, match="already exist"):
        run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)


def test_ray_job_submit_to_a_real_head(job_run, tiny_dataset, tmp_path, ray_head):
    """`cluster/start_ray.sh head` -> `ray job submit --working-dir` -> SUCCEEDED -> outputs + MLflow (the head is
    the session's, stopped with `cluster/stop_ray.sh`). The cluster's codes equal the local job's (same seed, any
    worker count)."""
    import sys

    out = tmp_path / "work"
    proc = ray_head.submit("tokenize-test", sys.executable, "jobs/tokenize.py", "--config", "configs/synthetic.yaml",
                           f"workdir={out}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={out}/sids",
                           "levels=2", "codebook_size=8", "num_workers=1", env_vars={"HF_HUB_OFFLINE": "1"})
    # `ray job status` prints "Job 'tokenize-test' succeeded" (or failed/stopped).
    assert "tokenize-test' succeeded" in ray_head.status("tokenize-test"), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "k-means level 2/2" in proc.stdout
    np.testing.assert_array_equal(read_semantic_ids(f"{out}/sids").codes,
                                  read_semantic_ids(f"{job_run[0]}/sids").codes)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("genrec-dist").experiment_id])
    assert run.info.status == "FINISHED" and "collision_rate" in run.data.metrics
    # the config's own relative workdir would be written into Ray's temporary copy of --working-dir: refused
    proc = ray_head.submit("tokenize-relative", sys.executable, "jobs/tokenize.py", "--config",
                           "configs/synthetic.yaml", f"paths.dataset={tiny_dataset}", env_vars={"HF_HUB_OFFLINE": "1"})
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config error: running as a Ray job" in logs, logs[-4000:]
    assert "workdir=outputs/synthetic" in logs and "paths.semantic_ids=outputs/synthetic/sids/rkmeans" in logs
    assert "paths.dataset" not in logs.split("config error", 1)[1].split("\n", 1)[0]  # absolute: not named
    assert "Traceback" not in logs


def _hash_embedder() -> type:
    # Defined in a function so cloudpickle ships the class by value to the Ray workers.
    class HashEmbedder:
        """A cheap deterministic 8-d embedding of the text (the TextEmbedder call signature)."""

        def __init__(self, **kwargs):
            self.dim = 8

        def __call__(self, batch):
            import hashlib

            vecs = [np.frombuffer(hashlib.sha256(str(t).encode()).digest()[:8], dtype=np.uint8) for t in batch["text"]]
            return {"item_id": np.asarray(batch["item_id"]), "embedding": np.stack(vecs).astype(np.float32) / 255}

    return HashEmbedder


def test_embedding_workers_write_shards_to_s3_that_k_means_workers_read(tiny_dataset, s3_bucket, ray_local):
    """Embedding actors write their pieces under a temporary area beside the S3 output; pieces of one shard are
    joined, the shards are moved into the committed output, and the codes equal in-memory k-means of the same
    vectors. Nothing is left in the temporary area."""
    import s3fs

    from tokenization.embedding_store import read_embeddings
    from tokenization.kmeans import KMeansParams, kmeans_local
    from tokenization.pipeline import run_tokenize

    endpoint, bucket = s3_bucket
    lines = []
    cfg = _cfg(f"{bucket}/work", tiny_dataset, f"paths.semantic_ids={bucket}/sids", f"storage.endpoint_url={endpoint}",
               "tokenize.levels=2", "tokenize.codebook_size=8", "tokenize.num_workers=2", "tokenize.batch_size=8",
               "tokenize.rows_per_shard=50", "tracking.enabled=false")
    run_tokenize(cfg, log=lines.append, embedder_cls=_hash_embedder(), tracking=make_tracker)
    ds = Dataset.open(tiny_dataset)
    n = ds.num_items
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/sids/embeddings"))
    assert names == [f"part-{i:05d}.parquet" for i in range(-(-n // 50))]
    assert [p.rsplit("/", 1)[1] for p in fs.ls(bucket)] == ["sids"]  # no staging / temporary area left
    assert any(line.startswith(f"embedded {n}/{n} items") and "ETA" in line for line in lines)
    ids, emb = read_embeddings(f"{bucket}/sids/embeddings", cfg.storage)
    np.testing.assert_array_equal(ids, np.arange(1, n + 1))
    texts = ds.items(["item_id", "text"]).sort("item_id")
    want = _hash_embedder()()({"item_id": texts["item_id"].to_numpy(), "text": texts["text"].to_list()})["embedding"]
    np.testing.assert_array_equal(emb, want)
    tc = cfg.tokenize
    ref = kmeans_local(want, 2, KMeansParams(k=8, max_iters=tc.max_iters, tol=tc.tol, seed=cfg.seed), dedup=True)
    np.testing.assert_array_equal(read_semantic_ids(f"{bucket}/sids", cfg.storage).codes[1:], ref.codes)


def test_collision_free_codes_have_no_dedup_level_and_tiger_reads_l_tokens(job_run, tiny_dataset, ray_local):
    from genrec_dist.errors import ConfigError
    from genrec_dist.models.config import TigerConfig
    from genrec_dist.models.tiger import Tiger
    from tokenization.pipeline import run_tokenize

    root, _ = job_run
    emb = f"{root}/sids/embeddings"
    cfg = _cfg(root / "cf", tiny_dataset, f"tokenize.embeddings_path={emb}", "tokenize.levels=2",
               "tokenize.codebook_size=16", "tokenize.collision_free=true", "tokenize.balance=1.5",
               "tracking.enabled=false")
    summary = run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    sids = read_semantic_ids(summary["path"])
    assert sids.num_levels == 2 and sids.codebook_sizes == [16, 16]  # no de-dup level (tokenize.dedup is true)
    assert not sids.has_dedup_level and sids.manifest["collision_free"] is True
    assert sids.collisions() == 0
    assert summary["stats"]["collision_free"]["items_recoded"] > 0
    assert max(lv["max_share"] for lv in summary["stats"]["levels"][:1]) <= np.ceil(1.5 * 120 / 16) / 120
    assert Tiger(TigerConfig(), sids).num_levels == 2  # the model reads L tokens per item
    # 120 items cannot be unique in 2 x 8 codes: refused before anything runs, naming the settings.
    cfg = _cfg(root / "cf8", tiny_dataset, f"tokenize.embeddings_path={emb}", "tokenize.levels=2",
               "tokenize.codebook_size=8", "tokenize.collision_free=true", "tracking.enabled=false")
    with pytest.raises(ConfigError, match="tokenize.collision_free: 120 items"):
        run_tokenize(cfg, log=lambda m: None, tracking=make_tracker)
    assert not os.path.exists(cfg.semantic_ids_dir)
