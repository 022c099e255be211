"""Stage 1: raw files (or the synthetic generator) -> a committed, sharded dataset (``dataset.py`` format).

``run_prepare(cfg)`` reads the source named by ``cfg.prepare.source``, de-duplicates, k-cores, orders each user's
events, assigns ids, builds item text and commits the dataset atomically with its manifest (rules in
``clean.py`` and ``text.py``). It returns the summary that ``jobs/prepare.py`` prints.

The readers stream their input in batches and the cleaning runs over hash buckets spilled to local disk
(``buckets.py``), so peak memory follows ``prepare.memory_budget_mb``. ``run_prepare(cfg, in_memory=True)`` is
the reference: the same steps over one in-memory frame (``clean.py``), which writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable, Protocol

import polars as pl

from genrec_dist import storage
from genrec_dist.data import buckets, clean, dataset, text
from genrec_dist.data.config import PrepareConfig
from genrec_dist.data.errors import InputError
from genrec_dist.data.raw import RawData, empty_items
from genrec_dist.data.raw import block_bytes as raw_blocks
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


def read_raw(cfg: PrepareSettings, scratch: str = "") -> RawData:
    """The reader for ``cfg.prepare.source`` (``scratch``: a local folder for readers that copy a part first)."""
    p = cfg.prepare
    rows = buckets.bucket_rows(p.memory_budget_mb)
    block = raw_blocks(p.memory_budget_mb)
    if p.source == "synthetic":
        from genrec_dist.data import synthetic

        return synthetic.generate(p.synthetic, cfg.seed)
    if not p.input_dir:
        raise InputError("prepare.input_dir", f"is empty: name the folder that holds the {p.source} files")
    if p.source == "amazon2014":
        from genrec_dist.data import amazon2014

        return amazon2014.read(p, cfg.storage, block)
    if p.source == "lcrec":
        from genrec_dist.data import lcrec

        return lcrec.read(p, cfg.storage, block, rows)
    if p.source in ("parquet", "csv"):
        from genrec_dist.data import tabular

        return tabular.read(p, cfg.storage, block, scratch, rows)
    raise ConfigError(f"prepare.source: unknown source {p.source!r}")


def run_prepare(cfg: PrepareSettings, in_memory: bool = False, *,
                tracking: Callable | None = None) -> dict[str, Any]:
    """Prepare the dataset at ``cfg.dataset_dir`` and return the summary (counts, lengths, timings, warnings).

    ``tracking`` (the job's tracker factory, ``genrec_dist.tracking.make_tracker``, as train, tokenize, evaluate and
    recommend take it): the pipeline's first MLflow run, started before the work (an unreachable server ends the job
    before anything is written), FAILED when the work fails; counts as metrics, the summary as an artifact, the
    dataset's tags and the config once it is committed. Raises :class:`InputError` (bad or empty input, naming file
    and line), :class:`storage.StorageError`
    (destination exists without ``prepare.overwrite``, or unreachable storage). On any error the destination
    is unchanged. ``in_memory``: clean one whole frame (the reference path; same bytes, memory grows with the input).
    """
    if tracking is None:
        return _prepare(cfg, in_memory)
    tracker = tracking(cfg, "prepare", extra_tags={"genrec.dataset_path": cfg.dataset_dir})
    try:
        summary = _prepare(cfg, in_memory)
    except BaseException:
        tracker.close("FAILED")
        raise
    made = dataset.Dataset.open(cfg.dataset_dir, cfg.storage)
    tracker.set_tags(made.tags())
    tracker.log_input(**made.input_spec(), context="output")  # what it made (MLflow has no dataset outputs)
    tracker.log_config(cfg)
    tracker.log({k: summary[k] for k in ("users", "items", "interactions", "density")})
    tracker.log_text(summary_table(summary) + "\n", "summary.txt")
    tracker.close()
    return {**summary, "mlflow_run_id": tracker.run_id}


def _prepare(cfg: PrepareSettings, in_memory: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = cfg.prepare
    out = cfg.dataset_dir
    text.template_fields(p.text_template)
    if p.num_shards < 1:
        raise ConfigError(f"prepare.num_shards must be >= 1, got {p.num_shards}")
    if p.memory_budget_mb < 64:
        raise ConfigError(f"prepare.memory_budget_mb must be >= 64, got {p.memory_budget_mb}")
    if p.spill_dir and not os.path.isdir(p.spill_dir):
        raise ConfigError(f"prepare.spill_dir: {p.spill_dir} is not a local folder")
    # Fail before the work (and reach the storage once) when the destination is taken.
    _check_destination(out, cfg.storage, p.overwrite)

    with tempfile.TemporaryDirectory(prefix="genrec-prepare-", dir=p.spill_dir or None) as scratch:
        raw = read_raw(cfg, scratch)
        where = lambda: raw.files[0]["path"] if raw.files else p.source  # noqa: E731
        if in_memory:
            c = _clean_in_memory(raw, p.k_core, p.num_shards)
        else:
            spill = buckets.Buckets(scratch, p.memory_budget_mb)
            for batch in raw.batches:
                spill.add(batch)
            if spill.rows:
                spill.partition()
            c = buckets.clean_buckets(spill, p.k_core, p.num_shards)
        t_read = time.perf_counter()  # reading and cleaning interleave when streaming: "read" is both
        if c.raw_rows == 0:
            raise InputError(where(), "no interactions in the input")
        if c.users == 0:
            raise InputError(where(), f"the {p.k_core}-core filter removed every interaction ({c.before[0]} "
                                      f"interactions of {c.before[1]} users and {c.before[2]} items); "
                                      f"lower prepare.k_core")
        item_ids = c.item_ids
        items, no_title, no_record = _items(item_ids, _records(raw, item_ids["item"]), p.text_template,
                                            p.max_text_chars)

        warnings = list(raw.warnings)
        if no_title:
            warnings.append(f"{no_title} of {items.height} items have no title; they use the fallback "
                            f"'{text.FALLBACK_TITLE}' ({no_record} have no item record at all)")
        for w in warnings:
            log.warning(w)
        counts, stats = _stats(c.lengths, c.users, items.height)
        before = c.before
        stats.update({
            "has_timestamps": c.has_time,
            "duplicates_dropped": c.duplicates,
            "k_core": {"k": p.k_core, "rounds": c.rounds, "interactions_removed": before[0] - counts["interactions"],
                       "users_removed": before[1] - counts["users"], "items_removed": before[2] - counts["items"]},
            "items_without_title": no_title,
            "items_without_record": no_record,
            "raw": {"interactions": c.raw_rows, **raw.info},
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
            "config": _manifest_config(cfg),
        }
        t_clean = time.perf_counter()
        dataset.write_shards(out, items, c.shard, manifest, p.num_shards, cfg.storage, overwrite=p.overwrite)
    t_end = time.perf_counter()
    return {
        "dataset": out, "source": p.source, **counts, **stats, "warnings": warnings,
        "seconds": {"read": t_read - t0, "clean": t_clean - t_read, "write": t_end - t_clean, "total": t_end - t0},
    }


def _records(raw: RawData, kept: pl.Series) -> pl.DataFrame:
    """The item records: the reader's table, or those it loads for the ``kept`` item keys."""
    if raw.items is not None:
        return raw.items
    if raw.load_items is not None:
        return raw.load_items(kept)
    return empty_items()


