"""Training and evaluation examples from the sharded Parquet sequences (Polars), and the per-rank batch order.

Examples (the leave-one-out rule of :func:`genrec_dist.data.dataset.split_user`, TIGER §4.1 / UNGER §4.1.1):

- train: every prefix of a user's training sequence ``items[:-2]`` predicts its next item (``train.examples:
  windows`` keeps only the non-overlapping windows, for models that train on every position);
- valid: ``(items[:-2][-H:], items[-2])``; test: ``(items[:-1][-H:], items[-1])``;

every history cut to the last ``H = manifest.split.max_history`` items (20 in the papers) and LEFT-padded with 0, so
the most recent item is always in the last column. Users with fewer than 3 items have no examples.

Which rows a rank reads (:func:`rank_sequences`):

- ``shards``: rank r reads only the shard files ``shards_for(files, r, world)``. With more ranks than shard files it
  falls back to reading every shard and keeping the users ``row % world == r`` (every user on exactly one rank).
  Ranks then hold different numbers of examples; the trainer takes the minimum over ranks as the epoch length
  (:func:`steps_per_epoch`) and each rank drops its remainder, a different part every epoch because the shuffle
  differs, so every rank makes the same number of steps and no collective waits for a rank that ran out of data.
- ``global``: every rank reads every shard; one permutation per epoch orders all examples and rank r takes its
  slice of each global batch (:class:`BatchPlan`), so a global batch holds the same examples at any world size.

Resume state is the plain value :class:`Cursor` ``(epoch, step)``; a batch order is a pure function of
``(seed, epoch, rank)``, so a resumed run sees exactly the batches the killed one would have seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import polars as pl

from genrec_dist.data.dataset import PAD, Dataset, shards_for


# --------------------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Examples:
    """``history`` (N, H) int64 item ids, left-padded with 0; ``target`` (N,) int64."""

    history: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> "Examples":
        return Examples(self.history[index], self.target[index])


def _left_pad(lists: pl.Series, width: int) -> np.ndarray:
    """A list column (each list at most ``width`` long) as a (N, width) int64 matrix, left-padded with PAD."""
    lengths = lists.list.len().to_numpy().astype(np.int64)  # (N,)
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    out = np.full((len(lengths), width), PAD, dtype=np.int64)
    if flat.size:
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = width - np.repeat(lengths, lengths) + (np.arange(flat.size) - starts)
        out[rows, cols] = flat
    return out


def train_examples(sequences: pl.DataFrame, max_history: int, mode: str = "prefixes") -> Examples:
    """Training examples from each training sequence ``items[:-2]``, in (user_id, position) order.

    ``prefixes``: every prefix -> its next item (one example per transition). ``windows``: only the prefixes ending
    at positions ``n-1, n-1-H, n-1-2H, ...``, for models whose loss reads every position of the history (CAR with
    ``all_positions``): position t of a window predicts item t+1, so these windows hold every transition exactly
    once, where ``prefixes`` would show a transition up to H times (and cost about mean-length times more steps).
    """
    if mode not in ("prefixes", "windows"):
        raise ValueError(f"train.examples must be 'prefixes' or 'windows', got {mode!r}")
    seq = (sequences.filter(pl.col("items").list.len() >= 3)
           .sort("user_id")
           .select(pl.col("items").list.head(pl.col("items").list.len() - 2).alias("seq")))
    n = pl.col("seq").list.len()
    ends = pl.int_ranges(1, n) if mode == "prefixes" else pl.int_ranges(n - 1, 0, -max_history).list.reverse()
    ex = (seq.filter(n >= 2)
          .with_columns(ends.alias("pos"))
          .explode("pos"))
    start = pl.max_horizontal(pl.col("pos") - max_history, pl.lit(0))
    ex = ex.select(
        pl.col("seq").list.get(pl.col("pos")).alias("target"),
        pl.col("seq").list.slice(start, pl.col("pos") - start).alias("hist"),
    )
    return Examples(_left_pad(ex["hist"], max_history), ex["target"].to_numpy().astype(np.int64))


def eval_examples(sequences: pl.DataFrame, max_history: int, split: str) -> Examples:
    """One example per user: ``valid`` = (items[:-2][-H:], items[-2]), ``test`` = (items[:-1][-H:], items[-1])."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    drop = 2 if split == "valid" else 1
    seq = sequences.filter(pl.col("items").list.len() >= 3).sort("user_id")
    head = pl.col("items").list.head(pl.col("items").list.len() - drop)
    ex = seq.select(
        pl.col("items").list.get(-drop).alias("target"),
        head.list.tail(max_history).alias("hist"),
    )
    return Examples(_left_pad(ex["hist"], max_history), ex["target"].to_numpy().astype(np.int64))


