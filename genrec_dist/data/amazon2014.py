"""Reader for the Amazon Reviews 2014 files as published (McAuley et al.; the TIGER/UNGER/CAR benchmark source).

``reviews_<Category>_5.json.gz`` (``prepare.reviews: 5core``) or the full ``reviews_<Category>.json.gz``
(``reviews: full``, which the k-core filter then reduces): strict JSON lines, of which we use ``reviewerID``,
``asin`` and ``unixReviewTime``. ``meta_<Category>.json.gz``: one *Python dict literal* per line (single quotes,
so not JSON), parsed with :func:`ast.literal_eval`, never ``eval``; we use ``title``, ``brand``, ``categories``
(a list of category paths) and ``description``. A meta line that is JSON (the 2018 files) is read too.

Both files are streamed in blocks of whole lines (:class:`~genrec_dist.data.raw.Source`), never held whole; each
may also be a directory or glob of parts (read in sorted order). A review block is parsed by Polars (fast); when
Polars refuses a block or a required field is missing, the block is parsed again line by line to name the first
bad line. Meta lines are parsed only for the items that
survive the k-core filter: a cheap regex reads each line's ``asin`` first (a line without a recognisable asin is
parsed fully, so it still fails with its line number), which keeps the full-catalog meta files cheap.
"""

from __future__ import annotations

import ast
import io
import json
import re
from typing import Any

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import (BLOCK_BYTES, RawData, Source, decompress, exists_any, expand, numbered_lines,
                                  records_to_items, text_of)

REVIEW_SCHEMA = {"reviewerID": pl.Utf8, "asin": pl.Utf8, "unixReviewTime": pl.Int64}
ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"\\]+)['"]""")


def parse_review_line(line: str, path: str, lineno: int) -> tuple[str, str, int]:
    """One review line -> ``(user, item, unix time)``; anything else is an :class:`InputError` at that line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", lineno) from None
    except RecursionError:
        raise InputError(path, "not valid JSON: nested too deeply", lineno) from None
    if not isinstance(rec, dict):
        raise InputError(path, f"expected a JSON object, got {type(rec).__name__}", lineno)
    out = []
    for name in ("reviewerID", "asin"):
        value = rec.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise InputError(path, f"field '{name}' missing or not an id: {value!r}", lineno)
        out.append(str(value))
    ts = rec.get("unixReviewTime")
    if isinstance(ts, bool) or not isinstance(ts, int) or not -(2**63) <= ts < 2**63:
        raise InputError(path, f"field 'unixReviewTime' missing or not an integer: {ts!r}", lineno)
    return out[0], out[1], ts


def parse_reviews(path: str, data: bytes) -> pl.DataFrame:
    """All review lines of a file as ``user, item, timestamp`` in file order."""
    return parse_review_block(path, decompress(path, data))


def parse_review_block(path: str, raw: bytes, first_line: int = 1) -> pl.DataFrame:
    """Review lines (decompressed, whole lines starting at line ``first_line`` of ``path``) in file order."""
    try:
        df = pl.read_ndjson(io.BytesIO(raw), schema=REVIEW_SCHEMA)
        if df.height and df.null_count().sum_horizontal().item() == 0:
            return df.rename({"reviewerID": "user", "asin": "item", "unixReviewTime": "timestamp"})
    except Exception:  # noqa: BLE001 - Polars' message has no line number: the slow path below finds it
        pass
    rows = [parse_review_line(line, path, n) for n, line in numbered_lines(text_of(path, raw, first_line), first_line)]
    return pl.DataFrame(rows, schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64}, orient="row")