class _InMemory(buckets.Cleaned):
    seq: pl.DataFrame | None = None

    def shard(self, s: int) -> pl.DataFrame:
        return self.seq.filter(pl.col("_shard") == s).drop("_shard")


def _clean_in_memory(raw: RawData, k: int, num_shards: int) -> buckets.Cleaned:
    """The reference: every step of ``clean.py`` over the whole input as one frame."""
    frames = list(raw.batches)
    interactions = (pl.concat(frames) if frames else
                    pl.DataFrame(schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64}))
    c = _InMemory(raw_rows=interactions.height)
    if interactions.height == 0:
        return c
    c.has_time = interactions["timestamp"].null_count() < interactions.height
    df = clean.with_order(interactions)
    df, c.duplicates = clean.deduplicate(df)
    c.before = df.select(pl.len(), pl.col("user").n_unique(), pl.col("item").n_unique()).row(0)
    df, c.rounds = clean.k_core(df, k)
    if df.height == 0:
        return c
    users = clean.id_map(df["user"], "user")
    c.users, c.item_ids = users.height, clean.id_map(df["item"], "item")
    seq = clean.sequences(df, users, c.item_ids, c.has_time)
    c.lengths = seq["items"].list.len()
    c.seq = seq.with_columns(dataset.shard_of(pl.col("user_id"), num_shards).alias("_shard")).sort("user_id")
    return c


def _stats(lengths: pl.Series, users: int, num_items: int) -> tuple[dict[str, int], dict[str, Any]]:
    counts = {"users": users, "items": num_items, "interactions": int(lengths.sum())}
    q = lambda f: float(lengths.quantile(f, "nearest"))  # noqa: E731
    return counts, {
        "density": counts["interactions"] / (counts["users"] * counts["items"]),
        "length": {"min": int(lengths.min()), "p50": q(0.5), "p90": q(0.9), "max": int(lengths.max()),
                   "mean": float(lengths.mean())},
    }


# Settings of how prepare runs, not of what it writes: left out of the manifest, so the dataset's bytes (and its
# sha256 tag) are the same whatever the memory budget or spill folder.
RUN_ONLY = ("memory_budget_mb", "spill_dir")


def _manifest_config(cfg: PrepareSettings) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    for key in RUN_ONLY:
        out["prepare"].pop(key, None)
    return out


def _check_destination(path: str, storage_cfg: Any, overwrite: bool) -> None:
    taken = storage.exists(path, storage_cfg) and bool(storage.list_files(path, storage_cfg))
    if taken and not overwrite:
        raise storage.StorageError(f"{path}: already exists (pass prepare.overwrite=true to replace it)")


ITEM_ROWS = 100_000  # items whose text is rendered at once (the regex steps copy the text column)


def _items(item_ids: pl.DataFrame, records: pl.DataFrame, template: str, max_chars: int
           ) -> tuple[pl.DataFrame, int, int]:
    """The items table for the kept items: the first record per item key, text from the template."""
    records = records.drop([c for c in ("item_id",) if c in records.columns])
    records = records.unique(subset="item", keep="first", maintain_order=True).with_columns(
        pl.lit(True).alias("_has_record"))
    joined = item_ids.join(records, on="item", how="left").sort("item_id")
    del records
    no_record = int(joined["_has_record"].null_count())
    joined = joined.drop("_has_record")
    parts, no_title = [], 0
    for start in range(0, max(joined.height, 1), ITEM_ROWS):
        items, missing = text.build_text(joined.slice(start, ITEM_ROWS), template, max_chars)
        for col in ("brand", "categories", "description"):
            if col not in items.columns:
                items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias(col))
        items = items.with_columns(pl.col(c).fill_null("") for c in ("brand", "categories", "description"))
        parts.append(items.select(ITEM_COLUMNS))
        no_title += missing
    return pl.concat(parts), no_title, no_record


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
