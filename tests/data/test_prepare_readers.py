"""The readers on small raw-format files written here: Amazon 2014 (5-core and full), LC-Rec JSON, Parquet/CSV."""

from __future__ import annotations

import gzip
import json
import os

import polars as pl
import pytest

from genrec_dist.data.dataset import Dataset
from genrec_dist.data.errors import InputError
from genrec_dist.data.prepare import run_prepare

from _raw_inputs import ITEMS, USERS, amazon_meta, amazon_reviews, make_cfg, write_amazon


def amazon_cfg(tmp_path, raw, *extra):
    return make_cfg(tmp_path / "work", "prepare.source=amazon2014", f"prepare.input_dir={raw}",
                    "prepare.name=Beauty", "prepare.num_shards=3", *extra)


def test_amazon2014_5core_files(tmp_path):
    raw = write_amazon(tmp_path / "raw")
    summary = run_prepare(amazon_cfg(tmp_path, raw))
    assert (summary["users"], summary["items"], summary["interactions"]) == (7, 6, 42)
    assert summary["duplicates_dropped"] == 1
    assert summary["k_core"]["users_removed"] == 1 and summary["k_core"]["items_removed"] == 1
    assert summary["items_without_title"] == 2  # B004 (no meta line) and B005 (no title)

    ds = Dataset.open(summary["dataset"])
    items = ds.items()
    assert items["item"].to_list() == ITEMS  # ids in key order
    by_key = {r["item"]: r for r in items.to_dicts()}
    assert by_key["B001"]["text"] == ("Product 1 Cream. Brand: Brand1. Categories: Beauty, Skin Care, Face, Gifts. "
                                      "A cream, number 1.")
    assert by_key["B004"]["title"] == "item B004" and by_key["B004"]["text"] == "item B004"
    assert by_key["B005"]["title"] == "item B005"
    assert by_key["B005"]["text"] == "item B005. Categories: Beauty, Skin Care, Face, Gifts. A cream, number 5."

    seqs = ds.sequences()
    assert seqs["user"].to_list() == USERS
    a0 = seqs.row(0, named=True)
    names = dict(zip(items["item_id"], items["item"]))
    # A00 reviewed B000..B005 in that order; the last two share a time, so file order decides.
    assert [names[i] for i in a0["items"]] == ITEMS
    assert a0["timestamps"][-1] == a0["timestamps"][-2]
    files = {os.path.basename(f["path"]): f for f in ds.manifest["source"]["files"]}
    assert set(files) == {"reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"}
    with open(os.path.join(raw, "reviews_Beauty_5.json.gz"), "rb") as fh:
        import hashlib

        assert files["reviews_Beauty_5.json.gz"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()


def test_amazon2014_full_reviews_are_k_cored(tmp_path):
    reviews = amazon_reviews()
    # A full file also holds many users and items with a single review.
    reviews += [{"reviewerID": f"Z{k}", "asin": f"C{k}", "unixReviewTime": 1_500_000_000 + k} for k in range(30)]
    raw = write_amazon(tmp_path / "raw", reviews=reviews, five_core=False)
    s = run_prepare(amazon_cfg(tmp_path, raw, "prepare.reviews=full"))
    assert (s["users"], s["items"], s["interactions"]) == (7, 6, 42)
    assert s["k_core"]["users_removed"] == 31 and s["k_core"]["items_removed"] == 31


def test_amazon2014_meta_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    meta = amazon_meta()
    raw = write_amazon(tmp_path / "raw", meta=meta)
    path = os.path.join(raw, "meta_Beauty.json.gz")
    lines = [repr(m) for m in meta]
    lines.insert(1, f"__import__('os').system('touch {marker}')")
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"meta_Beauty\.json\.gz:2: not a Python dict literal"):
        run_prepare(amazon_cfg(tmp_path, raw))
    assert not marker.exists()


def test_lcrec_layout_plain_json_and_missing_item_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    inter = {str(u): [(u + j) % 6 for j in range(6)] + [(u + 1) % 6] for u in range(6)}
    (raw / "Toy.inter.json").write_text(json.dumps(inter))
    s = run_prepare(make_cfg(tmp_path / "w", "prepare.source=lcrec", f"prepare.input_dir={raw}"))
    assert (s["users"], s["items"], s["interactions"]) == (6, 6, 42)
    assert s["items_without_title"] == 6 and any("no item file" in w for w in s["warnings"])
    seq = Dataset.open(s["dataset"]).sequences()
    assert seq["items"][1].to_list() == [2, 3, 4, 5, 6, 1, 3]  # positions kept; LC-Rec item k -> item_id k + 1
    assert seq["timestamps"][1] is None

    # The item file appearing later is picked up with no config change.
    with gzip.open(raw / "Toy.item.json.gz", "wt") as fh:
        json.dump({str(i): {"title": f"Toy {i}", "categories": "Toys,Blocks"} for i in range(6)}, fh)
    s = run_prepare(make_cfg(tmp_path / "w", "prepare.source=lcrec", f"prepare.input_dir={raw}",
                             "prepare.overwrite=true"))
    assert s["items_without_title"] == 0 and not s["warnings"]
    assert Dataset.open(s["dataset"]).items()["text"][0] == "Toy 0. Categories: Toys,Blocks"


def test_tabular_csv_and_parquet_give_the_same_dataset(tmp_path):
    rows = [(f"u{u}", f"i{(u * 3 + j) % 7}", f"2020-01-{1 + j:02d}T00:00:00") for u in range(8) for j in range(6)]
    inter = pl.DataFrame(rows, schema={"uid": pl.Utf8, "iid": pl.Utf8, "ts": pl.Utf8}, orient="row")
    items = pl.DataFrame({"iid": [f"i{k}" for k in range(7)], "title": [f"Thing {k}" for k in range(7)],
                          "brand": ["B"] * 7, "price": [1.5] * 7})
    for ext in ("csv", "parquet"):
        d = tmp_path / ext
        d.mkdir()
        getattr(inter, f"write_{ext}")(d / f"interactions.{ext}")
        getattr(items, f"write_{ext}")(d / f"items.{ext}")
    out = {}
    for ext in ("csv", "parquet"):
        s = run_prepare(make_cfg(tmp_path / f"w{ext}", f"prepare.source={ext}", f"prepare.input_dir={tmp_path / ext}",
                                 "prepare.user_col=uid", "prepare.item_col=iid", "prepare.time_col=ts",
                                 "prepare.text_template={title} by {brand} at {price}"))
        ds = Dataset.open(s["dataset"])
        out[ext] = (ds.items(), ds.sequences())
        assert s["interactions"] == 48
    assert out["csv"][0].equals(out["parquet"][0]) and out["csv"][1].equals(out["parquet"][1])
    assert out["csv"][0]["text"][0] == "Thing 0 by B at 1.5"
    assert out["csv"][1]["timestamps"][0][0] == 1577836800  # 2020-01-01 UTC
