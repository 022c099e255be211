"""The real datasets in ../shared/data prepare to the published 5-core counts (skipped when the data is absent)."""

from __future__ import annotations

import os

import polars as pl
import pytest

from genrec_dist.data.dataset import Dataset
from genrec_dist.data.prepare import run_prepare

from _raw_inputs import make_cfg
from _util import SHARED_DATA

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")]


def test_beauty_has_the_published_5core_counts(tmp_path):
    folder = os.path.join(SHARED_DATA, "beauty")
    s = run_prepare(make_cfg(tmp_path, f"prepare.input_dir={folder}", config="beauty.yaml"))
    assert (s["users"], s["items"], s["interactions"]) == (22_363, 12_101, 198_502)  # TIGER Table 1 (Beauty)
    assert s["length"]["min"] == 5 and s["duplicates_dropped"] == 0
    has_text = any(os.path.exists(os.path.join(folder, f"Beauty.item.json{ext}")) for ext in ("", ".gz"))
    if not has_text:  # until Beauty.item.json.gz arrives: prepared anyway, reported loudly
        assert s["items_without_title"] == 12_101
        assert any("no item file" in w for w in s["warnings"])
    ds = Dataset.open(s["dataset"])
    assert ds.num_items == 12_101 and len(ds.shard_files) == 8
    # LC-Rec item k is item_id k + 1, so the pre-built LC-Rec semantic-ID indexes line up.
    items = ds.items()
    assert (items["item_id"] == items["item"].cast(pl.Int32) + 1).all()


def test_scientific_counts_and_every_item_has_text(tmp_path):
    folder = os.path.join(SHARED_DATA, "scientific")
    s = run_prepare(make_cfg(tmp_path, f"prepare.input_dir={folder}", config="scientific.yaml"))
    assert (s["users"], s["items"], s["interactions"]) == (8_317, 4_344, 58_492)
    assert s["items_without_title"] == 0 and not s["warnings"]
    items = Dataset.open(s["dataset"]).items()
    assert items.height == 4_344
    assert (items["title"].str.len_chars() > 0).all()
    assert (items["text"].str.starts_with(items["title"])).all()
    assert (items["brand"].str.len_chars() > 0).sum() > 4_000  # brands made it into the table
    assert items.filter(pl.col("text").str.contains("Brand: ")).height > 4_000
