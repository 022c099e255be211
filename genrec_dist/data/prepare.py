"""Stage 1: raw files (or the synthetic generator) -> a committed, sharded dataset (``dataset.py`` format).

``run_prepare(cfg)`` reads the source named by ``cfg.prepare.source``, de-duplicates, k-cores, orders each user's
events, assigns ids, builds item text and commits the dataset atomically with its manifest (rules in
``clean.py`` and ``text.py``). It returns the summary that ``jobs/prepare.py`` prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

import polars as pl

from genrec_dist import storage
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data import clean, dataset, text
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import RawData, empty_items
from genrec_dist.errors import ConfigError

log = logging.getLogger(__name__)
ITEM_COLUMNS = ["item_id", "item", "title", "text", "brand", "categories", "description"]


class PrepareSettings(Protocol):
    """What this stage reads of a config (the root ``Config`` has it): the ``prepare`` section, the seed of the
    synthetic source, where the dataset goes and how storage is reached. The whole config (a dataclass) is recorded
    in the manifest."""

    name: str
    seed: int
    prepare: PrepareConfig
    storage: Any
    dataset_dir: str


def read_raw(cfg: PrepareSettings) -> RawData:
    """The reader for ``cfg.prepare.source``."""
    p = cfg.prepare
    if p.source == "synthetic":
        from genrec_dist.data import synthetic

        return synthetic.generate(p.synthetic, cfg.seed)
    if not p.input_dir:
        raise InputError("prepare.input_dir", f"is empty: name the folder that holds the {p.source} files")
    if p.source == "amazon2014":
        from genrec_dist.data import amazon2014

        return amazon2014.read(p, cfg.storage)
    if p.source == "lcrec":
        from genrec_dist.data import lcrec

        return lcrec.read(p, cfg.storage)
    if p.source in ("parquet", "csv"):
        from genrec_dist.data import tabular

        return tabular.read(p, cfg.storage)
    raise ConfigError(f"prepare.source: unknown source {p.source!r}")


def run_prepare(cfg: PrepareSettings) -> dict[str, Any]:
    """Prepare the dataset at ``cfg.dataset_dir`` and return the summary (counts, lengths, timings, warnings).

    Raises :class:`InputError` (bad or empty input, naming file and line), :class:`storage.StorageError`
    (destination exists without ``prepare.overwrite``, or unreachable storage). On any error the destination
    is unchanged.
    """
    t0 = time.perf_counter()
    p = cfg.prepare
    out = cfg.dataset_dir
    text.template_fields(p.text_template)
    if p.num_shards < 1:
        raise ConfigError(f"prepare.num_shards must be >= 1, got {p.num_shards}")
    # Fail before the work (and reach the storage once) when the destination is taken.
    _check_destination(out, cfg.storage, p.overwrite)

    raw = read_raw(cfg)
    t_read = time.perf_counter()
    where = raw.files[0]["path"] if raw.files else p.source
    if raw.interactions.height == 0:
        raise InputError(where, "no interactions in the input")
    has_time = raw.interactions["timestamp"].null_count() < raw.interactions.height

    df = clean.with_order(raw.interactions)
    df, duplicates = clean.deduplicate(df)
    before = df.select(pl.len(), pl.col("user").n_unique(), pl.col("item").n_unique()).row(0)
    df, rounds = clean.k_core(df, p.k_core)
    if df.height == 0:
        raise InputError(where, f"the {p.k_core}-core filter removed every interaction ({before[0]} interactions "
                                f"of {before[1]} users and {before[2]} items); lower prepare.k_core")

    users = clean.id_map(df["user"], "user")
    item_ids = clean.id_map(df["item"], "item")
    if raw.items is not None:
        records = raw.items
    elif raw.load_items is not None:
        records = raw.load_items(set(item_ids["item"].to_list()))
    else:
        records = empty_items()
    items, no_title, no_record = _items(item_ids, records, p.text_template, p.max_text_chars)
    seq = clean.sequences(df, users, items, has_time)

    warnings = list(raw.warnings)
    if no_title:
        warnings.append(f"{no_title} of {items.height} items have no title; they use the fallback "
                        f"'{text.FALLBACK_TITLE}' ({no_record} have no item record at all)")
    for w in warnings:
        log.warning(w)
    counts, stats = _stats(seq, items.height)
    stats.update({
        "has_timestamps": has_time,
        "duplicates_dropped": duplicates,
        "k_core": {"k": p.k_core, "rounds": rounds, "interactions_removed": before[0] - counts["interactions"],
                   "users_removed": before[1] - counts["users"], "items_removed": before[2] - counts["items"]},
        "items_without_title": no_title,
        "items_without_record": no_record,
        "raw": {"interactions": raw.interactions.height, **raw.info},
    })
    manifest = {
        "name": cfg.name,
        "source": {"type": p.source, "name": p.name, "input_dir": p.input_dir, "files": raw.files},
        "counts": counts,
        "split": {"rule": "leave-one-out", "test": "last item", "valid": "second to last item",
                  "train": "the items before those", "max_history": p.max_history},
        "rules": {"dedup": clean.DEDUP_RULE, "order": clean.ORDER_RULE, "ids": clean.ID_RULE,
                  "text_template": p.text_template, "fallback_title": text.FALLBACK_TITLE},
        "stats": stats,
        "warnings": warnings,
        "config": dataclasses.asdict(cfg),
    }
    t_clean = time.perf_counter()
    dataset.write_dataset(out, items, seq, manifest, p.num_shards, cfg.storage, overwrite=p.overwrite)
    t_end = time.perf_counter()
    return {
        "dataset": out, "source": p.source, **counts, **stats, "warnings": warnings,
        "seconds": {"read": t_read - t0, "clean": t_clean - t_read, "write": t_end - t_clean, "total": t_end - t0},
    }


def _stats(seq: pl.DataFrame, num_items: int) -> tuple[dict[str, int], dict[str, Any]]:
    lengths = seq["items"].list.len()
    counts = {"users": seq.height, "items": num_items, "interactions": int(lengths.sum())}
    q = lambda f: float(lengths.quantile(f, "nearest"))  # noqa: E731
    return counts, {
        "density": counts["interactions"] / (counts["users"] * counts["items"]),
        "length": {"min": int(lengths.min()), "p50": q(0.5), "p90": q(0.9), "max": int(lengths.max()),
                   "mean": float(lengths.mean())},
    }


def _check_destination(path: str, storage_cfg: Any, overwrite: bool) -> None:
    taken = storage.exists(path, storage_cfg) and bool(storage.list_files(path, storage_cfg))
    if taken and not overwrite:
        raise storage.StorageError(f"{path}: already exists (pass prepare.overwrite=true to replace it)")


def _items(item_ids: pl.DataFrame, records: pl.DataFrame, template: str, max_chars: int
           ) -> tuple[pl.DataFrame, int, int]:
    """The items table for the kept items: the first record per item key, text from the template."""
    records = records.drop([c for c in ("item_id",) if c in records.columns])
    records = records.unique(subset="item", keep="first", maintain_order=True).with_columns(
        pl.lit(True).alias("_has_record"))
    items = item_ids.join(records, on="item", how="left").sort("item_id")
    no_record = int(items["_has_record"].null_count())
    items, no_title = text.build_text(items.drop("_has_record"), template, max_chars)
    for col in ("brand", "categories", "description"):
        if col not in items.columns:
            items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias(col))
    items = items.with_columns(pl.col(c).fill_null("") for c in ("brand", "categories", "description"))
    return items.select(ITEM_COLUMNS), no_title, no_record


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a small aligned table (what ``jobs/prepare.py`` prints)."""
    ln = summary["length"]
    rows = [
        ("dataset", summary["dataset"]),
        ("source", summary["source"]),
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("interactions", f"{summary['interactions']:,}"),
        ("density", f"{summary['density']:.6f}"),
        ("seq length min/p50/p90/max", f"{ln['min']} / {ln['p50']:g} / {ln['p90']:g} / {ln['max']}"),
        ("duplicates dropped", f"{summary['duplicates_dropped']:,}"),
        ("k-core removed (inter.)", f"{summary['k_core']['interactions_removed']:,} "
                                    f"in {summary['k_core']['rounds']} rounds"),
        ("items without title", f"{summary['items_without_title']:,}"),
        ("time (s) read/clean/write", "{read:.2f} / {clean:.2f} / {write:.2f}".format(**summary["seconds"])),
        ("time (s) total", f"{summary['seconds']['total']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
