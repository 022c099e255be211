"""Reader for the LC-Rec / LETTER JSON layout (the real datasets in ``../shared/data``).

``<Name>.inter.json[.gz]``: one JSON object, user key -> list of item keys, each list in chronological order
(oldest first) with no timestamps, so the position is the order. ``<Name>.item.json[.gz]``: item key ->
``{"title", "description", "brand", "categories", ...}``. The item file is optional: without it the interactions
are still prepared, every item gets the fallback title, and a warning says so (it is picked up automatically
once the file appears).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import RawData, decompress, empty_items, read_source, records_to_items, text_of

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


def read(cfg: PrepareConfig, storage_cfg: Any = None) -> RawData:
    inter_path = find(cfg.input_dir, cfg.name, INTER, storage_cfg)
    data, entry = read_source(inter_path, storage_cfg)
    interactions = parse_inter(inter_path, data)
    files, warnings = [entry], []
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
    return RawData(interactions=interactions, items=items, files=files, warnings=warnings,
                   info={"timestamps": "none: position in the list is the order"})
