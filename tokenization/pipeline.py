"""The tokenize stage: dataset items -> embeddings -> residual k-means (or an imported index) -> semantic IDs.

``run_tokenize(cfg)`` commits ``cfg.semantic_ids_dir`` atomically (manifest last; nothing partial on failure)::

    semantic_ids.parquet  codes per item (genrec_dist.data.semantic_ids)
    codebooks.npz         level_0 .. level_{L-1}: (K, D) float32 centroids (rkmeans)
    embeddings/part-*.parquet  item_id + float32 vector (rkmeans)
    stats.json            per level inertia / utilisation / empty clusters re-seeded; collision rate of full codes;
                          reconstruction error; embedding throughput; items with empty text
    <name>.index.json     the same codes in the LC-Rec/LETTER layout (tokenize.export_index)
    manifest.json

and one MLflow run (job "tokenize"): the resolved config as params, the stats as metrics, the files as artifacts.
Methods: ``rkmeans``, ``import`` (``tokenize.index_path``), ``unger`` (UNGER Stage I, tokenization/unger.py: the
integrated embeddings are quantised and saved as ``integrated_embeddings.npy``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import uuid
from typing import Any, Callable

import numpy as np

from genrec_dist import storage
from genrec_dist.config import to_dict
from genrec_dist.data.dataset import Dataset
from genrec_dist.errors import ConfigError
from genrec_dist.data.semantic_ids import (CODEBOOKS_FILE, STATS_FILE, SemanticIds, code_stats,
                                          read_lcrec_index, write_lcrec_index, write_semantic_ids)
from tokenization.embed import TextEmbedder, texts_for_embedding
from tokenization.embedding_store import (EMBEDDINGS_DIR, EmbeddingError, list_shards, read_rows, shard_name,
                                         shards_for)
from tokenization.kmeans import KMeansParams, dedup_level

Log = Callable[[str], None]


def _gpu_flag(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]


def _temp_area(out_dir: str) -> str:
    """A folder beside the output for files Ray workers write before the commit; named like a staging area of
    ``out_dir`` so that the next successful commit there removes it if this run dies before cleaning up."""
    parent, name = out_dir.rstrip("/").rsplit("/", 1) if "/" in out_dir.rstrip("/") else (".", out_dir)
    return storage.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")


def _embeddings(cfg: Any, items, tmp: str, log: Log, embedder_cls: type) -> tuple[list[tuple[str, int]], dict]:
    """Embedding shard files [(file, rows)] in item order, written by the Ray workers under ``tmp`` (or the stored
    ones of ``tokenize.embeddings_path``), and the embedding stats. No vector is read here."""
    tc = cfg.tokenize
    if tc.embeddings_path:
        files = list_shards(tc.embeddings_path, cfg.storage)  # Parquet footers only
        n = sum(rows for _, rows in files)
        if n != items.height:
            raise EmbeddingError(f"{tc.embeddings_path}: {n} embedding rows, the dataset has {items.height} items "
                                 f"(item ids 1..{items.height} in order are needed)")
        return files, {"source": tc.embeddings_path, "items": n}
    texts, n_blank = texts_for_embedding(items, tc.empty_text)
    if n_blank:
        log(f"warning: {n_blank} items have an empty or whitespace-only text; embedded their title or item key "
            f"(tokenize.empty_text=fallback)")
    from tokenization.ray_embed import embed_to_shards
    from genrec_dist.ray_runtime import ensure_ray

    ensure_ray(tc.ray_address)
    files, einfo = embed_to_shards(texts, storage.join(tmp, EMBEDDINGS_DIR), tc.rows_per_shard, cfg.storage,
                                   tc.embedder, tc.model, tc.num_workers, tc.batch_size, tc.max_length,
                                   _gpu_flag(tc.use_gpu), embedder_cls, log)
    return files, {"empty_text_items": n_blank, **einfo}


def _quantise(cfg: Any, emb: np.ndarray | list[tuple[str, int]], log: Log):
    """Residual k-means of an (N, D) array, or of embedding shard files read by the k-means actors."""
    from tokenization.ray_kmeans import ray_residual_kmeans
    from genrec_dist.ray_runtime import ensure_ray

    tc = cfg.tokenize
    if isinstance(emb, np.ndarray):
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            from tokenization.kmeans import KMeansError

            raise KMeansError(f"embeddings: item_id {int(np.flatnonzero(bad)[0]) + 1} has a NaN or infinite "
                              f"value ({int(bad.sum())} items); nothing was written")
    ensure_ray(tc.ray_address)
    params = KMeansParams(k=tc.codebook_size, max_iters=tc.max_iters, tol=tc.tol, seed=cfg.seed,
                          seed_sample=tc.seed_sample, minibatch=tc.kmeans.minibatch, balance=tc.balance)
    return ray_residual_kmeans(emb, tc.levels, params, tc.dedup, tc.num_workers, _gpu_flag(tc.use_gpu),
                               tc.kmeans_backend, log, cfg.storage, tc.collision_free)


def check_code_settings(tc: Any, num_items: int) -> None:
    """The code settings that cannot work for this catalog, refused before anything is embedded."""
    if tc.method == "import" and (tc.collision_free or tc.balance):
        raise ConfigError("tokenize.collision_free and tokenize.balance make codes from embeddings; "
                          "tokenize.method=import reads finished codes (use rkmeans or unger)")
    if tc.collision_free and tc.codebook_size ** tc.levels < num_items:
        raise ConfigError(f"tokenize.collision_free: {num_items} items cannot have distinct codes of "
                          f"tokenize.levels={tc.levels} x tokenize.codebook_size={tc.codebook_size} "
                          f"(K^L = {tc.codebook_size ** tc.levels}); raise either")
    if tc.balance and (tc.balance < 1.0 or tc.kmeans.minibatch):
        raise ConfigError(f"tokenize.balance={tc.balance}: a codeword's capacity is balance x N/K, so it must be "
                          f">= 1 (1.0: equal sizes) or 0 (off), with full Lloyd steps (tokenize.kmeans.minibatch=0)")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _metrics(stats: dict) -> dict[str, float]:
    out = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lv in stats.get("levels", []):
        for key in ("inertia", "utilisation", "empty_reseeded", "iterations", "used", "max_share", "perplexity_share"):
            if key in lv:
                out[f"level{lv.get('level', 0)}.{key}"] = float(lv[key])
    for section in ("embedding", "collision_free"):
        for key, value in stats.get(section, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{section}.{key}"] = float(value)
    return out


def run_tokenize(cfg: Any, log: Log = print, embedder_cls: type = TextEmbedder, *, tracking: Callable) -> dict:
    """Run the tokenize stage for ``cfg``; returns a summary (path, counts, stats, MLflow run id). ``tracking``
    (the job's, e.g. ``genrec_dist.tracking.make_tracker``) makes the run's tracker once the inputs are checked."""
    tc = cfg.tokenize
    dataset = Dataset.open(cfg.dataset_dir, cfg.storage)  # no manifest -> StorageError naming the path
    out_dir = cfg.semantic_ids_dir
    if storage.exists(storage.join(out_dir, storage.MANIFEST), cfg.storage) and not tc.overwrite:
        raise storage.StorageError(f"{out_dir}: semantic IDs already exist (tokenize.overwrite=true replaces them)")
    if tc.method == "import" and not tc.index_path:
        raise ConfigError("tokenize.method=import needs tokenize.index_path (an LC-Rec <Name>.index.json[.gz])")
    # Stored embeddings need no text: only the item keys (for the LC-Rec index) are read then.
    stored = tc.method in ("rkmeans", "unger") and bool(tc.embeddings_path)
    items = dataset.items(["item_id", "item"] if stored else ["item_id", "item", "title", "text"])
    check_code_settings(tc, items.height)
    t0 = time.time()
    scratch = _temp_area(out_dir)  # Ray workers write here; moved into the output at the commit
    tracker = tracking(cfg, "tokenize", extra_tags=dataset.tags())
    try:
        tracker.log_config(cfg)
        tracker.log_input(**dataset.input_spec(), context="tokenization")
        files: dict[str, bytes] = {}
        paths: dict[str, str] = {}  # output name -> file written elsewhere (embedding shards), copied in
        if tc.method == "import":
            imported = read_lcrec_index(tc.index_path, items, cfg.storage)
            item_ids = np.arange(1, imported.num_items + 1)
            codes, sizes = imported.codes[1:], list(imported.codebook_sizes)
            stats: dict[str, Any] = {"method": "import", "index_path": tc.index_path, **code_stats(codes, sizes)}
            stats["levels"] = [{"level": i, **lv} for i, lv in enumerate(stats["levels"])]
            if tc.dedup:
                extra, size = dedup_level(codes)
                codes = np.concatenate([codes, extra[:, None]], axis=1)
                sizes.append(size)
                stats["dedup_size"] = size
            source = {"source": "lcrec-index", "index_path": tc.index_path}
        else:
            shard_files, einfo = _embeddings(cfg, items, scratch, log, embedder_cls)
            item_ids = np.arange(1, items.height + 1)
            unger = None
            if tc.method == "unger":  # UNGER Stage I: quantise the integrated embeddings (tokenization/unger.py)
                from tokenization.unger import flat_metrics, run_stage1

                # Stage I trains on every item's vector in this process: the one path that gathers them, straight
                # into the item-id-indexed table it reads (row 0 padding), one copy in memory.
                _, table = read_rows(shards_for(shard_files, 0, 1), cfg.storage, lead=1)
                einfo["dim"] = int(table.shape[1])
                unger = run_stage1(cfg, dataset, table, log)
                del table
            result = _quantise(cfg, shard_files if unger is None else unger.embeddings, log)
            codes, sizes = result.codes, result.codebook_sizes
            if unger is None:
                einfo["dim"] = int(result.codebooks[0].shape[1])
            stats = {"method": tc.method, **result.stats, "embedding": einfo}
            paths.update({shard_name(i): f for i, (f, _) in enumerate(shard_files)})
            files[CODEBOOKS_FILE] = _npz({f"level_{i}": c.astype(np.float32) for i, c in enumerate(result.codebooks)})
            source = {"source": "rkmeans", "embedder": tc.embedder, "model": tc.model}
            if unger is not None:
                stats.update(flat_metrics(unger.stats))
                files.update(unger.files)
                source.update(unger.manifest)
        stats["seconds"] = time.time() - t0
        files[STATS_FILE] = (json.dumps(stats, indent=2, sort_keys=True, default=float) + "\n").encode()
        index_name = f"{cfg.name}.index.json"
        if tc.export_index:
            sids = SemanticIds(np.concatenate([np.zeros((1, codes.shape[1]), np.int64), codes]), sizes, {})
            write_lcrec_index(sids, items, storage.join(scratch, index_name), cfg.storage)  # moved in at the commit
            paths[index_name] = storage.join(scratch, index_name)
            del sids
        log(f"writing semantic IDs of {len(item_ids)} items -> {out_dir}")
        manifest = write_semantic_ids(
            out_dir, item_ids, codes, sizes,
            {"method": tc.method, "dedup": bool(tc.dedup and not tc.collision_free), "collision_free": bool(tc.collision_free),
             "balance": float(tc.balance), "seed": cfg.seed, "dataset": cfg.dataset_dir, **source,
             "config": to_dict(cfg)},  # the resolved config, as prepare's manifest keeps it
            storage_cfg=cfg.storage, overwrite=tc.overwrite, extra_files=files, extra_paths=paths,
            move_extra_paths={name for name, src in paths.items() if src.startswith(scratch + "/")})  # not stored ones
        tracker.log(_metrics(stats))
        with tempfile.TemporaryDirectory() as tmp:  # artifacts from the committed output (local or s3)
            for name in [*manifest["files"], storage.MANIFEST]:
                if name.startswith("embeddings/"):
                    continue  # large; they stay in the output directory
                storage.copy_file(storage.join(out_dir, name), os.path.join(tmp, name), cfg.storage)  # streamed
            tracker.log_artifact(tmp, "semantic_ids")
        del codes, items, paths, files
        # Imported here, after the per-item arrays are gone: matplotlib and the evaluation module it brings add
        # ~260 MB to the driver, which should not stack on the codes' peak.
        from genrec_dist.reports import plot_codebook_utilisation

        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(plot_codebook_utilisation(stats, os.path.join(tmp, "codebook_utilisation.png")),
                                 "reports")
        tracker.close("FINISHED")
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        storage.remove_tree(scratch, cfg.storage)
    log(f"semantic IDs: {len(item_ids)} items, levels {sizes}, collision rate of learned codes "
        f"{stats.get('collision_rate', 0.0):.4f} -> {out_dir}")
    return {"path": out_dir, "num_items": int(len(item_ids)), "codebook_sizes": sizes, "stats": stats,
            "manifest": manifest, "run_id": tracker.run_id}
