"""Reader for a generic Parquet or CSV pair (``prepare.source: parquet | csv``).

``<input_dir>/<interactions_file>.<ext>``: columns ``user_col``, ``item_col`` and ``time_col`` (integer or float
seconds, a date/datetime, or an ISO-8601 string; ``time_col: ""`` when there is none: row order is then the
order). ``<input_dir>/<items_file>.<ext>`` (optional): ``item_col`` plus text columns (``title``, ``brand``,
``categories``, ``description``, anything the template names). A file name that already ends in ``.<ext>`` is
taken as it is; either may also be a directory or glob of parts (read in sorted order, as one table). CSV files
need a header line; errors name the CSV line (header = line 1) or the Parquet row.

Interactions are read in batches through Polars' lazy scans (``scan_parquet`` / ``scan_csv`` with
``collect_batches``): a remote or gzip'd part is first copied (decompressed) to a local scratch file in blocks, so
no part is ever held whole. Times given as strings are parsed per batch (the format is inferred from a batch's
first value).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterator

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import BLOCK_BYTES, RawData, Source, decompress, exists_any, expand, text_of


def _where(path: str, row: int) -> tuple[str, int | None]:
    """(reason prefix, line) of 0-based data row ``row``: CSV line ``row + 2``, Parquet row ``row``."""
    return ("", row + 2) if not path.endswith(".parquet") else (f"row {row}: ", None)


def load_table(path: str, data: bytes) -> pl.DataFrame:
    """A CSV (all columns as strings) or Parquet file; an unreadable file names its bad line where it can."""
    if path.endswith(".parquet"):
        try:
            return pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - any Parquet decoding failure is bad input
            raise InputError(path, f"not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    text = text_of(path, decompress(path, data))
    try:
        return pl.read_csv(io.StringIO(text), infer_schema=False)
    except Exception as exc:  # noqa: BLE001 - locate the line with the csv module below
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line = _bad_csv_line(text)
    raise InputError(path, f"not a readable CSV file: {reason}", line)


def _bad_csv_line(text: str | Any) -> int:
    """The first line whose field count differs from the header's (1 when the header itself is the problem);
    ``text`` is the file's text or an open text file."""
    reader = csv.reader(io.StringIO(text) if isinstance(text, str) else text)
    try:
        header = next(reader)
        for row in reader:
            if row and len(row) != len(header):
                return reader.line_num
    except (csv.Error, StopIteration):
        return max(reader.line_num, 1)
    return 1


def _require(df: pl.DataFrame, path: str, col: str, what: str) -> None:
    if col not in df.columns:
        raise InputError(path, f"no {what} column '{col}' (columns: {', '.join(df.columns)})", 1 if
                         not path.endswith(".parquet") else None)


def _ids(df: pl.DataFrame, path: str, col: str, offset: int = 0) -> pl.Series:
    s = df[col]
    if s.dtype not in (pl.Utf8, pl.Int64, pl.Int32, pl.Int16, pl.Int8, pl.UInt64, pl.UInt32, pl.UInt16, pl.UInt8,
                       pl.Categorical):
        raise InputError(path, f"column '{col}' must hold ids (strings or integers), got {s.dtype}")
    s = s.cast(pl.Utf8)
    bad = (s.is_null() | (s.str.strip_chars() == "")).arg_true()
    if bad.len():
        prefix, line = _where(path, offset + int(bad[0]))
        raise InputError(path, f"{prefix}empty '{col}'", line)
    return s


def _times(df: pl.DataFrame, path: str, col: str, offset: int = 0) -> pl.Series:
    """Seconds since the epoch as Int64 from integers, floats, dates, datetimes or ISO strings."""
    s = df[col]
    if s.dtype.is_integer():
        out = s.cast(pl.Int64)
    elif s.dtype.is_float():
        out = s.floor().cast(pl.Int64, strict=False)
    elif s.dtype == pl.Datetime or s.dtype == pl.Date:
        out = s.cast(pl.Datetime("ms")).dt.epoch("s")
    elif s.dtype == pl.Utf8:
        txt = s.str.strip_chars()
        num = txt.cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False)
        rest = txt.zip_with(num.is_null(), pl.Series([None] * len(txt), dtype=pl.Utf8))
        try:  # the format is inferred from the first value; values of another format stay null
            iso = rest.str.to_datetime(strict=False, time_unit="ms").dt.epoch("s")
        except pl.exceptions.PolarsError:
            iso = pl.Series([None] * len(txt), dtype=pl.Int64)
        out = num.fill_null(iso)
    else:
        raise InputError(path, f"column '{col}' must hold times, got {s.dtype}")
    bad = out.is_null().arg_true()
    if bad.len():
        row = int(bad[0])
        prefix, line = _where(path, offset + row)
        raise InputError(path, f"{prefix}'{col}' is not a time: {s[row]!r}", line)
    return out


def parse_interactions(path: str, data: bytes, user_col: str, item_col: str, time_col: str) -> pl.DataFrame:
    return interaction_rows(load_table(path, data), path, user_col, item_col, time_col)


