"""Embedding on Ray Data: ``from_arrow`` -> ``map_batches(ShardEmbedder, concurrency=workers, num_gpus=...)``.

The embedding actors write item-ordered embedding shards to storage themselves (local or ``s3://``, under a folder
the caller names); the driver only sees one small row per file written, so its memory does not grow with N x D.
Each shard (``rows_per_shard`` consecutive item ids) is cut into pieces so that every worker has work from the
start; a shard embedded in several pieces is joined by one Ray task per shard (bounded by the shard's size).
An actor that dies is restarted by Ray Data and its block re-run; the embedding of a text does not depend on the
actor, so the output equals an undisturbed run (tested).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from genrec_dist import storage
from tokenization.embed import ShardEmbedder, TextEmbedder
from tokenization.embedding_store import read_embeddings, read_shard, shard_bytes
from tokenization.progress import Progress


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def plan_pieces(n: int, rows_per_shard: int, num_workers: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(shard, first row, stop row) of every piece: shards of ``rows_per_shard`` rows, each cut into pieces of at
    most ``max(batch_size, min(16 batch_size, ceil(n / (2 workers))))`` rows (two pieces per worker on small
    catalogs, a progress line every few batches on large ones). Pieces never straddle a shard."""
    piece = max(1, batch_size, min(batch_size * 16, -(-n // (2 * num_workers))))
    out = []
    for s, lo in enumerate(range(0, n, rows_per_shard)):
        hi = min(n, lo + rows_per_shard)
        out.extend((s, a, min(hi, a + piece)) for a in range(lo, hi, piece))
    return out


@ray.remote(num_cpus=1)
def _join_pieces(paths: list[str], dest: str, storage_cfg: Any) -> int:
    """One shard from its pieces (in item order), written atomically at ``dest``; the pieces are removed."""
    parts = [read_shard(p, storage_cfg) for p in paths]
    ids, emb = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    storage.write_bytes(dest, shard_bytes(ids, emb), storage_cfg)
    for p in paths:
        storage.remove_tree(p, storage_cfg)
    return len(ids)


def embed_to_shards(
    items: pl.DataFrame,
    out_dir: str,
    rows_per_shard: int = 100_000,
    storage_cfg: Any = None,
    backend: str = "sentence-transformers",
    model: str = "default",
    num_workers: int = 2,
    batch_size: int = 64,
    max_length: int = 256,
    use_gpu: bool | None = None,
    embedder_cls: type = TextEmbedder,
    log: Callable[[str], None] | None = None,
) -> tuple[list[tuple[str, int]], dict]:
    """Embed ``items`` (columns item_id = 1..N, text) on the running Ray cluster into shards under ``out_dir``.

    Returns ([(shard file, rows)] in item order, info). ``use_gpu`` None: one GPU per actor when the cluster has
    GPUs."""
    if items.height == 0:
        raise ValueError("no items to embed")
    gpus = _cluster_gpus() >= 1 if use_gpu is None else use_gpu
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()  # a non-TTY log gets our progress lines, not bar redraws
    table = items.select("item_id", "text").sort("item_id").to_arrow()
    n = table.num_rows
    ids = table.column("item_id").to_numpy()
    blocks = [table.slice(a, b - a).append_column("shard", pa.array(np.full(b - a, s, dtype=np.int32)))
              for s, a, b in plan_pieces(n, rows_per_shard, num_workers, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"out_dir": out_dir, "storage_cfg": storage_cfg, "batch_size": batch_size,
                               "embedder_cls": embedder_cls, "backend": backend, "model": model,
                               "max_length": max_length},
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=1 if gpus else 0,
        batch_size=None,  # one block = one piece per call
        batch_format="numpy",
    )
    progress = Progress("embedded", n, log)
    written: dict[int, list[tuple[int, str, int]]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for f, s, first, rows in zip(batch["file"], batch["shard"], batch["first"], batch["rows"]):
            written.setdefault(int(s), []).append((int(first), str(f), int(rows)))
            progress.add(int(rows))
    files, joins = [], []
    for s, lo in enumerate(range(0, n, rows_per_shard)):
        pieces = sorted(set(written.get(s, [])))
        size = min(n, lo + rows_per_shard) - lo
        pos = lo
        for first, f, rows in pieces:  # the pieces must tile the shard's rows exactly
            if pos >= lo + size or first != ids[pos]:
                raise RuntimeError(f"embedding shard {s}: item {ids[min(pos, n - 1)]} missing or written twice "
                                   f"(lost rows)")
            pos += rows
        if pos != lo + size:
            raise RuntimeError(f"embedding shard {s}: {pos - lo} of {size} rows written (lost rows)")
        paths = [storage.join(out_dir, f) for _, f, _ in pieces]
        if len(paths) == 1:
            files.append((paths[0], size))
        else:
            dest = storage.join(out_dir, f"part-{s:05d}.parquet")
            joins.append(_join_pieces.remote(paths, dest, storage_cfg))
            files.append((dest, size))
    if joins:
        joining = Progress("joined embedding pieces into", len(joins), log, unit="shards")
        pending = joins
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            joining.add(1)
    info = {"items": n, "dim": int(read_shard(files[0][0], storage_cfg, 0, 1)[1].shape[1]),
            "seconds": progress.seconds, "workers": num_workers, "gpu": bool(gpus)}
    info["items_per_s"] = n / max(info["seconds"], 1e-9)
    return files, info


def embed_items(items: pl.DataFrame, backend: str = "sentence-transformers", model: str = "default",
                num_workers: int = 2, batch_size: int = 64, max_length: int = 256, use_gpu: bool | None = None,
                embedder_cls: type = TextEmbedder, log: Callable[[str], None] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`embed_to_shards` into a temporary folder, read back whole: (item_ids (N,) sorted, embeddings (N, D)
    float32, info). For callers that need the matrix in one process (UNGER Stage I, benchmarks, tests)."""
    tmp = tempfile.mkdtemp(prefix="embed-")
    try:
        _, info = embed_to_shards(items, tmp, max(1, items.height), None, backend, model, num_workers, batch_size,
                                  max_length, use_gpu, embedder_cls, log)
        item_ids, emb = read_embeddings(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not np.array_equal(item_ids, np.sort(items["item_id"].to_numpy().astype(np.int64))):
        raise RuntimeError(f"embedding returned {len(item_ids)} rows for {items.height} items")
    return item_ids, emb, info
