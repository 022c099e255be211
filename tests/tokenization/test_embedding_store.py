"""Embedding shards on storage: which reader reads what (a pure function), and what a reader refuses."""

from __future__ import annotations

import numpy as np
import pytest

from genrec_dist import storage
from tokenization.embedding_store import (EmbeddingError, Slice, embedding_shards, list_shards, read_embeddings,
                                          read_rows, shard_bytes, shards_for)
from tokenization.kmeans import split_rows


def _write(root, n=23, d=4, rows_per_shard=5, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    for name, data in embedding_shards(np.arange(1, n + 1), emb, rows_per_shard).items():
        storage.write_bytes(f"{root}/{name}", data)
    return emb


def test_shards_for_covers_every_row_once_in_the_split_rows_ranges():
    files = [("a", 5), ("b", 5), ("c", 3), ("d", 0), ("e", 10)]
    for world in (1, 2, 3, 4, 7, 23):
        got = [shards_for(files, r, world) for r in range(world)]
        for r, (_, rows) in enumerate(split_rows(np.zeros((23, 1)), world)):  # the in-memory split
            flat = np.concatenate([np.arange(s.first_row, s.first_row + s.stop - s.start) for s in got[r]]
                                  or [np.zeros(0, int)])
            np.testing.assert_array_equal(flat, rows)
    assert shards_for(files, 1, 3) == [Slice("b", 2, 5, 7), Slice("c", 0, 3, 10), Slice("e", 0, 2, 13)]
    with pytest.raises(ValueError, match="rank 3 outside 0..2"):
        shards_for(files, 3, 3)


def test_readers_together_read_the_whole_matrix(tmp_path):
    emb = _write(tmp_path)
    files = list_shards(str(tmp_path / "embeddings"))
    assert [r for _, r in files] == [5, 5, 5, 5, 3]  # from the footers
    parts = [read_rows(shards_for(files, r, 3)) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), np.arange(23))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), emb)
    ids, whole = read_embeddings(str(tmp_path / "embeddings"))
    np.testing.assert_array_equal(whole, emb)
    # UNGER Stage I's item-id-indexed table: a zero row 0, then every item's vector (row i = item i)
    rows, table = read_rows(shards_for(files, 0, 1), lead=1)
    np.testing.assert_array_equal(rows, np.arange(23))
    assert table.shape == (24, 4) and table.dtype == np.float32 and not table[0].any()
    np.testing.assert_array_equal(table[1:], emb)


def test_out_of_order_or_empty_shards_are_refused_naming_the_file(tmp_path):
    root = tmp_path / "embeddings"
    _write(tmp_path)
    # a shard whose items are not the next ones in order (item ids 1..N across the files in name order)
    storage.write_bytes(f"{root}/part-00001.parquet", shard_bytes(np.arange(7, 12), np.zeros((5, 4), np.float32)))
    files = list_shards(str(root))
    with pytest.raises(EmbeddingError, match=r"part-00001.parquet: row 0 holds item_id 7, expected 6"):
        read_rows(shards_for(files, 0, 1))
    (tmp_path / "none").mkdir()
    with pytest.raises(EmbeddingError, match="no embedding shards"):
        list_shards(str(tmp_path / "none"))
    (root / "part-00009.parquet").write_bytes(b"not parquet")
    with pytest.raises(EmbeddingError, match="part-00009.parquet: not a readable Parquet file"):
        list_shards(str(root))
