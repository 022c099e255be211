"""Prepare reads raw files from and writes the dataset to ``s3://`` on a real moto server (HTTP through s3fs),
byte-for-byte equal to the local run; a failing run leaves the S3 dataset untouched."""

from __future__ import annotations

import os

import pytest
import s3fs

from genrec_dist import storage
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.errors import InputError
from genrec_dist.data.prepare import run_prepare

from _raw_inputs import make_cfg, write_amazon, write_gz


def s3_snapshot(fs, prefix):
    return {p: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def test_prepare_s3_roundtrip_equals_local(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    raw = write_amazon(tmp_path / "raw")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    for name in os.listdir(raw):
        fs.put_file(os.path.join(raw, name), f"{bucket[5:]}/raw/{name}")

    common = ["prepare.source=amazon2014", "prepare.name=Beauty", "prepare.num_shards=3"]
    local = run_prepare(make_cfg(tmp_path / "local", *common, f"prepare.input_dir={raw}"))
    remote_cfg = make_cfg(tmp_path / "remote", *common, f"prepare.input_dir={bucket}/raw",
                          f"paths.dataset={bucket}/beauty", f"storage.endpoint_url={endpoint}")
    remote = run_prepare(remote_cfg)
    assert (remote["users"], remote["items"], remote["interactions"]) == (7, 6, 42)

    local_ds = Dataset.open(local["dataset"])
    remote_ds = Dataset.open(remote["dataset"], remote_cfg.storage)
    assert remote_ds.manifest["counts"] == local_ds.manifest["counts"]
    assert [f["sha256"] for f in remote_ds.manifest["source"]["files"]] == \
           [f["sha256"] for f in local_ds.manifest["source"]["files"]]
    for name in [local_ds.manifest["files"]["items"], *local_ds.manifest["files"]["sequences"]]:
        with open(os.path.join(local["dataset"], name), "rb") as fh:
            assert storage.read_bytes(storage.join(remote["dataset"], name), remote_cfg.storage) == fh.read(), name
    assert remote_ds.items().equals(local_ds.items())
    assert remote_ds.sequences().equals(local_ds.sequences())
    assert not [p for p in fs.ls(bucket[5:]) if "staging" in p]

    # A failing run (bad input, overwrite=true) leaves the S3 dataset as it was.
    before = s3_snapshot(fs, f"{bucket[5:]}/beauty")
    write_gz(os.path.join(raw, "reviews_Beauty_5.json.gz"), '{"reviewerID": "A", "asin": \n')
    fs.put_file(os.path.join(raw, "reviews_Beauty_5.json.gz"), f"{bucket[5:]}/raw/reviews_Beauty_5.json.gz")
    with pytest.raises(InputError, match=r"s3://.*/raw/reviews_Beauty_5\.json\.gz:1: not valid JSON"):
        run_prepare(make_cfg(tmp_path / "remote", *common, f"prepare.input_dir={bucket}/raw",
                             f"paths.dataset={bucket}/beauty", f"storage.endpoint_url={endpoint}",
                             "prepare.overwrite=true"))
    assert s3_snapshot(fs, f"{bucket[5:]}/beauty") == before
