"""What every reader hands to :func:`genrec_dist.data.prepare.run_prepare`, and the file helpers they share.

A reader returns :class:`RawData`: the interactions in source order (``user``, ``item`` as strings, ``timestamp``
as Int64 seconds or null when the source has none), the item records (``item`` plus text fields as strings), and
the source files it read with their sha256 and size (for the manifest). A reader whose item file is large may
defer parsing it to ``load_items``, which prepare calls with the item keys that survive the k-core filter.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import polars as pl

from genrec_dist import storage
from genrec_dist.data.errors import InputError

INTERACTION_SCHEMA = {"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64}
# The item fields the default text template uses; a reader may add more (any string column).
TEXT_FIELDS = ("title", "brand", "categories", "description")


@dataclass
class RawData:
    interactions: pl.DataFrame  # user:str, item:str, timestamp:i64|null, rows in source order
    items: pl.DataFrame | None  # item:str + string fields (title, brand, categories, description, ...)
    # Instead of ``items``: parse the records of just these item keys (called after the k-core filter).
    load_items: Callable[[set[str]], pl.DataFrame] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)  # {path, sha256, bytes}
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # source-specific facts for the manifest


def empty_items() -> pl.DataFrame:
    return pl.DataFrame(schema={"item": pl.Utf8, **{f: pl.Utf8 for f in TEXT_FIELDS}})


def read_source(path: str, storage_cfg: Any = None) -> tuple[bytes, dict[str, Any]]:
    """The raw bytes of ``path`` (local or s3) and its manifest entry ``{path, sha256, bytes}``."""
    try:
        data = storage.read_bytes(path, storage_cfg)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a file") from None
    return data, {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def decompress(path: str, data: bytes) -> bytes:
    """Gunzip ``data`` when ``path`` ends in ``.gz`` (every member); a truncated or corrupt stream is an
    :class:`InputError` naming the last complete line, so a user knows how far the file is intact."""
    if not path.endswith(".gz"):
        return data
    out: list[bytes] = []
    rest = data
    while rest:
        dec = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        try:
            out.append(dec.decompress(rest))
            out.append(dec.flush())
        except zlib.error as exc:
            lines = b"".join(out).count(b"\n")
            raise InputError(path, f"corrupt gzip data after line {lines}: {exc}", lines + 1) from None
        if not dec.eof:
            good = b"".join(out)
            lines = good.count(b"\n")
            raise InputError(path, f"truncated gzip: the stream ends after line {lines} "
                                   f"(re-download or re-compress the file)", lines + 1)
        rest = dec.unused_data
    return b"".join(out)


def text_of(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line) from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank line, numbered from 1 as an editor shows them."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def as_text(value: Any) -> str | None:
    """One text field from a raw record: strings as they are, lists (Amazon ``categories`` is a list of
    category paths) flattened and joined with ', ' without repeats, numbers as text, anything else dropped."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        flat: list[str] = []
        stack = list(value)[::-1]
        while stack:
            v = stack.pop()
            if isinstance(v, (list, tuple)):
                stack.extend(list(v)[::-1])
            elif v is not None and not isinstance(v, dict):
                s = str(v).strip()
                if s and s not in flat:
                    flat.append(s)
        return ", ".join(flat)
    return None


def records_to_items(records: list[tuple[str, dict]]) -> pl.DataFrame:
    """``[(item key, raw record)]`` -> the items frame: ``item`` plus every text-like field as a string column."""
    columns: dict[str, list] = {"item": [], **{f: [] for f in TEXT_FIELDS}}
    for i, (key, rec) in enumerate(records):
        columns["item"].append(key)
        for name, value in rec.items():
            if name == "item":
                continue
            text = as_text(value)
            if text is None and name not in columns:
                continue
            if name not in columns:
                columns[name] = [None] * i
            columns[name].append(text)
        for col in columns.values():
            if len(col) < i + 1:
                col.append(None)
    return pl.DataFrame(columns, schema={k: pl.Utf8 for k in columns})