def parse_meta_line(line: str, path: str, lineno: int) -> dict[str, Any]:
    """One meta line (a Python dict literal, or JSON) -> the record; anything else is an :class:`InputError`."""
    try:
        rec = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        try:  # the 2018 meta files are JSON (true/false/null are not Python literals)
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(path, f"not a Python dict literal: {_why(exc)}", lineno) from None
    if not isinstance(rec, dict):
        raise InputError(path, f"expected a dict literal, got {type(rec).__name__}", lineno)
    asin = rec.get("asin")
    if isinstance(asin, bool) or not isinstance(asin, (str, int)) or asin == "":
        raise InputError(path, f"field 'asin' missing or not an id: {asin!r}", lineno)
    return rec


def _why(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"syntax error at column {exc.offset}: {exc.msg}"
    if isinstance(exc, ValueError):
        return "it holds a name, call or operator (only literals are read, never evaluated)"
    return f"{type(exc).__name__} (nested too deeply or too large)"


def parse_meta(path: str, data: bytes, wanted: set[str] | None = None) -> pl.DataFrame:
    """Meta records of the ``wanted`` items (all when None) as the items frame."""
    records: list[tuple[str, dict]] = []
    _meta_records(path, decompress(path, data), 1, wanted, records)
    return records_to_items(records)


def _meta_records(path: str, raw: bytes, first_line: int, wanted: set[str] | None,
                  records: list[tuple[str, dict]]) -> None:
    """Append ``(asin, record)`` of the wanted items among these meta lines to ``records``."""
    for n, line in numbered_lines(text_of(path, raw, first_line), first_line):
        m = ASIN.search(line)
        if m is not None and wanted is not None and m.group(1) not in wanted:
            continue
        rec = parse_meta_line(line, path, n)
        key = str(rec["asin"])
        if wanted is None or key in wanted:
            records.append((key, {k: v for k, v in rec.items() if k != "asin"}))


def stream_meta(sources: list[Source], wanted: set[str] | None) -> pl.DataFrame:
    """The wanted items' records from meta files read block by block (memory: the wanted records only)."""
    records: list[tuple[str, dict]] = []
    for src in sources:
        for first, block in src.blocks():
            _meta_records(src.path, block, first, wanted, records)
    return records_to_items(records)


def files_for(cfg: PrepareConfig, storage_cfg: Any = None) -> tuple[str, str]:
    """The review and meta paths of ``prepare.name`` (the category) in ``prepare.input_dir``: the published file
    ``reviews_<Category>_5.json.gz``, or else a folder ``reviews_<Category>_5/`` of parts (likewise for meta)."""
    if not cfg.name:
        raise InputError(cfg.input_dir or "prepare.input_dir", "set prepare.name to the category, e.g. Beauty")
    suffix = "_5" if cfg.reviews == "5core" else ""
    out = []
    for stem in (f"reviews_{cfg.name}{suffix}", f"meta_{cfg.name}"):
        path = storage.join(cfg.input_dir, f"{stem}.json.gz")
        parts = storage.join(cfg.input_dir, stem)
        out.append(parts if not storage.exists(path, storage_cfg) and storage.exists(parts, storage_cfg) else path)
    return out[0], out[1]


def read(cfg: PrepareConfig, storage_cfg: Any = None, block_bytes: int = BLOCK_BYTES) -> RawData:
    reviews_path, meta_path = files_for(cfg, storage_cfg)
    reviews = [Source(f, storage_cfg, block_bytes) for f in expand(reviews_path, storage_cfg)]

    def batches():
        for src in reviews:
            for first, block in src.blocks():
                yield parse_review_block(src.path, block, first)

    files, warnings = [s.entry for s in reviews], []
    if exists_any(meta_path, storage_cfg):
        meta = [Source(f, storage_cfg, block_bytes) for f in expand(meta_path, storage_cfg)]
        files += [s.entry for s in meta]
        load = lambda kept: stream_meta(meta, set(kept.to_list()))  # noqa: E731 - parsed after the k-core
    else:
        warnings.append(f"no meta file {meta_path}: item text is only the fallback title")
        load = None
    return RawData(batches=batches(), items=None, load_items=load, files=files, warnings=warnings,
                   info={"reviews": cfg.reviews})
