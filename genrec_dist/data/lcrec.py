"""Reader for the LC-Rec / LETTER JSON layout (the real datasets in ``../shared/data``).

``<Name>.inter.json[.gz]``: one JSON object, user key -> list of item keys, each list in chronological order
(oldest first) with no timestamps, so the position is the order. ``<Name>.item.json[.gz]``: item key ->
``{"title", "description", "brand", "categories", ...}``. The item file is optional: without it the interactions
are still prepared, every item gets the fallback title, and a warning says so (it is picked up automatically
once the file appears).

The interaction file is decoded one ``user: [items]`` entry at a time from blocks of the decompressed file
(:func:`inter_entries`), so it is never held whole; the item file (one record per item) is read whole.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import (BLOCK_BYTES, RawData, Source, decompress, empty_items, read_source,
                                  records_to_items, text_of)

INTER, ITEM = ".inter.json", ".item.json"


def find(input_dir: str, name: str, suffix: str, storage_cfg: Any = None, required: bool = True) -> str | None:
    """``<input_dir>/<name><suffix>`` or its ``.gz``; with no ``name``, the one file in the folder that ends so."""
    try:
        files = storage.list_files(input_dir, storage_cfg)
    except FileNotFoundError:
        raise InputError(input_dir, "input folder not found (prepare.input_dir)") from None
    base = {f.rsplit("/", 1)[-1]: f for f in files}
    if name:
        for candidate in (f"{name}{suffix}", f"{name}{suffix}.gz"):
            if candidate in base:
                return base[candidate]
        if required:
            raise InputError(storage.join(input_dir, f"{name}{suffix}[.gz]"), "file not found")
        return None
    hits = [f for b, f in sorted(base.items()) if b.endswith(suffix) or b.endswith(suffix + ".gz")]
    if len(hits) == 1:
        return hits[0]
    if not hits and not required:
        return None
    raise InputError(input_dir, f"expected one *{suffix}[.gz] file, found {len(hits)}: set prepare.name")


def load_json(path: str, data: bytes) -> Any:
    """A whole-file JSON document; a syntax error names the line and column."""
    text = text_of(path, decompress(path, data))
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise InputError(path, "not valid JSON: nested too deeply", 1) from None


def line_of(text: str, key: str) -> int:
    """The line where ``"key"`` first appears (1 when not found), for errors about one entry of a JSON object."""
    at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def parse_inter(path: str, data: bytes) -> pl.DataFrame:
    """``user -> [items]`` as rows ``user, item`` in file order (position = chronological order)."""
    doc, text = load_json(path, data)
    if not isinstance(doc, dict):
        raise InputError(path, f"expected a JSON object user -> item list, got {type(doc).__name__}", 1)
    users: list[str] = []
    items: list[str] = []
    for user, seq in doc.items():
        if not isinstance(seq, list):
            raise InputError(path, f"user {user!r}: expected a list of items, got {type(seq).__name__}",
                             line_of(text, user))
        for it in seq:
            if isinstance(it, bool) or not isinstance(it, (int, str)) or it == "":
                raise InputError(path, f"user {user!r}: item {it!r} is not an item key (int or string)",
                                 line_of(text, user))
        users.extend([user] * len(seq))
        items.extend(str(it) for it in seq)
    return pl.DataFrame({"user": users, "item": items, "timestamp": pl.Series([None] * len(users), dtype=pl.Int64)},
                        schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64})


def parse_items(path: str, data: bytes) -> pl.DataFrame:
    """``item -> {field: value}`` as the items frame (list fields joined with ', ')."""
    doc, text = load_json(path, data)
    if not isinstance(doc, dict):
        raise InputError(path, f"expected a JSON object item -> fields, got {type(doc).__name__}", 1)
    records = []
    for key, rec in doc.items():
        if not isinstance(rec, dict):
            raise InputError(path, f"item {key!r}: expected an object of fields, got {type(rec).__name__}",
                             line_of(text, key))
        records.append((str(key), rec))
    return records_to_items(records)


def inter_entries(src: Source) -> Iterator[tuple[str, Any, int]]:
    """``(user, value, line)`` of each entry of the top-level JSON object, decoded incrementally from blocks."""
    dec = json.JSONDecoder()
    blocks = src.blocks()
    buf, pos, line, done = "", 0, 1, False

    def more() -> bool:
        nonlocal buf, pos, done
        for first, block in blocks:
            buf, pos = buf[pos:] + text_of(src.path, block, first), 0
            return True
        done = True
        return False

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or not more():
                return

    def fail(msg: str) -> InputError:
        return InputError(src.path, msg, line)

    def decode() -> Any:  # one JSON value at pos, reading more blocks while it is cut off
        nonlocal pos, line
        while True:
            try:
                value, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if not done and more():
                    continue
                raise InputError(src.path, f"not valid JSON: {exc.msg} (column {exc.colno})",
                                 line + buf.count("\n", pos, exc.pos)) from None
            except RecursionError:
                raise fail("not valid JSON: nested too deeply") from None
            if end == len(buf) and not done and more():  # a number may continue in the next block
                continue
            line += buf.count("\n", pos, end)
            pos = end
            return value

    def expect(chars: str) -> str:
        skip_ws()
        if pos >= len(buf) or buf[pos] not in chars:
            got = repr(buf[pos]) if pos < len(buf) else "the end of the file"
            raise fail(f"not valid JSON: expected {' or '.join(repr(c) for c in chars)}, got {got}")
        return buf[pos]

    skip_ws()
    if pos >= len(buf) or buf[pos] != "{":
        doc = decode()  # a valid document that is not an object, or the decoder's own error
        raise InputError(src.path, f"expected a JSON object user -> item list, got {type(doc).__name__}", 1)
    pos += 1
    if expect('"}') == "}":
        pos += 1
    else:
        while True:
            expect('"')
            key_line = line
            key = decode()
            expect(":")
            pos += 1
            skip_ws()
            yield key, decode(), key_line
            sep = expect(",}")
            pos += 1
            if sep == "}":
                break
            expect('"')
    skip_ws()
    if pos < len(buf):
        raise fail("not valid JSON: Extra data after the object")


def inter_batches(src: Source, batch_rows: int) -> Iterator[pl.DataFrame]:
    """Rows ``user, item`` (timestamp null) in file order, in batches of about ``batch_rows`` rows."""
    users: list[str] = []
    items: list[str] = []
    seen: set[str] = set()
    for user, seq, line in inter_entries(src):
        if user in seen:
            raise InputError(src.path, f"user {user!r} appears twice in the object", line)
        seen.add(user)
        if not isinstance(seq, list):
            raise InputError(src.path, f"user {user!r}: expected a list of items, got {type(seq).__name__}", line)
        for it in seq:
            if isinstance(it, bool) or not isinstance(it, (int, str)) or it == "":
                raise InputError(src.path, f"user {user!r}: item {it!r} is not an item key (int or string)", line)
        users.extend([user] * len(seq))
        items.extend(str(it) for it in seq)
        if len(users) >= batch_rows:
            yield _inter_frame(users, items)
            users, items = [], []
    if users:
        yield _inter_frame(users, items)


def _inter_frame(users: list[str], items: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"user": users, "item": items, "timestamp": pl.Series([None] * len(users), dtype=pl.Int64)},
                        schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64})


def read(cfg: PrepareConfig, storage_cfg: Any = None, block_bytes: int = BLOCK_BYTES,
         batch_rows: int = 1 << 20) -> RawData:
    inter_path = find(cfg.input_dir, cfg.name, INTER, storage_cfg)
    src = Source(inter_path, storage_cfg, block_bytes)
    files, warnings = [src.entry], []
    name = cfg.name or inter_path.rsplit("/", 1)[-1].split(INTER)[0]
    item_path = find(cfg.input_dir, name, ITEM, storage_cfg, required=False)
    if item_path is None:
        items = empty_items()
        warnings.append(f"no item file {storage.join(cfg.input_dir, name + ITEM)}[.gz]: every item's text "
                        f"is its fallback title (add the file and prepare again)")
    else:
        data, entry = read_source(item_path, storage_cfg)
        items = parse_items(item_path, data)
        files.append(entry)
    return RawData(batches=inter_batches(src, batch_rows), items=items, files=files, warnings=warnings,
                   info={"timestamps": "none: position in the list is the order"})
