"""Storage: atomic commit on local disk and on a real S3 endpoint (moto server process), and an S3 endpoint that
goes away in the middle of a prepare run (a TCP proxy in front of moto that resets every connection on cue)."""

from __future__ import annotations

import os

import polars as pl
import pytest
import s3fs

from genrec_dist import storage
from genrec_dist.config import StorageConfig, load_config
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.prepare import run_prepare

from _util import REPO, FaultProxy


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
    # A killed run leaves its staging area; the next commit of the same output removes it, not other outputs'.
    (tmp_path / ".out.staging-0123456789ab").mkdir()
    (tmp_path / ".out.staging-0123456789ab" / "a.parquet").write_bytes(b"half")
    (tmp_path / ".other.staging-0123456789ab").mkdir()
    _write(path, overwrite=True, value=4)
    assert storage.read_parquet(storage.join(path, "a.parquet"))["x"].to_list() == [4, 2, 3]
    assert sorted(os.listdir(tmp_path)) == [".other.staging-0123456789ab", "out"]


def test_a_failed_local_write_leaves_the_old_file_whole(tmp_path):
    """A write that fails half-way (the file-size limit, as a full disk would) keeps the previous content and leaves
    no temporary file; a process writing the file in place would have truncated it to the limit."""
    import subprocess
    import sys

    target = tmp_path / "run" / "config.yaml"
    target.parent.mkdir()
    target.write_bytes(b"old: 1\n")
    code = ("import resource, signal, sys\n"
            "from genrec_dist import storage\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            f"    storage.write_bytes({str(target)!r}, b'new: 2\\n' * 10000)\n"
            "except OSError as exc:\n"
            "    print('failed', exc.errno); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert target.read_bytes() == b"old: 1\n"
    assert os.listdir(target.parent) == ["config.yaml"]
    storage.write_bytes(str(target), b"new: 2\n")  # and a write that succeeds replaces it
    assert target.read_bytes() == b"new: 2\n" and os.listdir(target.parent) == ["config.yaml"]


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


def _prepare_cfg(tmp_path, dataset, endpoint, *overrides):
    """The tiny synthetic prepare (tiny_cfg's sizes) writing to ``dataset`` through ``endpoint``."""
    return load_config(os.path.join(REPO, "configs", "synthetic.yaml"), [
        f"workdir={tmp_path}", "prepare.synthetic.num_items=120", "prepare.synthetic.num_users=300",
        "prepare.synthetic.num_categories=6", "prepare.num_shards=2", f"paths.dataset={dataset}",
        f"storage.endpoint_url={endpoint}", *overrides])


def _objects(fs, prefix):
    return {p: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def test_s3_endpoint_gone_mid_write_bounded_retries_nothing_committed(s3_bucket, tmp_path):
    moto, bucket = s3_bucket
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto})  # the truth, not through the proxy
    dest = f"{bucket}/synthetic"
    with FaultProxy(moto, fail_after_puts=2) as proxy:
        cfg = _prepare_cfg(tmp_path, dest, proxy.url)
        with pytest.raises(storage.StorageError) as err:
            run_prepare(cfg)  # items.parquet and shard 0 reach S3, then the endpoint is gone
        msg = str(err.value)
        assert msg.startswith(f"{dest}: writing sequences/part-00001.parquet failed, nothing was committed")
        assert proxy.url in msg
        assert proxy.puts == 2
        # Bounded by the config, counted at the proxy: each of the write's max_attempts tries and the one
        # best-effort cleanup try opens at most 2 connections (aiohttp resends an idempotent request once); the
        # first try went out on a connection opened before the outage. s3fs's own retry loop on top (5 x) made
        # this 10-26 connections before storage.py switched it off.
        tries = cfg.storage.max_attempts + 1
        assert cfg.storage.max_attempts <= proxy.attempts_after_outage <= 2 * tries - 1

        # Nothing committed: no manifest and no files at the destination. The staging area the cleanup could
        # not reach (the endpoint was gone) is what is left, without a manifest.
        left = sorted(direct.find(bucket[5:]))
        assert not [p for p in left if p.endswith("manifest.json") or p.startswith(f"{dest[5:]}/")]
        assert [p.split("/", 2)[2] for p in left] == ["items.parquet", "sequences/part-00000.parquet"]
        assert left[0].split("/")[1].startswith(".synthetic.staging-")
        with pytest.raises(storage.StorageError, match="no manifest.json"):
            Dataset.open(dest, StorageConfig(endpoint_url=moto))

        # The endpoint is back: the same run commits, and that commit removes the earlier run's leftovers.
        proxy.restore()
        summary = run_prepare(cfg)
    assert Dataset.open(dest, StorageConfig(endpoint_url=moto)).manifest["counts"]["users"] == summary["users"]
    assert not [p for p in direct.find(bucket[5:]) if "staging" in p]


