"""The streaming prepare (block-wise reading, cleaning over spilled hash buckets) writes exactly the bytes of the
in-memory reference path, for every source, for multi-part and s3:// inputs, and whatever the memory budget.

Buckets of 37 rows, read blocks of 64 bytes and item text rendered 7 items at a time force many buckets, many
blocks per file, lines cut across blocks and many item slices even at toy size."""

from __future__ import annotations

import gzip
import json
import os

import polars as pl
import pytest
import s3fs

from genrec_dist.data import buckets, prepare
from genrec_dist.data.prepare import run_prepare
from genrec_dist.errors import ConfigError

from _raw_inputs import amazon_meta, amazon_reviews, make_cfg, snapshot, write_amazon, write_gz


@pytest.fixture
def tiny_buckets(monkeypatch):
    monkeypatch.setattr(buckets, "bucket_rows", lambda budget_mb: 37)
    monkeypatch.setattr(prepare, "raw_blocks", lambda budget_mb: 64)
    monkeypatch.setattr(prepare, "ITEM_ROWS", 7)  # item text rendered 7 items at a time


def both_paths(tmp_path, *overrides: str, storage_cfg_from=None) -> dict[str, bytes]:
    """Prepare with the in-memory path, then streaming into the same folder; assert equal bytes of every file."""
    cfg = make_cfg(tmp_path / "work", "prepare.overwrite=true", *overrides)
    run_prepare(cfg, in_memory=True)
    expected = snapshot(cfg.dataset_dir)
    run_prepare(cfg)
    got = snapshot(cfg.dataset_dir)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    assert len([n for n in got if n.startswith("sequences/")]) == cfg.prepare.num_shards
    return got


def test_synthetic(tmp_path, tiny_buckets):
    both_paths(tmp_path, "prepare.synthetic.num_users=400", "prepare.synthetic.num_items=90", "prepare.num_shards=3")


def test_synthetic_in_user_chunks_is_deterministic(tmp_path, tiny_buckets):
    sizes = ["prepare.synthetic.num_users=700", "prepare.synthetic.num_items=90",
             "prepare.synthetic.users_per_chunk=256"]
    first = both_paths(tmp_path / "a", *sizes)
    again = both_paths(tmp_path / "b", *sizes)
    data = lambda files: {k: v for k, v in files.items() if k != "manifest.json"}  # noqa: E731 (it names workdir)
    assert data(first) == data(again)  # the same seed gives the same bytes
    seq = pl.read_parquet(str(tmp_path / "a" / "work" / "dataset" / "sequences" / "*.parquet"))
    assert seq.height > 600  # users of all three chunks survive the 5-core
    one_block = both_paths(tmp_path / "c", *sizes[:2])  # 700 users in one chunk: another draw, same shape
    assert one_block["items.parquet"] == first["items.parquet"]


def test_amazon2014(tmp_path, tiny_buckets):
    raw = write_amazon(tmp_path / "raw")
    both_paths(tmp_path, "prepare.source=amazon2014", f"prepare.input_dir={raw}", "prepare.name=Beauty",
               "prepare.num_shards=3")


