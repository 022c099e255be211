"""Prepare's cleaning out of core: the interactions are spilled to local Parquet files in hash buckets of users and
cleaned one bucket at a time, so peak memory follows ``prepare.memory_budget_mb`` instead of the input's size.

Every user's events fall in one bucket, so de-duplication, per-user counts, ordering and sequence building are
bucket-local; the one global quantity of the iterative k-core, the item counts, is a small table summed over the
buckets (one pass per round, the same Jacobi rounds as :func:`clean.k_core`). The results are those of the
in-memory functions in ``clean.py`` (rows keep their global source order ``_order``), which the tests check
byte for byte. What stays whole: the distinct users and items with their ids (they scale with the catalog, not
with the interactions) and one output shard at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from genrec_dist.data import clean
from genrec_dist.data.dataset import shard_of

# Bytes one interaction row takes in memory while its bucket is cleaned (strings, row order, join and sort
# buffers); measured at 100x Beauty. A bucket holds about a quarter of the budget's worth of rows.
ROW_BYTES = 160
MIN_BUCKET_ROWS = 50_000


def bucket_rows(budget_mb: int) -> int:
    """Rows per read batch and per bucket for a budget of ``budget_mb`` MiB."""
    return max(MIN_BUCKET_ROWS, (budget_mb << 20) // (4 * ROW_BYTES))


@dataclass
class Cleaned:
    """What the bucketed cleaning hands back to prepare (the same facts the in-memory path computes)."""

    raw_rows: int = 0
    has_time: bool = False
    duplicates: int = 0
    before: tuple[int, int, int] = (0, 0, 0)  # interactions, users, items after de-duplication
    rounds: int = 0
    users: int = 0
    item_ids: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"item": pl.Utf8,
                                                                                 "item_id": pl.Int32}))
    lengths: pl.Series = field(default_factory=lambda: pl.Series("items", [], dtype=pl.UInt32))
    shard_parts: list[list[str]] = field(default_factory=list)  # per output shard: its part files

    def shard(self, s: int) -> pl.DataFrame:
        """Output shard ``s``: its users' sequences sorted by ``user_id`` (read whole: one shard in memory)."""
        return pl.concat([pl.read_ipc(f) for f in self.shard_parts[s]]).sort("user_id")


class Buckets:
    """Interactions spilled under ``root``: :meth:`add` read batches, :meth:`partition`, then clean."""

    def __init__(self, root: str, budget_mb: int):
        self.root, self.rows_per_bucket = root, bucket_rows(budget_mb)
        self.read_parts: list[str] = []
        self.rows, self.has_time = 0, False
        self.num_buckets = 0

    def _path(self, *parts: str) -> str:
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def add(self, batch: pl.DataFrame) -> None:
        """Spill one read batch, numbered in global source order."""
        if batch.height == 0:
            return
        batch = batch.select("user", "item", "timestamp").with_columns(
            pl.int_range(self.rows, self.rows + batch.height, dtype=pl.UInt64).alias("_order"))
        self.has_time = self.has_time or batch["timestamp"].null_count() < batch.height
        path = self._path("read", f"part-{len(self.read_parts):06d}.arrow")
        batch.write_ipc(path)
        self.read_parts.append(path)
        self.rows += batch.height

    def partition(self) -> None:
        """Split the read parts into hash buckets of users (each read part streamed once, then removed)."""
        self.num_buckets = max(1, math.ceil(self.rows / self.rows_per_bucket))
        for k, part in enumerate(self.read_parts):
            df = pl.scan_ipc(part).with_columns(
                (pl.col("user").hash(seed=0) % self.num_buckets).alias("_bucket")).collect(engine="streaming")
            for (b,), piece in df.partition_by("_bucket", as_dict=True, include_key=False).items():
                piece.write_ipc(self._path(f"b{b:05d}", f"in-{k:06d}.arrow"))
            del df
            os.remove(part)

    def bucket(self, b: int) -> pl.DataFrame:
        return pl.read_ipc(os.path.join(self.root, f"b{b:05d}", "rows.arrow"))

    def _write(self, b: int, df: pl.DataFrame) -> None:
        # A new file renamed over the old one: a frame read from the old file may still map it.
        path = self._path(f"b{b:05d}", "rows.arrow")
        df.write_ipc(path + ".tmp")
        os.replace(path + ".tmp", path)

    def _codes_path(self, b: int) -> str:
        return os.path.join(self.root, f"b{b:05d}", "codes.npz")


