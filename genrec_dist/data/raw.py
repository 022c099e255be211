"""What every reader hands to :func:`genrec_dist.data.prepare.run_prepare`, and the file helpers they share.

A reader returns :class:`RawData`: the interactions in source order as an iterator of batches (``user``, ``item``
as strings, ``timestamp`` as Int64 seconds or null when the source has none), so no reader holds a whole input
file in memory (:func:`stream_lines` decompresses and splits a file in fixed-size blocks), the item records (``item`` plus text fields as strings), and
the source files it read with their sha256 and size (for the manifest). A reader whose item file is large may
defer parsing it to ``load_items``, which prepare calls with the item keys that survive the k-core filter.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import polars as pl

from genrec_dist import storage
from genrec_dist.data.errors import InputError

INTERACTION_SCHEMA = {"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64}
# The item fields the default text template uses; a reader may add more (any string column).
TEXT_FIELDS = ("title", "brand", "categories", "description")


BLOCK_BYTES = 8 << 20  # bytes read (and decompressed) per step when a reader streams a file


def block_bytes(budget_mb: int) -> int:
    """Bytes per read step for a memory budget of ``budget_mb`` MiB (1 MiB .. :data:`BLOCK_BYTES`)."""
    return max(1 << 20, min(BLOCK_BYTES, (budget_mb << 20) // 64))


@dataclass
class RawData:
    # Batches of user:str, item:str, timestamp:i64|null, rows in source order; consumed once. The ``files``
    # entries of streamed files are complete once the batches are consumed.
    batches: Iterable[pl.DataFrame]
    items: pl.DataFrame | None  # item:str + string fields (title, brand, categories, description, ...)
    # Instead of ``items``: the records of just these item keys (called after the k-core filter).
    load_items: Callable[[pl.Series], pl.DataFrame] | None = None
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


def expand(path: str, storage_cfg: Any = None) -> list[str]:
    """The files one logical input names, in source order: ``path`` itself, every file of a directory of parts
    (sorted, hidden files skipped), or the sorted matches of a glob (``*``, ``?``, ``[``). Local or s3://."""
    fs, p = storage.filesystem(path, storage_cfg)
    scheme = path.split("://", 1)[0] + "://" if storage.is_remote(path) else ""
    if any(c in path for c in "*?["):
        with storage._guard(path, storage_cfg):
            hits = sorted(fs.glob(p)) if scheme else sorted(globlib.glob(p))
        hits = [h for h in hits if not h.rsplit("/", 1)[-1].startswith(".")]
        if not hits:
            raise InputError(path, "no file matches this pattern")
        return [scheme + h if scheme else h for h in hits]
    with storage._guard(path, storage_cfg):
        is_dir = fs.isdir(p)
    if is_dir:
        parts = [f for f in storage.list_files(path, storage_cfg) if not f.rsplit("/", 1)[-1].startswith(".")]
        if not parts:
            raise InputError(path, "is an empty directory, expected a file or its parts")
        return parts
    return [path]


def exists_any(path: str, storage_cfg: Any = None) -> bool:
    """Whether ``path`` names a file, a directory of parts or a glob with matches."""
    if not any(c in path for c in "*?["):
        return storage.exists(path, storage_cfg)
    try:
        return bool(expand(path, storage_cfg))
    except InputError:
        return False


class Source:
    """One input file read as a stream of whole-line blocks (:meth:`blocks`); its manifest entry
    ``{path, sha256, bytes}`` (of the stored, possibly compressed, bytes) is complete once the stream ends."""

    def __init__(self, path: str, storage_cfg: Any = None, block_bytes: int = BLOCK_BYTES):
        self.path, self.storage_cfg, self.block_bytes = path, storage_cfg, block_bytes
        self.entry: dict[str, Any] = {"path": path, "sha256": "", "bytes": 0}

    def _raw_chunks(self) -> Iterator[bytes]:
        fs, p = storage.filesystem(self.path, self.storage_cfg)
        digest, size = hashlib.sha256(), 0
        try:
            with storage._guard(self.path, self.storage_cfg):
                if fs.isdir(p):
                    raise InputError(self.path, "is a directory, expected a file")
                fh = fs.open(p, "rb")
            with fh:
                while True:
                    with storage._guard(self.path, self.storage_cfg):
                        chunk = fh.read(self.block_bytes)
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
        except FileNotFoundError:
            raise InputError(self.path, "file not found") from None
        self.entry.update(sha256=digest.hexdigest(), bytes=size)

    def _plain_chunks(self) -> Iterator[bytes]:
        """The decompressed bytes (every gzip member) in chunks; corrupt or truncated data is an
        :class:`InputError` naming the last complete line, as :func:`decompress` does."""
        if not self.path.endswith(".gz"):
            yield from self._raw_chunks()
            return
        lines, fresh = 0, True  # fresh: no byte of the current gzip member seen yet
        dec = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        for chunk in self._raw_chunks():
            while chunk:
                fresh = False
                try:
                    out = dec.decompress(chunk)
                except zlib.error as exc:
                    raise InputError(self.path, f"corrupt gzip data after line {lines}: {exc}", lines + 1) from None
                lines += out.count(b"\n")
                if out:
                    yield out
                chunk = b""
                if dec.eof:  # the next gzip member, if any, starts in the unused bytes
                    chunk, dec, fresh = dec.unused_data, zlib.decompressobj(wbits=31), True
        if not fresh:
            raise InputError(self.path, f"truncated gzip: the stream ends after line {lines} "
                                        f"(re-download or re-compress the file)", lines + 1)

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """``(number of the block's first line, bytes of whole lines)`` over the decompressed file."""
        line, rest = 1, b""
        for chunk in self._plain_chunks():
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield line, block
            line += block.count(b"\n")
        if rest:
            yield line, rest


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


def text_of(path: str, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + first_line
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line) from None


def numbered_lines(text: str, start: int = 1) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank line, numbered from ``start`` (1: as an editor shows them)."""
    for number, line in enumerate(text.split("\n"), start=start):
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
