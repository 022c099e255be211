"""Storage: atomic commit on local disk and on a real S3 endpoint (moto server process)."""

from __future__ import annotations

import os

import polars as pl
import pytest

from genrec_dist import storage
from genrec_dist.config import StorageConfig


def _write(path, storage_cfg=None, fail=False, overwrite=False, value=1):
    with storage.commit_dir(path, storage_cfg, overwrite=overwrite) as out:
        out.write_parquet("a.parquet", pl.DataFrame({"x": [value, 2, 3]}))
        out.write_json("sub/stats.json", {"v": value})
        if fail:
            raise RuntimeError("boom")
        out.manifest = {"value": value}


def test_local_commit_and_refusals(tmp_path):
    path = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        _write(path, fail=True)
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []  # no staging left behind
    _write(path)
    assert storage.require_manifest(path) == {"value": 1}
    with pytest.raises(storage.StorageError, match="already exists"):
        _write(path, value=2)
    with pytest.raises(RuntimeError):
        _write(path, fail=True, overwrite=True, value=3)
    assert storage.require_manifest(path) == {"value": 1}  # a failed overwrite leaves the old output intact
    _write(path, overwrite=True, value=4)
    assert storage.read_parquet(storage.join(path, "a.parquet"))["x"].to_list() == [4, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_reader_refuses_a_directory_without_manifest(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "items.parquet").write_bytes(b"x")
    with pytest.raises(storage.StorageError, match="no manifest.json"):
        storage.require_manifest(str(tmp_path / "half"))


def test_s3_commit_roundtrip_and_failure(s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    path = f"{bucket}/runs/out"
    with pytest.raises(RuntimeError):
        _write(path, cfg, fail=True)
    assert not storage.exists(path, cfg)
    assert storage.list_files(bucket, cfg) == []  # staging removed
    _write(path, cfg)
    assert storage.require_manifest(path, cfg) == {"value": 1}
    assert storage.read_json(storage.join(path, "sub/stats.json"), cfg) == {"v": 1}
    local = pl.DataFrame({"x": [1, 2, 3]})
    assert storage.read_parquet(storage.join(path, "a.parquet"), cfg).equals(local)
    _write(path, cfg, overwrite=True, value=5)
    assert storage.require_manifest(path, cfg) == {"value": 5}


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    from _util import free_port

    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout_s=1)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(storage.StorageError) as err:
        _write("s3://nowhere/out", cfg)
    assert "s3://nowhere/out" in str(err.value) and "127.0.0.1" in str(err.value)