def clean_buckets(buckets: Buckets, k: int, num_shards: int) -> Cleaned:
    """De-duplicate, k-core, assign ids and build the output shards' sequences, one bucket at a time."""
    out = Cleaned(raw_rows=buckets.rows, has_time=buckets.has_time)
    if buckets.rows == 0:
        return out
    items, users_before, rows_before = pl.Series("item", [], dtype=pl.Utf8), 0, 0
    for b in range(buckets.num_buckets):
        folder = os.path.join(buckets.root, f"b{b:05d}")
        parts = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if not parts:
            df = pl.DataFrame(schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64, "_order": pl.UInt64})
        else:
            df = pl.scan_ipc([os.path.join(folder, f) for f in parts]).sort("_order").collect(
                engine="streaming")
            for f in parts:
                os.remove(os.path.join(folder, f))
        df, dropped = clean.deduplicate(df)
        out.duplicates += dropped
        users_before += df["user"].n_unique()
        rows_before += df.height
        # Distinct items so far, merged bucket by bucket (memory: the catalog, not buckets x catalog).
        items = pl.concat([items, df["item"].unique()]).unique()
        buckets._write(b, df)
    out.before = (rows_before, users_before, items.len())
    out.rounds, kept_items = _k_core(buckets, k, rows_before, items)
    if not kept_items.len():  # the k-core removed everything
        return out
    user_keys = [buckets.bucket(b)["user"].unique() for b in range(buckets.num_buckets)]
    users = clean.id_map(pl.concat(user_keys), "user")
    del user_keys
    out.users, out.item_ids = users.height, clean.id_map(kept_items, "item")
    lengths = []
    out.shard_parts = [[] for _ in range(num_shards)]
    for b in range(buckets.num_buckets):
        df = buckets.bucket(b)
        if df.height == 0:
            continue
        mine = users.join(df.select(pl.col("user").unique()), on="user", how="semi")
        seq = clean.sequences(df, mine, out.item_ids, buckets.has_time)
        lengths.append(seq["items"].list.len())
        seq = seq.with_columns(shard_of(pl.col("user_id"), num_shards).alias("_shard"))
        for (s,), piece in seq.partition_by("_shard", as_dict=True, include_key=False).items():
            path = buckets._path(f"shard-{s:05d}", f"part-{b:05d}.arrow")
            piece.write_ipc(path)
            out.shard_parts[s].append(path)
    if lengths:
        out.lengths = pl.concat(lengths)
    return out


def _k_core(buckets: Buckets, k: int, kept: int, items: pl.Series) -> tuple[int, pl.Series]:
    """The rounds of :func:`clean.k_core` over the buckets, on integer codes with ``numpy.bincount``: each round
    counts users (bucket-local) and items (summed over buckets) on the current rows and keeps the rows that pass
    both; it stops when a round removes nothing. Rows are filtered once at the end. Returns the rounds and the
    items that are left."""
    k_user, k_item = max(k, clean.MIN_USER_LEN), max(k, 1)
    code = pl.DataFrame({"item": items, "_code": pl.int_range(0, items.len(), eager=True).cast(pl.Int32)})
    per_item = np.zeros(items.len(), dtype=np.int64)
    for b in range(buckets.num_buckets):  # codes of every row: bucket-local users, global items
        df = buckets.bucket(b)
        u = df.select(pl.col("user").rank("dense") - 1)["user"].to_numpy().astype(np.int32)
        i = df.select("item").join(code, on="item", how="left", maintain_order="left")["_code"].to_numpy()
        np.savez(buckets._codes_path(b), u=u, i=i, keep=np.ones(len(u), dtype=bool))
        per_item += np.bincount(i, minlength=items.len())
    rounds = 0
    while kept:
        rounds += 1
        now, next_items = 0, np.zeros_like(per_item)
        for b in range(buckets.num_buckets):
            with np.load(buckets._codes_path(b)) as z:
                u, i, keep = z["u"], z["i"], z["keep"]
            if not len(u):
                continue
            per_user = np.bincount(u[keep], minlength=int(u.max()) + 1)
            new = keep & (per_user[u] >= k_user) & (per_item[i] >= k_item)
            if (new != keep).any():
                np.savez(buckets._codes_path(b), u=u, i=i, keep=new)
            now += int(new.sum())
            next_items += np.bincount(i[new], minlength=len(per_item))
        if now == kept:
            break
        kept, per_item = now, next_items
    for b in range(buckets.num_buckets):
        with np.load(buckets._codes_path(b)) as z:
            keep = z["keep"]
        os.remove(buckets._codes_path(b))
        if not keep.all():
            buckets._write(b, buckets.bucket(b).filter(pl.Series(keep)))
    return rounds, items.filter(pl.Series(per_item > 0)) if kept else items.clear()