def write_amazon_parts(folder, parts: int = 3) -> str:
    """The toy Amazon files as folders of gzip'd parts (reviews_Beauty_5/, meta_Beauty/)."""
    reviews, meta = amazon_reviews(), amazon_meta()
    for stem, lines in (("reviews_Beauty_5", [json.dumps(r) for r in reviews]), ("meta_Beauty", map(repr, meta))):
        lines = list(lines)
        os.makedirs(folder / stem, exist_ok=True)
        step = -(-len(lines) // parts)
        for k in range(parts):
            write_gz(folder / stem / f"part-{k:03d}.json.gz", "".join(x + "\n" for x in lines[k * step:(k + 1) * step]))
    return str(folder)


def test_amazon2014_parts_give_the_single_file_dataset(tmp_path, tiny_buckets):
    single = both_paths(tmp_path / "one", "prepare.source=amazon2014", f"prepare.input_dir={write_amazon(tmp_path / 'raw1')}",
                        "prepare.name=Beauty")
    parts = both_paths(tmp_path / "many", "prepare.source=amazon2014",
                       f"prepare.input_dir={write_amazon_parts(tmp_path / 'raw3')}", "prepare.name=Beauty")
    assert {k: v for k, v in parts.items() if k != "manifest.json"} == \
           {k: v for k, v in single.items() if k != "manifest.json"}
    files = json.loads(parts["manifest.json"])["source"]["files"]
    assert [f["path"].rsplit("/", 2)[-2:] for f in files][:3] == [["reviews_Beauty_5", f"part-00{k}.json.gz"]
                                                                  for k in range(3)]
    assert all(f["bytes"] > 0 and len(f["sha256"]) == 64 for f in files)


def test_multi_member_gzip_and_lines_across_blocks(tmp_path, tiny_buckets):
    raw = write_amazon(tmp_path / "raw")
    path = os.path.join(raw, "reviews_Beauty_5.json.gz")
    lines = [json.dumps(r) + "\n" for r in amazon_reviews()]
    with open(path, "wb") as fh:  # two gzip members, as `cat a.gz b.gz` makes
        fh.write(gzip.compress("".join(lines[:20]).encode()) + gzip.compress("".join(lines[20:]).encode()))
    both_paths(tmp_path, "prepare.source=amazon2014", f"prepare.input_dir={raw}", "prepare.name=Beauty")


def test_lcrec(tmp_path, tiny_buckets):
    raw = tmp_path / "raw"
    raw.mkdir()
    inter = {f"u{u}": [(u * 5 + j * 3) % 23 for j in range(4 + u % 5)] for u in range(60)}
    write_gz(raw / "Toy.inter.json.gz", json.dumps(inter, indent=1))
    (raw / "Toy.item.json").write_text(json.dumps({str(i): {"title": f"Toy {i}"} for i in range(20)}))
    both_paths(tmp_path, "prepare.source=lcrec", f"prepare.input_dir={raw}", "prepare.k_core=2")


def write_tables(folder, ext: str, parts: int = 1) -> str:
    rows = [(f"u{u}", f"i{(u * 3 + j) % 17}", f"2020-01-{1 + (j * 7 + u) % 28:02d}T00:00:00")
            for u in range(50) for j in range(7)]
    inter = pl.DataFrame(rows, schema={"uid": pl.Utf8, "iid": pl.Utf8, "ts": pl.Utf8}, orient="row")
    items = pl.DataFrame({"iid": [f"i{k}" for k in range(17)], "title": [f"Thing {k}" for k in range(17)]})
    os.makedirs(folder, exist_ok=True)
    if parts == 1:
        getattr(inter, f"write_{ext}")(os.path.join(folder, f"interactions.{ext}"))
    else:
        os.makedirs(os.path.join(folder, "interactions"))
        step = -(-inter.height // parts)
        for k in range(parts):
            getattr(inter[k * step:(k + 1) * step], f"write_{ext}")(
                os.path.join(folder, "interactions", f"part-{k}.{ext}"))
    getattr(items, f"write_{ext}")(os.path.join(folder, f"items.{ext}"))
    return str(folder)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_tabular_single_file_and_parts(tmp_path, tiny_buckets, ext):
    common = [f"prepare.source={ext}", "prepare.user_col=uid", "prepare.item_col=iid", "prepare.time_col=ts",
              "prepare.k_core=3"]
    single = both_paths(tmp_path / "one", *common, f"prepare.input_dir={write_tables(tmp_path / 'r1', ext)}")
    # A folder of parts (parquet) or a glob over them (csv): the same table, read in order.
    name = "interactions" if ext == "parquet" else f"interactions/part-*.{ext}"
    parts = both_paths(tmp_path / "many", *common, f"prepare.input_dir={write_tables(tmp_path / 'r3', ext, 3)}",
                       f"prepare.interactions_file={name}")
    assert {k: v for k, v in parts.items() if k != "manifest.json"} == \
           {k: v for k, v in single.items() if k != "manifest.json"}


def test_the_budget_does_not_change_a_byte(tmp_path):
    sizes = ["prepare.synthetic.num_users=600", "prepare.synthetic.num_items=90"]
    small = make_cfg(tmp_path / "a", *sizes, "prepare.memory_budget_mb=64")
    large = make_cfg(tmp_path / "b", *sizes, "prepare.memory_budget_mb=8192")
    run_prepare(small)
    run_prepare(large)
    a, b = snapshot(small.dataset_dir), snapshot(large.dataset_dir)
    manifest = [json.loads(x["manifest.json"]) for x in (a, b)]
    assert "memory_budget_mb" not in manifest[0]["config"]["prepare"]
    for m in manifest:
        m["config"].pop("workdir")
    assert manifest[0] == manifest[1]
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}


def test_s3_parts(tmp_path, s3_bucket, tiny_buckets):
    endpoint, bucket = s3_bucket
    raw = write_amazon_parts(tmp_path / "raw")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    for root, _, files in os.walk(raw):
        for f in files:
            fs.put_file(os.path.join(root, f), f"{bucket[5:]}/raw/{os.path.relpath(os.path.join(root, f), raw)}")
    got = both_paths(tmp_path, "prepare.source=amazon2014", "prepare.name=Beauty", f"prepare.input_dir={bucket}/raw",
                     f"storage.endpoint_url={endpoint}")
    assert json.loads(got["manifest.json"])["counts"] == {"users": 7, "items": 6, "interactions": 42}


LCREC_DOCS = [
    '{"u1": [1, 2, 3], "u2": ["a", "b"]}',
    '{\n  "u1" :\n [10,\n 20 , 30],\n\t"é ü": [7]\n}\n',
    '{}',
    '{"u1": [1, 2], "u2": 5}',             # not a list
    '{"u1": [1, true]}',                   # not an item key
    '{"u1": [1, 2]',                       # cut short
    '{"u1": [1, 2]} trailing',             # extra data
    '[["u1", [1, 2]]]',                    # not an object
    '{"u1": [1, 2], "u3": [1234567890123456789, 2]}',
    '{"u\\"q": [3, 4, 5], "u,:": [6]}',    # escapes and separators inside keys
]


@pytest.mark.parametrize("doc", LCREC_DOCS)
def test_lcrec_entries_decoded_across_blocks_equal_the_whole_document(tmp_path, doc):
    from genrec_dist.data import lcrec
    from genrec_dist.data.errors import InputError
    from genrec_dist.data.raw import Source

    path = tmp_path / "X.inter.json"
    path.write_text(doc, encoding="utf-8")
    try:
        expected = lcrec.parse_inter(str(path), doc.encode())
    except InputError as exc:
        expected = exc
    for block in (3, 7, 1 << 20):
        try:
            frames = list(lcrec.inter_batches(Source(str(path), block_bytes=block), batch_rows=2))
            got = pl.concat(frames) if frames else expected.clear() if isinstance(expected, pl.DataFrame) else None
        except InputError as exc:
            assert isinstance(expected, InputError), f"block {block}: {exc}"
            continue
        assert isinstance(expected, pl.DataFrame), f"block {block}: decoded {got} where the document is an error"
        assert got.equals(expected), block


def test_spill_dir_is_left_empty_and_must_exist(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    run_prepare(make_cfg(tmp_path / "w", "prepare.synthetic.num_users=200", f"prepare.spill_dir={spill}"))
    assert os.listdir(spill) == []
    with pytest.raises(ConfigError, match=r"prepare.spill_dir: .*nowhere is not a local folder"):
        run_prepare(make_cfg(tmp_path / "w2", f"prepare.spill_dir={tmp_path / 'nowhere'}"))
