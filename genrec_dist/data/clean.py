"""Cleaning steps of prepare, each a pure function over Polars frames (unit-tested on hand cases).

Rules (also written into every manifest):

* **De-duplication**: rows with the same ``(user, item, timestamp)`` are one event; the first in source order is
  kept. Rows without a timestamp are never duplicates (in a source without timestamps, such as the LC-Rec
  layout, a repeated item is a repeat purchase at another position).
* **Iterative k-core**: drop users with fewer than ``max(k, 3)`` interactions and items with fewer than ``k``,
  repeated until nothing changes (the unique maximal such subset; 3 = the least leave-one-out needs).
* **Order**: each user's events by ``timestamp``, ties (and sources without timestamps) by source order.
* **Ids**: contiguous from 1 (0 = padding), in the order of the source keys: numeric when every key is an
  integer (so LC-Rec item ``"17"`` becomes item_id 18), else lexicographic.
"""

from __future__ import annotations

import numpy as np
import polars as pl

DEDUP_RULE = "first of repeated (user, item, timestamp) in source order; rows without timestamp are kept"
ORDER_RULE = "timestamp, then source order"
ID_RULE = "1..N by source key (numeric when every key is an integer, else lexicographic); 0 = padding"
MIN_USER_LEN = 3  # leave-one-out: >= 1 training item, a validation and a test target


def with_order(interactions: pl.DataFrame) -> pl.DataFrame:
    """Number the rows in source order (``_order``), the tie-breaker of every later step."""
    return interactions.with_row_index("_order")


def deduplicate(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Drop repeated ``(user, item, timestamp)`` rows, keeping the first (see :data:`DEDUP_RULE`)."""
    dup = pl.struct("user", "item", "timestamp").is_first_distinct().not_() & pl.col("timestamp").is_not_null()
    out = df.filter(~dup)
    return out, df.height - out.height


def k_core(df: pl.DataFrame, k: int) -> tuple[pl.DataFrame, int]:
    """Iterative k-core over users (>= ``max(k, 3)``) and items (>= ``k``); returns the frame and the rounds.

    The loop runs on integer codes with ``numpy.bincount`` (one pass per round, ~3x faster than Polars window
    counts at 2M rows); the frame is filtered once at the end.
    """
    k_user, k_item = max(k, MIN_USER_LEN), max(k, 1)
    u = df["user"].cast(pl.Categorical).to_physical().to_numpy()  # (N,) user codes
    i = df["item"].cast(pl.Categorical).to_physical().to_numpy()  # (N,) item codes
    keep = np.ones(df.height, dtype=bool)
    kept, rounds = df.height, 0
    while kept:
        rounds += 1
        per_user = np.bincount(u[keep], minlength=int(u.max()) + 1)
        per_item = np.bincount(i[keep], minlength=int(i.max()) + 1)
        keep &= (per_user[u] >= k_user) & (per_item[i] >= k_item)
        now = int(keep.sum())
        if now == kept:
            break
        kept = now
    return df.filter(pl.Series(keep)), rounds


def key_order(keys: pl.Series) -> pl.Series:
    """Distinct keys in id order (see :data:`ID_RULE`)."""
    uniq = keys.unique()
    as_int = uniq.cast(pl.Int64, strict=False)
    frame = pl.DataFrame({"key": uniq, "num": as_int})
    if as_int.null_count() == 0:
        frame = frame.sort(["num", "key"])
    else:
        frame = frame.sort("key")
    return frame["key"]


def id_map(keys: pl.Series, name: str) -> pl.DataFrame:
    """``{name: key, name_id: 1..N}`` for the distinct keys."""
    ordered = key_order(keys)
    return pl.DataFrame({name: ordered, f"{name}_id": pl.int_range(1, ordered.len() + 1, eager=True).cast(pl.Int32)})


def sequences(df: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, has_time: bool) -> pl.DataFrame:
    """One row per user: ``user_id, user, items (list<int32>), timestamps (list<int64> or null)``."""
    seq = (
        df.join(users, on="user").join(items.select("item", "item_id"), on="item")
        .sort(["user_id", "timestamp", "_order"], nulls_last=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("user").first(), pl.col("item_id").alias("items"), pl.col("timestamp").alias("timestamps"))
    )
    if not has_time:
        seq = seq.with_columns(pl.lit(None, dtype=pl.List(pl.Int64)).alias("timestamps"))
    return seq.select(
        pl.col("user_id").cast(pl.Int32), pl.col("user").cast(pl.Utf8),
        pl.col("items").cast(pl.List(pl.Int32)), pl.col("timestamps").cast(pl.List(pl.Int64)),
    )
