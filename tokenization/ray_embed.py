"""Embedding on Ray Data: ``from_arrow`` -> ``map_batches(TextEmbedder, concurrency=workers, num_gpus=...)``.

Rows go in sorted by text length so each batch holds texts of similar length (less padding); the result is put
back in item order on the driver. An actor that dies is restarted by Ray Data and its batch re-run; the
embedding of a text does not depend on the actor, so the output equals an undisturbed run (tested).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from tokenization.embed import TextEmbedder


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def embed_items(
    items: pl.DataFrame,
    backend: str = "sentence-transformers",
    model: str = "default",
    num_workers: int = 2,
    batch_size: int = 64,
    max_length: int = 256,
    use_gpu: bool | None = None,
    embedder_cls: type = TextEmbedder,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embed ``items`` (columns item_id, text) on the running Ray cluster.

    Returns (item_ids (N,) sorted, embeddings (N, D) float32, info). ``use_gpu`` None: one GPU per actor when
    the cluster has GPUs."""
    if items.height == 0:
        raise ValueError("no items to embed")
    gpus = _cluster_gpus() >= 1 if use_gpu is None else use_gpu
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()  # a non-TTY log gets our progress lines, not bar redraws
    ordered = (items.select("item_id", "text")
               .with_columns(pl.col("text").str.len_chars().alias("_len"))
               .sort(["_len", "item_id"]).drop("_len"))
    table = ordered.to_arrow()
    # One block per "batch group" so the actor pool has work to share from the start.
    # At least two blocks per worker on small catalogs, at most 4 batches per block on large ones.
    group = max(1, min(batch_size * 4, -(-table.num_rows // (2 * num_workers))))
    blocks = [table.slice(s, group) for s in range(0, table.num_rows, group)]
    ds = ray.data.from_arrow(blocks).map_batches(
        embedder_cls,
        fn_constructor_kwargs={"backend": backend, "model": model, "max_length": max_length},
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=1 if gpus else 0,
        batch_size=batch_size,
        batch_format="numpy",
    )
    n, done, t0, last = items.height, 0, time.time(), 0.0
    ids, vecs = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(np.asarray(batch["item_id"], dtype=np.int64))
        vecs.append(np.asarray(batch["embedding"], dtype=np.float32))
        done += len(ids[-1])
        now = time.time()
        if log and (now - last >= 10.0 or done == n):  # at most one line per 10 s: readable in a non-TTY log
            last = now
            log(f"embedded {done}/{n} items ({done / max(now - t0, 1e-9):.1f} items/s)")
    item_ids, emb = np.concatenate(ids), np.concatenate(vecs)
    order = np.argsort(item_ids, kind="stable")
    item_ids, emb = item_ids[order], emb[order]
    if not np.array_equal(item_ids, np.sort(items["item_id"].to_numpy().astype(np.int64))):
        raise RuntimeError(f"embedding returned {len(item_ids)} rows for {n} items (lost or duplicated rows)")
    info = {"items": n, "dim": int(emb.shape[1]), "seconds": time.time() - t0, "workers": num_workers,
            "gpu": bool(gpus)}
    info["items_per_s"] = n / max(info["seconds"], 1e-9)
    return item_ids, emb, info