def interaction_rows(df: pl.DataFrame, path: str, user_col: str, item_col: str, time_col: str,
                     offset: int = 0) -> pl.DataFrame:
    """Rows ``offset ..`` of an interactions table as ``user, item, timestamp`` (errors name the file's line)."""
    for col, what in ((user_col, "user"), (item_col, "item")):
        _require(df, path, col, what)
    if time_col:
        _require(df, path, time_col, "time")
    times = _times(df, path, time_col, offset) if time_col else pl.Series([None] * df.height, dtype=pl.Int64)
    return pl.DataFrame({"user": _ids(df, path, user_col, offset), "item": _ids(df, path, item_col, offset),
                         "timestamp": times})


def parse_items(path: str, data: bytes, item_col: str) -> pl.DataFrame:
    return parse_item_rows(load_table(path, data), path, item_col)


def parse_item_rows(df: pl.DataFrame, path: str, item_col: str) -> pl.DataFrame:
    _require(df, path, item_col, "item")
    keys = _ids(df, path, item_col)
    text_cols = [c for c in df.columns if c != item_col and df[c].dtype in (pl.Utf8, pl.Categorical)
                 or c != item_col and df[c].dtype.is_numeric()]
    return df.select([pl.col(c).cast(pl.Utf8) for c in text_cols]).with_columns(keys.alias("item"))


def _path(cfg: PrepareConfig, name: str, storage_cfg: Any = None) -> str:
    """``<input_dir>/<name>.<ext>``; a name with a glob or the extension as it is; else a folder ``<name>`` of
    parts when there is no ``<name>.<ext>``."""
    ext = "." + cfg.source
    if name.endswith((ext, ext + ".gz")) or any(c in name for c in "*?["):
        return storage.join(cfg.input_dir, name)
    path, parts = storage.join(cfg.input_dir, name + ext), storage.join(cfg.input_dir, name)
    return parts if not storage.exists(path, storage_cfg) and storage.exists(parts, storage_cfg) else path


def local_copy(src: Source, scratch: str) -> str:
    """A local path with ``src``'s (decompressed) bytes: the file itself when local and plain, else a copy written
    to ``scratch`` block by block. Either way ``src.entry`` gets its sha256 and size."""
    if not storage.is_remote(src.path) and not src.path.endswith(".gz"):
        for _ in src._raw_chunks():  # the manifest's sha256, in blocks
            pass
        return storage.filesystem(src.path)[1]
    name = os.path.basename(src.path)
    local = os.path.join(scratch, f"{len(os.listdir(scratch)):05d}-{name[:-3] if name.endswith('.gz') else name}")
    with open(local, "wb") as fh:
        for _, block in src.blocks():
            fh.write(block)
    return local


def scan(path: str, local: str) -> pl.LazyFrame:
    if path.endswith((".parquet", ".parquet.gz")):
        return pl.scan_parquet(local)
    return pl.scan_csv(local, infer_schema=False)


def table_batches(path: str, local: str, rows: int) -> Iterator[pl.DataFrame]:
    """The table in batches of about ``rows`` rows (Polars' streaming engine); unreadable input is an
    :class:`InputError` naming the file (and, for CSV, its first bad line)."""
    try:
        for batch in scan(path, local).collect_batches(chunk_size=rows, engine="streaming"):
            yield batch
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is bad input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if path.endswith((".parquet", ".parquet.gz")):
            raise InputError(path, f"not a readable Parquet file: {reason}") from None
        with open(local, encoding="utf-8", errors="replace", newline="") as fh:
            line = _bad_csv_line(fh)
        raise InputError(path, f"not a readable CSV file: {reason}", line) from None


def read(cfg: PrepareConfig, storage_cfg: Any = None, block_bytes: int = BLOCK_BYTES, scratch: str = "",
         batch_rows: int = 1 << 20) -> RawData:
    inter_path = _path(cfg, cfg.interactions_file, storage_cfg)
    parts = [Source(f, storage_cfg, block_bytes) for f in expand(inter_path, storage_cfg)]

    def batches():
        for src in parts:
            local, offset = local_copy(src, scratch), 0
            for batch in table_batches(src.path, local, batch_rows):
                yield interaction_rows(batch, src.path, cfg.user_col, cfg.item_col, cfg.time_col, offset)
                offset += batch.height
            if local.startswith(scratch):
                os.remove(local)

    files, warnings = [s.entry for s in parts], []
    items_path = _path(cfg, cfg.items_file, storage_cfg)
    items = None
    if exists_any(items_path, storage_cfg):
        frames = []
        for f in expand(items_path, storage_cfg):
            src = Source(f, storage_cfg, block_bytes)
            local = local_copy(src, scratch)
            frames += [parse_item_rows(b, f, cfg.item_col) for b in table_batches(f, local, batch_rows)]
            files.append(src.entry)
        items = pl.concat(frames, how="diagonal_relaxed") if frames else None
    else:
        warnings.append(f"no items file {items_path}: item text is only the fallback title")
    return RawData(batches=batches(), items=items, files=files, warnings=warnings)