def test_s3_endpoint_gone_mid_overwrite_keeps_the_old_dataset(s3_bucket, tmp_path):
    moto, bucket = s3_bucket
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto})
    dest = f"{bucket}/synthetic"
    old = run_prepare(_prepare_cfg(tmp_path, dest, moto))
    before = _objects(direct, dest[5:])
    with FaultProxy(moto, fail_after_puts=1) as proxy:
        # Another seed: a different dataset would replace the old one if the write went through.
        cfg = _prepare_cfg(tmp_path, dest, proxy.url, "seed=7", "prepare.overwrite=true")
        with pytest.raises(storage.StorageError, match=f"^{dest}: writing .* nothing was committed"):
            run_prepare(cfg)
        assert proxy.puts == 1
    assert _objects(direct, dest[5:]) == before  # byte for byte, manifest included
    ds = Dataset.open(dest, StorageConfig(endpoint_url=moto))
    assert ds.manifest["counts"]["interactions"] == old["interactions"] and ds.sequences().height == old["users"]


def test_s3_endpoint_gone_while_replacing_keeps_the_old_dataset_aside(s3_bucket, tmp_path):
    """The endpoint goes away after the old output was removed and before the new one is complete (the commit's
    copy phase): the error names where the old dataset is, intact and readable; the destination has no manifest."""
    moto, bucket = s3_bucket
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto})
    dest = f"{bucket}/synthetic"
    run_prepare(_prepare_cfg(tmp_path, dest, moto))
    with FaultProxy(moto) as counting:  # an overwrite that goes through: F staging PUTs, F copies aside, F copies in
        old = run_prepare(_prepare_cfg(tmp_path, dest, counting.url, "prepare.overwrite=true"))
    before = _objects(direct, dest[5:])
    files = len(before)
    assert counting.puts == 3 * files
    with FaultProxy(moto, fail_after_puts=2 * files + 1) as proxy:  # old copied aside and removed, 1 new file in
        cfg = _prepare_cfg(tmp_path, dest, proxy.url, "seed=7", "prepare.overwrite=true")
        with pytest.raises(storage.StorageError) as err:
            run_prepare(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{dest}: replacing the output failed") and proxy.url in msg
    aside = msg.split("intact at ", 1)[1].split(" ", 1)[0]
    assert aside.startswith(f"{bucket}/.synthetic.old-")
    direct.invalidate_cache()
    assert not direct.exists(f"{dest[5:]}/manifest.json")
    with pytest.raises(storage.StorageError, match="no manifest.json"):
        Dataset.open(dest, StorageConfig(endpoint_url=moto))
    kept = _objects(direct, aside[5:])
    assert {p[len(aside) - 5:]: v for p, v in kept.items()} == {p[len(dest) - 5:]: v for p, v in before.items()}
    ds = Dataset.open(aside, StorageConfig(endpoint_url=moto))
    assert ds.manifest["counts"]["interactions"] == old["interactions"]
