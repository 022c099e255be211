"""Reader for a generic Parquet or CSV pair (``prepare.source: parquet | csv``).

``<input_dir>/<interactions_file>.<ext>``: columns ``user_col``, ``item_col`` and ``time_col`` (integer or float
seconds, a date/datetime, or an ISO-8601 string; ``time_col: ""`` when there is none: row order is then the
order). ``<input_dir>/<items_file>.<ext>`` (optional): ``item_col`` plus text columns (``title``, ``brand``,
``categories``, ``description``, anything the template names). A file name that already ends in ``.<ext>`` is
taken as it is. CSV files need a header line; errors name the CSV line (header = line 1) or the Parquet row.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import RawData, decompress, read_source, text_of


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


def _bad_csv_line(text: str) -> int:
    """The first line whose field count differs from the header's (1 when the header itself is the problem)."""
    reader = csv.reader(io.StringIO(text))
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


def _ids(df: pl.DataFrame, path: str, col: str) -> pl.Series:
    s = df[col]
    if s.dtype not in (pl.Utf8, pl.Int64, pl.Int32, pl.Int16, pl.Int8, pl.UInt64, pl.UInt32, pl.UInt16, pl.UInt8,
                       pl.Categorical):
        raise InputError(path, f"column '{col}' must hold ids (strings or integers), got {s.dtype}")
    s = s.cast(pl.Utf8)
    bad = (s.is_null() | (s.str.strip_chars() == "")).arg_true()
    if bad.len():
        prefix, line = _where(path, int(bad[0]))
        raise InputError(path, f"{prefix}empty '{col}'", line)
    return s


def _times(df: pl.DataFrame, path: str, col: str) -> pl.Series:
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
        prefix, line = _where(path, row)
        raise InputError(path, f"{prefix}'{col}' is not a time: {s[row]!r}", line)
    return out


def parse_interactions(path: str, data: bytes, user_col: str, item_col: str, time_col: str) -> pl.DataFrame:
    df = load_table(path, data)
    for col, what in ((user_col, "user"), (item_col, "item")):
        _require(df, path, col, what)
    if time_col:
        _require(df, path, time_col, "time")
    times = _times(df, path, time_col) if time_col else pl.Series([None] * df.height, dtype=pl.Int64)
    return pl.DataFrame({"user": _ids(df, path, user_col), "item": _ids(df, path, item_col),
                         "timestamp": times})


def parse_items(path: str, data: bytes, item_col: str) -> pl.DataFrame:
    df = load_table(path, data)
    _require(df, path, item_col, "item")
    keys = _ids(df, path, item_col)
    text_cols = [c for c in df.columns if c != item_col and df[c].dtype in (pl.Utf8, pl.Categorical)
                 or c != item_col and df[c].dtype.is_numeric()]
    return df.select([pl.col(c).cast(pl.Utf8) for c in text_cols]).with_columns(keys.alias("item"))


def _path(cfg: PrepareConfig, name: str) -> str:
    ext = "." + cfg.source
    return storage.join(cfg.input_dir, name if name.endswith((ext, ext + ".gz")) else name + ext)


def read(cfg: PrepareConfig, storage_cfg: Any = None) -> RawData:
    inter_path = _path(cfg, cfg.interactions_file)
    data, entry = read_source(inter_path, storage_cfg)
    interactions = parse_interactions(inter_path, data, cfg.user_col, cfg.item_col, cfg.time_col)
    files, warnings = [entry], []
    items_path = _path(cfg, cfg.items_file)
    if storage.exists(items_path, storage_cfg):
        data, entry = read_source(items_path, storage_cfg)
        items = parse_items(items_path, data, cfg.item_col)
        files.append(entry)
    else:
        items = None
        warnings.append(f"no items file {items_path}: item text is only the fallback title")
    return RawData(interactions=interactions, items=items, files=files, warnings=warnings)
