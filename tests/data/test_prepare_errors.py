"""Bad input ends in a clear error naming the file (and line), and the output location is left unchanged."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from genrec_dist.data.errors import InputError
from genrec_dist.data.prepare import run_prepare
from genrec_dist.storage import StorageError

from _raw_inputs import amazon_meta, amazon_reviews, make_cfg, snapshot, write_amazon, write_gz
from _util import free_port

TINY = ["prepare.synthetic.num_items=60", "prepare.synthetic.num_users=80", "prepare.num_shards=2"]


@pytest.fixture
def existing(tmp_path):
    """A committed dataset at the destination every failing run below targets (with overwrite=true)."""
    cfg = make_cfg(tmp_path / "work", *TINY)
    run_prepare(cfg)
    return cfg.dataset_dir, snapshot(cfg.dataset_dir)


def assert_unchanged(existing):
    path, before = existing
    assert snapshot(path) == before
    parent = os.path.dirname(path)
    assert sorted(os.listdir(parent)) == ["dataset"], "no staging directory may be left behind"


def amazon_run(tmp_path, raw, *extra):
    return run_prepare(make_cfg(tmp_path / "work", "prepare.source=amazon2014", f"prepare.input_dir={raw}",
                                "prepare.name=Beauty", "prepare.overwrite=true", *extra))


def test_truncated_gzip(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    path = os.path.join(raw, "reviews_Beauty_5.json.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz:\d+: truncated gzip") as err:
        amazon_run(tmp_path, raw)
    assert err.value.line is not None and err.value.line > 1
    assert_unchanged(existing)


def test_corrupt_gzip(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    path = os.path.join(raw, "reviews_Beauty_5.json.gz")
    data = bytearray(open(path, "rb").read())
    data[30:40] = b"\xff" * 10
    open(path, "wb").write(bytes(data))
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz:\d+: (corrupt|truncated) gzip"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_malformed_json_line(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    lines = [json.dumps(r) for r in amazon_reviews()]
    lines[6] = lines[6][:-5]  # line 7 cut short
    write_gz(os.path.join(raw, "reviews_Beauty_5.json.gz"), "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz:7: not valid JSON"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_review_without_time(tmp_path, existing):
    reviews = amazon_reviews()
    del reviews[9]["unixReviewTime"]
    raw = write_amazon(tmp_path / "raw", reviews=reviews)
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz:10: field 'unixReviewTime' missing"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_meta_line_that_is_not_a_dict_literal(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    lines = [repr(m) for m in amazon_meta()]
    lines[2] = lines[2].replace("'Product 2 Cream'", "Product_2")  # a name, not a literal
    write_gz(os.path.join(raw, "meta_Beauty.json.gz"), "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"meta_Beauty\.json\.gz:3: not a Python dict literal"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_meta_line_that_is_a_list(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    lines = [repr(m) for m in amazon_meta()] + ["['B001', 'x']"]
    write_gz(os.path.join(raw, "meta_Beauty.json.gz"), "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"meta_Beauty\.json\.gz:{len(lines)}: expected a dict literal"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_empty_input(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw", reviews=[])
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz: no interactions"):
        amazon_run(tmp_path, raw)
    assert_unchanged(existing)


def test_k_core_that_empties_the_input(tmp_path, existing):
    raw = write_amazon(tmp_path / "raw")
    with pytest.raises(InputError, match=r"the 8-core filter removed every interaction"):
        amazon_run(tmp_path, raw, "prepare.k_core=8")
    assert_unchanged(existing)


def test_missing_input_file(tmp_path, existing):
    with pytest.raises(InputError, match=r"reviews_Beauty_5\.json\.gz: file not found"):
        amazon_run(tmp_path, tmp_path)
    assert_unchanged(existing)


def test_lcrec_malformed_json_names_the_line(tmp_path, existing):
    raw = tmp_path / "raw"
    raw.mkdir()
    with gzip.open(raw / "X.inter.json.gz", "wt") as fh:
        fh.write('{\n"0": [1, 2, 3],\n"1": [1, 2 3]\n}\n')
    with pytest.raises(InputError, match=r"X\.inter\.json\.gz:3: not valid JSON"):
        run_prepare(make_cfg(tmp_path / "work", "prepare.source=lcrec", f"prepare.input_dir={raw}",
                             "prepare.overwrite=true"))
    assert_unchanged(existing)


def test_csv_bad_time_names_the_line(tmp_path, existing):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "interactions.csv").write_text("user,item,timestamp\nu1,i1,100\nu1,i2,yesterday\n")
    with pytest.raises(InputError, match=r"interactions\.csv:3: 'timestamp' is not a time: 'yesterday'"):
        run_prepare(make_cfg(tmp_path / "work", "prepare.source=csv", f"prepare.input_dir={raw}",
                             "prepare.overwrite=true"))
    assert_unchanged(existing)


def test_existing_dataset_needs_overwrite(tmp_path, existing):
    with pytest.raises(StorageError, match="already exists .*prepare.overwrite=true"):
        run_prepare(make_cfg(tmp_path / "work", *TINY, "seed=3"))
    assert_unchanged(existing)
    # with overwrite the dataset is replaced
    run_prepare(make_cfg(tmp_path / "work", *TINY, "seed=3", "prepare.overwrite=true"))
    assert snapshot(existing[0]) != existing[1]


def test_unreachable_s3_endpoint(tmp_path):
    cfg = make_cfg(tmp_path / "work", *TINY, "paths.dataset=s3://nowhere/dataset",
                   f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "storage.max_attempts=1",
                   "storage.connect_timeout_s=1")
    with pytest.raises(StorageError, match=r"s3://nowhere/dataset: storage at http://127\.0\.0\.1:\d+ failed"):
        run_prepare(cfg)


def test_empty_input_dir_is_named(tmp_path):
    with pytest.raises(InputError, match=r"prepare.input_dir: is empty"):
        run_prepare(make_cfg(tmp_path / "work", "prepare.source=lcrec"))
    assert not os.path.exists(tmp_path / "work")