def rank_sequences(dataset: Dataset, rank: int, world_size: int, mode: str) -> pl.DataFrame:
    """The sequences rank ``rank`` uses (see the module docstring for ``shards`` / ``global``)."""
    files = dataset.shard_files
    if mode == "global" or world_size == 1:
        return dataset.sequences(files)
    if mode != "shards":
        raise ValueError(f"data_split must be 'shards' or 'global', got {mode!r}")
    if len(files) >= world_size:
        return dataset.sequences(shards_for(files, rank, world_size))
    # More ranks than shard files: split users by row instead (every rank reads every file once).
    seq = dataset.sequences(files)
    return seq.filter(pl.int_range(pl.len()) % world_size == rank)


def eval_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` evaluation users (sizes differ by at most one)."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


# --------------------------------------------------------------------------------------------------------------
# batch order and resume cursor
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cursor:
    """Where training stands: ``step`` optimizer steps done within ``epoch``. A plain value (checkpointed as a dict)."""

    epoch: int = 0
    step: int = 0

    def advance(self, steps_per_epoch: int) -> "Cursor":
        if self.step + 1 >= steps_per_epoch:
            return Cursor(self.epoch + 1, 0)
        return Cursor(self.epoch, self.step + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["epoch"]), int(d["step"]))


def steps_per_epoch(examples_per_rank: Sequence[int], rows_per_step: int) -> int:
    """Optimizer steps every rank can make in one epoch: the smallest rank's examples // rows it uses per step.

    The remainder is dropped (never padded: a padded row would be a duplicated example in the loss)."""
    steps = min(examples_per_rank) // rows_per_step
    if steps < 1:
        raise ValueError(
            f"an epoch has no full step: the smallest rank has {min(examples_per_rank)} training examples and one "
            f"step needs {rows_per_step} per rank (lower train.batch_size or use fewer ranks)"
        )
    return steps


@dataclass(frozen=True)
class BatchPlan:
    """Which example rows rank ``rank`` uses for micro-batch ``micro`` of step ``step`` in ``epoch``.

    ``local`` (mode ``shards``): the rank's own examples, shuffled by ``(seed, epoch, rank)``.
    ``global`` (mode ``global``): all examples, shuffled by ``(seed, epoch)``; a step's global batch is
    ``world * grad_accum * micro_batch`` consecutive rows of that order and micro-batch ``m`` of rank ``r`` is
    block ``m * world + r`` of it.
    """

    num_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    mode: str = "shards"

    def order(self, epoch: int) -> np.ndarray:
        key = [self.seed, epoch] + ([self.rank] if self.mode == "shards" else [])
        return np.random.default_rng(key).permutation(self.num_examples)

    def rows(self, order: np.ndarray, step: int, micro: int) -> np.ndarray:
        mb, ga = self.micro_batch, self.grad_accum
        if self.mode == "global":
            start = step * self.world_size * ga * mb + (micro * self.world_size + self.rank) * mb
        else:
            start = (step * ga + micro) * mb
        return order[start:start + mb]

    def steps_in_epoch(self) -> int:
        per_rank = self.num_examples // self.world_size if self.mode == "global" else self.num_examples
        return per_rank // (self.micro_batch * self.grad_accum)


def iterate(examples: Examples, plan: BatchPlan, cursor: Cursor, steps_per_epoch: int
            ) -> Iterator[tuple[Cursor, list[Examples]]]:
    """Endless ``(cursor before the step, [grad_accum micro-batches])`` from ``cursor`` on."""
    order_epoch, order = -1, None
    while True:
        if cursor.epoch != order_epoch:
            order_epoch, order = cursor.epoch, plan.order(cursor.epoch)
        micro = [examples.take(plan.rows(order, cursor.step, m)) for m in range(plan.grad_accum)]
        yield cursor, micro
        cursor = cursor.advance(steps_per_epoch)


def eval_batches(examples: Examples, batch_size: int, num_batches: int | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(history, target)`` batches of at most ``batch_size`` rows (``num_batches`` given: exactly that many)."""
    n = len(examples)
    if num_batches is None:
        num_batches = max(1, -(-n // batch_size))
    parts = np.array_split(np.arange(n), num_batches)
    return [(examples.history[p], examples.target[p]) for p in parts if len(p)]
