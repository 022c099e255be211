"""Embedding shards on storage (local or ``s3://``): ``embeddings/part-NNNNN.parquet`` with ``item_id:int32`` and
``embedding:fixed_size_list<float32>[D]``, rows in item order (item ids 1..N across the files in name order),
split every ``rows_per_shard`` items.

Nothing here needs all N vectors in one process: :func:`list_shards` reads only the Parquet footers,
:func:`shards_for` gives each of W readers its contiguous range of global rows as (file, start, stop) slices, and
:func:`read_rows` reads one reader's slices. Pure module: numpy/pyarrow, :mod:`genrec_dist.storage` and
:mod:`genrec_dist.errors` only.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec_dist import storage
from genrec_dist.errors import GenrecError

EMBEDDINGS_DIR = "embeddings"


class EmbeddingError(GenrecError, ValueError):
    """An embedding file or text that cannot be used; the message names the file / item."""


class Slice(NamedTuple):
    """Rows ``[start, stop)`` of ``file``; its first row is global row ``first_row`` (item id ``first_row + 1``)."""

    file: str
    start: int
    stop: int
    first_row: int


def shard_name(index: int) -> str:
    return f"{EMBEDDINGS_DIR}/part-{index:05d}.parquet"


def shard_bytes(item_ids: np.ndarray, emb: np.ndarray) -> bytes:
    """One shard's Parquet bytes: (n,) item ids (already in item order) and (n, D) vectors."""
    emb = np.asarray(emb, dtype=np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])
    table = pa.table({"item_id": pa.array(np.asarray(item_ids), type=pa.int32()), "embedding": vec})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def embedding_shards(item_ids: np.ndarray, emb: np.ndarray, rows_per_shard: int = 100_000) -> dict[str, bytes]:
    """``{"embeddings/part-00000.parquet": bytes, ...}`` for (N,) item ids and (N, D) vectors, in item order."""
    order = np.argsort(item_ids, kind="stable")
    ids, emb = np.asarray(item_ids)[order].astype(np.int32), np.asarray(emb, dtype=np.float32)[order]
    return {shard_name(s): shard_bytes(ids[start:start + rows_per_shard], emb[start:start + rows_per_shard])
            for s, start in enumerate(range(0, max(len(ids), 1), rows_per_shard))}


def read_shard(path: str, storage_cfg: Any = None, start: int = 0, stop: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of one shard: (item ids (n,) int64, vectors (n, D) float32). NaN/inf is refused
    naming the file and the item."""
    with storage.open_file(path, storage_cfg) as fh:
        table = pq.read_table(fh)
    if "item_id" not in table.column_names or "embedding" not in table.column_names:
        raise EmbeddingError(f"{path}: expected columns item_id, embedding; got {table.column_names}")
    table = table.slice(start, (stop if stop is not None else table.num_rows) - start)
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise EmbeddingError(f"{path}: 'embedding' must be a fixed-size list of float32, got {col.type}")
    v = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(table), -1)
    i = table.column("item_id").to_numpy().astype(np.int64)
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise EmbeddingError(f"{path}: item_id {int(i[np.flatnonzero(bad)[0]])} has a NaN or infinite value "
                             f"({int(bad.sum())} such rows in this file)")
    return i, v


def list_shards(path: str, storage_cfg: Any = None) -> list[tuple[str, int]]:
    """(file, rows) of every ``*.parquet`` under ``path`` in name order, from the Parquet footers only."""
    files = storage.list_files(path, storage_cfg, suffix=".parquet")
    if not files:
        raise EmbeddingError(f"{path}: no embedding shards (*.parquet) here")
    out = []
    for f in files:
        with storage.open_file(f, storage_cfg) as fh:
            try:
                out.append((f, int(pq.ParquetFile(fh).metadata.num_rows)))
            except (pa.ArrowInvalid, OSError) as exc:
                raise EmbeddingError(f"{f}: not a readable Parquet file: {exc}") from None
    return out


def shards_for(files: list[tuple[str, int]], rank: int, world_size: int) -> list[Slice]:
    """The slices reader ``rank`` of ``world_size`` reads: the contiguous global rows
    ``[N rank / W, N (rank + 1) / W)`` (the split :func:`tokenization.kmeans.split_rows` makes), cut at file
    boundaries. A pure function of the file list: every reader computes its own, no coordination needed."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    n = sum(rows for _, rows in files)
    bounds = np.linspace(0, n, world_size + 1).astype(int)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    out, first = [], 0
    for f, rows in files:
        a, b = max(lo, first), min(hi, first + rows)
        if a < b:
            out.append(Slice(f, a - first, b - first, a))
        first += rows
    return out


def read_rows(slices: list[Slice], storage_cfg: Any = None, lead: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One reader's rows: (global rows (n,) int64, vectors (lead + n, D) float32: ``lead`` zero rows, then the
    rows), the matrix allocated once and filled shard by shard, so a reader never holds its shards and their
    concatenation at once (``lead=1`` gives UNGER Stage I its item-id-indexed table without a copy). Each row's
    item id must be its global row + 1 (files in name order hold items 1..N in order, as tokenize writes them); a
    file that breaks this is refused naming it and the first item out of place."""
    total = sum(s.stop - s.start for s in slices)
    rows = np.empty(total, dtype=np.int64)
    out, at = None, 0
    for s in slices:
        ids, v = read_shard(s.file, storage_cfg, s.start, s.stop)
        want = np.arange(s.first_row + 1, s.first_row + 1 + len(ids))
        if not np.array_equal(ids, want):
            i = int(np.flatnonzero(ids != want)[0])
            raise EmbeddingError(f"{s.file}: row {s.start + i} holds item_id {int(ids[i])}, expected {int(want[i])} "
                                 f"(shards in name order must hold item ids 1..N in order)")
        if out is None:
            out = np.empty((lead + total, v.shape[1]), dtype=np.float32)
            out[:lead] = 0.0
        elif v.shape[1] != out.shape[1]:
            raise EmbeddingError(f"{s.file}: {v.shape[1]}-d vectors, the files before it have {out.shape[1]}")
        rows[at:at + len(ids)] = want - 1
        out[lead + at:lead + at + len(ids)] = v
        at += len(ids)
        del ids, v
    if at != total:
        raise EmbeddingError(f"{slices[-1].file}: the shards hold {at} of the {total} rows their footers name")
    if out is None:
        return rows, np.zeros((lead, 0), dtype=np.float32)
    return rows, out


def read_embeddings(path: str, storage_cfg: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Read every ``*.parquet`` under ``path`` into this process: (item_ids (N,), vectors (N, D) float32), sorted
    by item id. Only for consumers that need the whole matrix in one place (UNGER Stage I); k-means reads
    :func:`shards_for` slices in its actors instead."""
    ids, vecs = [], []
    for f, _ in list_shards(path, storage_cfg):
        i, v = read_shard(f, storage_cfg)
        ids.append(i)
        vecs.append(v)
    item_ids, emb = np.concatenate(ids), np.concatenate(vecs)
    order = np.argsort(item_ids, kind="stable")
    return item_ids[order], emb[order]
