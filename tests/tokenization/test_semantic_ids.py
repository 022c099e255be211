"""The semantic-ID table format (docs/datasets.md) and the LC-Rec index import/export."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import polars as pl
import pytest

from genrec_dist import storage
from genrec_dist.data.semantic_ids import (SemanticIdError, read_lcrec_index, read_semantic_ids,
                                          write_lcrec_index, write_semantic_ids)

from _util import SHARED_DATA


def _items(n: int, keys=None) -> pl.DataFrame:
    keys = keys or [f"src{i}" for i in range(n)]
    return pl.DataFrame({"item_id": pl.Series(range(1, n + 1), dtype=pl.Int32), "item": keys,
                         "title": [""] * n, "text": [""] * n})


def test_roundtrip_local_with_padding_row(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, 11))  # out of order on purpose
    codes = rng.integers(0, 4, size=(10, 3))
    man = write_semantic_ids(str(tmp_path / "s"), ids, codes, [4, 4, 4], {"source": "test"},
                             extra_files={"codebooks.npz": b"xyz"})
    assert man["source"] == "test" and "codebooks.npz" in man["files"]
    sids = read_semantic_ids(str(tmp_path / "s"))
    assert sids.codes.shape == (11, 3) and sids.codes.dtype == np.int64
    assert (sids.codes[0] == 0).all()
    np.testing.assert_array_equal(sids.codes[ids], codes)
    assert sids.codebook_sizes == [4, 4, 4]
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["num_items"] == 10 and len(stats["levels"]) == 3
    assert sids.collisions() == stats["items_in_collision"]


def test_roundtrip_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    from genrec_dist.config import StorageConfig

    scfg = StorageConfig(endpoint_url=endpoint)
    codes = np.array([[0, 1], [1, 0], [0, 1]])
    write_semantic_ids(f"{bucket}/sids", np.array([1, 2, 3]), codes, [2, 2], {}, storage_cfg=scfg)
    sids = read_semantic_ids(f"{bucket}/sids", scfg)
    np.testing.assert_array_equal(sids.codes[1:], codes)
    assert sids.collisions() == 2


def test_bad_codes_rejected_and_nothing_committed(tmp_path):
    out = str(tmp_path / "bad")
    with pytest.raises(SemanticIdError, match="level 1: code 5 is outside"):
        write_semantic_ids(out, np.array([1, 2]), np.array([[0, 1], [1, 5]]), [2, 4], {})
    with pytest.raises(SemanticIdError, match="exactly 1..2"):
        write_semantic_ids(out, np.array([1, 3]), np.array([[0, 1], [1, 1]]), [2, 2], {})
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(storage.StorageError, match="no manifest.json"):
        read_semantic_ids(out)


def test_lcrec_export_import_roundtrip(tmp_path):
    items = _items(5, keys=["10", "3", "7", "0", "42"])
    codes = np.array([[0, 0], [1, 2, ], [2, 255], [0, 0], [1, 1]])
    write_semantic_ids(str(tmp_path / "s"), np.arange(1, 6), codes, [3, 256], {})
    sids = read_semantic_ids(str(tmp_path / "s"))
    path = str(tmp_path / "X.index.json.gz")
    write_lcrec_index(sids, items, path)
    data = json.loads(gzip.decompress(open(path, "rb").read()))
    assert data["7"] == ["<a_2>", "<b_255>"]
    back = read_lcrec_index(path, items, codebook_sizes=[3, 256])
    np.testing.assert_array_equal(back.codes, sids.codes)
    # Reordered items: codes follow the key, not the row.
    shuffled = items.with_columns(pl.Series("item_id", [5, 4, 3, 2, 1], dtype=pl.Int32))
    again = read_lcrec_index(path, shuffled)
    np.testing.assert_array_equal(again.codes[5], sids.codes[1])
    assert again.codebook_sizes == [3, 256]


def test_lcrec_bad_index(tmp_path):
    items = _items(2, keys=["a", "b"])
    p = tmp_path / "i.index.json"
    p.write_text(json.dumps({"a": ["<a_1>", "<b_2>"], "b": ["<a_1>", "<c_2>"]}))
    with pytest.raises(SemanticIdError, match="item 'b' level 1: token '<c_2>'"):
        read_lcrec_index(str(p), items)
    p.write_text(json.dumps({"a": ["<a_1>"]}))
    with pytest.raises(SemanticIdError, match="1 dataset items have no entry"):
        read_lcrec_index(str(p), items)
    p.write_text(json.dumps({"a": ["<a_1>"], "b": ["<a_1>", "<b_0>"]}))
    with pytest.raises(SemanticIdError, match="has 2 tokens"):
        read_lcrec_index(str(p), items)
    p.write_text("{not json")
    with pytest.raises(SemanticIdError, match="not valid JSON"):
        read_lcrec_index(str(p), items)


@pytest.mark.realdata
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data absent")
def test_import_shared_beauty_rkmeans_index():
    path = os.path.join(SHARED_DATA, "beauty", "indexes", "rkmeans_native", "Beauty.index.json.gz")
    raw = json.loads(gzip.decompress(open(path, "rb").read()))
    keys = sorted(raw, key=int)
    sids = read_lcrec_index(path, _items(len(keys), keys=keys))
    assert sids.num_items == 12101 and sids.num_levels == 4
    assert all(k <= 256 for k in sids.codebook_sizes)
    # docs/datasets.md: 2,612 Beauty items share a full code with another in rkmeans_native.
    assert sids.collisions() == 2612
