"""Embedding shards on disk: ``embeddings/part-NNNNN.parquet`` with ``item_id:int32`` and
``embedding:fixed_size_list<float32>[D]``, rows in item order, split every ``rows_per_shard`` items."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec_dist import storage
from tokenization.embed import EmbeddingError

EMBEDDINGS_DIR = "embeddings"


def embedding_shards(item_ids: np.ndarray, emb: np.ndarray, rows_per_shard: int = 100_000) -> dict[str, bytes]:
    """``{"embeddings/part-00000.parquet": bytes, ...}`` for (N,) item ids and (N, D) vectors, in item order."""
    order = np.argsort(item_ids, kind="stable")
    ids, emb = np.asarray(item_ids)[order].astype(np.int32), np.asarray(emb, dtype=np.float32)[order]
    d = emb.shape[1]
    out = {}
    for s, start in enumerate(range(0, max(len(ids), 1), rows_per_shard)):
        part = emb[start:start + rows_per_shard]
        vec = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), type=pa.float32()), d)
        table = pa.table({"item_id": pa.array(ids[start:start + rows_per_shard], type=pa.int32()), "embedding": vec})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        out[f"{EMBEDDINGS_DIR}/part-{s:05d}.parquet"] = buf.getvalue()
    return out


def read_embeddings(path: str, storage_cfg: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Read every ``*.parquet`` under ``path`` (an ``embeddings/`` folder): (item_ids (N,), vectors (N, D) float32),
    sorted by item id. NaN/inf is refused naming the file and the item."""
    files = storage.list_files(path, storage_cfg, suffix=".parquet")
    if not files:
        raise EmbeddingError(f"{path}: no embedding shards (*.parquet) here")
    ids, vecs = [], []
    for f in files:
        table = pq.read_table(io.BytesIO(storage.read_bytes(f, storage_cfg)))
        if "item_id" not in table.column_names or "embedding" not in table.column_names:
            raise EmbeddingError(f"{f}: expected columns item_id, embedding; got {table.column_names}")
        col = table.column("embedding").combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):
            raise EmbeddingError(f"{f}: 'embedding' must be a fixed-size list of float32, got {col.type}")
        v = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)
        i = table.column("item_id").to_numpy().astype(np.int64)
        bad = ~np.isfinite(v).all(axis=1)
        if bad.any():
            raise EmbeddingError(f"{f}: item_id {int(i[np.flatnonzero(bad)[0]])} has a NaN or infinite value "
                                 f"({int(bad.sum())} such rows in this file)")
        ids.append(i)
        vecs.append(v)
    item_ids, emb = np.concatenate(ids), np.concatenate(vecs)
    order = np.argsort(item_ids, kind="stable")
    return item_ids[order], emb[order]
