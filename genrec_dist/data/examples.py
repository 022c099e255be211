"""Training and evaluation examples from the sharded Parquet sequences, streamed chunk by chunk, and the per-rank
batch order.

Examples (the leave-one-out rule of :func:`genrec_dist.data.dataset.split_user`, TIGER §4.1 / UNGER §4.1.1):

- train: every prefix of a user's training sequence ``items[:-2]`` predicts its next item (``train.examples:
  windows`` keeps only the non-overlapping windows, for models that train on every position);
- valid: ``(items[:-2][-H:], items[-2])``; test: ``(items[:-1][-H:], items[-1])``;

every history cut to the last ``H = manifest.split.max_history`` items (20 in the papers) and LEFT-padded with 0, so
the most recent item is always in the last column. Users with fewer than 3 items have no examples.

**Streaming.** A rank never holds all of its (N, H) examples. Its sequences are cut into *chunks* (:class:`Chunk`:
at most ``chunk_rows`` users of one Parquet row group, from the files' metadata alone), and
:class:`ExampleSource` reads one chunk at a time. A first pass reads only the list lengths to count each chunk's
examples, so epoch lengths and resume positions are known without building any example.

Which rows a rank reads (:func:`rank_chunks`):

- ``shards``: rank r reads only the shard files ``shards_for(files, r, world)``. With more ranks than shard files it
  reads every shard and keeps the users ``user_id % world == r`` (every user on exactly one rank). Ranks then hold
  different numbers of examples; the trainer takes the minimum over ranks as the epoch length
  (:func:`steps_per_epoch`) and each rank drops its remainder, a different part every epoch because the shuffle
  differs, so every rank makes the same number of steps and no collective waits for a rank that ran out of data.
- ``global``: every rank reads every shard; one order per epoch arranges all examples and rank r takes its slice of
  each global batch (:class:`BatchPlan`), so a global batch holds the same examples at any world size.

**Order** (:class:`BatchPlan`): a two-level shuffle, a pure function of ``(seed, epoch, rank)`` (``(seed, epoch)``
in ``global`` mode) and of the chunks' example counts. The chunks are permuted, consecutive chunks of that order are
grouped into *windows* of at most ``shuffle_buffer`` examples (a chunk larger than that is a window alone), and the
examples of each window are permuted; the epoch is the windows one after the other. Memory is one window, whatever
the data. Resume state is the plain value :class:`Cursor` ``(epoch, step)``: the step's first row in the epoch is
known, the windows before it are skipped without being read, so a resumed run sees exactly the batches the killed
one would have seen.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from genrec_dist import storage
from genrec_dist.data.dataset import PAD, Dataset, shards_for


# --------------------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Examples:
    """``history`` (N, H) int64 item ids, left-padded with 0; ``target`` (N,) int64; for evaluation with
    ``evaluate.filter_seen``, ``seen`` (N, S): every item of the user before the target (not cut to H), left-padded."""

    history: np.ndarray
    target: np.ndarray
    seen: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> "Examples":
        return Examples(self.history[index], self.target[index], None if self.seen is None else self.seen[index])

    @staticmethod
    def concat(parts: Sequence["Examples"], width: int) -> "Examples":
        if not parts:
            return Examples(np.zeros((0, width), dtype=np.int64), np.zeros(0, dtype=np.int64))
        if len(parts) == 1:
            return parts[0]
        seen = None
        if parts[0].seen is not None:  # each part is padded to its own longest history
            s = max(p.seen.shape[1] for p in parts)
            seen = np.concatenate([np.pad(p.seen, ((0, 0), (s - p.seen.shape[1], 0))) for p in parts])
        return Examples(np.concatenate([p.history for p in parts]), np.concatenate([p.target for p in parts]), seen)

    def batch(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """Rows lo..hi-1 as ``(history, target)``, or ``(history, target, seen)`` when seen items are kept."""
        out = (self.history[lo:hi], self.target[lo:hi])
        return out if self.seen is None else (*out, self.seen[lo:hi])


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


def eval_examples(sequences: pl.DataFrame, max_history: int, split: str, seen: bool = False) -> Examples:
    """One example per user: ``valid`` = (items[:-2][-H:], items[-2]), ``test`` = (items[:-1][-H:], items[-1]);
    ``seen``: also every item before the target (``items[:-2]`` / ``items[:-1]``, whole), for a seen-item filter."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    drop = 2 if split == "valid" else 1
    seq = sequences.filter(pl.col("items").list.len() >= 3).sort("user_id")
    head = pl.col("items").list.head(pl.col("items").list.len() - drop)
    ex = seq.select(
        pl.col("items").list.get(-drop).alias("target"),
        head.list.tail(max_history).alias("hist"),
        *([head.alias("seen")] if seen else []),
    )
    width = int(ex["seen"].list.len().max() or 1) if seen else 0
    return Examples(_left_pad(ex["hist"], max_history), ex["target"].to_numpy().astype(np.int64),
                    _left_pad(ex["seen"], width) if seen else None)


def rank_sequences(dataset: Dataset, rank: int, world_size: int, mode: str) -> pl.DataFrame:
    """The sequences rank ``rank`` uses, all in memory (see the module docstring for ``shards`` / ``global``;
    :func:`rank_chunks` is the streaming form of the same choice)."""
    files = dataset.shard_files
    if mode == "global" or world_size == 1:
        return dataset.sequences(files)
    if mode != "shards":
        raise ValueError(f"data_split must be 'shards' or 'global', got {mode!r}")
    if len(files) >= world_size:
        return dataset.sequences(shards_for(files, rank, world_size))
    # More ranks than shard files: split users by id instead (every rank reads every file once).
    return dataset.sequences(files).filter(pl.col("user_id") % world_size == rank)


# --------------------------------------------------------------------------------------------------------------
# chunks: the unit a rank reads
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Rows ``start .. stop-1`` of row group ``row_group`` of Parquet file ``file``, keeping only the users
    ``user_id % modulo == residue`` (``modulo`` 1: all of them)."""

    file: str
    row_group: int
    start: int
    stop: int
    modulo: int = 1
    residue: int = 0


def plan_chunks(files: Sequence[str], chunk_rows: int, storage_cfg: Any = None, modulo: int = 1,
                residue: int = 0) -> list[Chunk]:
    """``files`` cut into chunks of at most ``chunk_rows`` rows, in file, row-group, row order; reads only the
    Parquet footers."""
    if chunk_rows < 1:
        raise ValueError(f"train.chunk_rows must be >= 1, got {chunk_rows}")
    out = []
    for f in files:
        fs, path = storage.filesystem(f, storage_cfg)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            out += [Chunk(f, g, lo, min(lo + chunk_rows, rows), modulo, residue) for lo in range(0, rows, chunk_rows)]
    return out


def read_chunk(chunk: Chunk, storage_cfg: Any = None) -> pl.DataFrame:
    """The chunk's ``user_id`` and ``items`` columns (one row group read, then sliced)."""
    fs, path = storage.filesystem(chunk.file, storage_cfg)
    with fs.open(path, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_group(chunk.row_group, columns=["user_id", "items"])
    frame = pl.from_arrow(table.slice(chunk.start, chunk.stop - chunk.start))
    if chunk.modulo > 1:
        frame = frame.filter(pl.col("user_id") % chunk.modulo == chunk.residue)
    return frame


def rank_chunks(dataset: Dataset, rank: int, world_size: int, mode: str, chunk_rows: int) -> list[Chunk]:
    """The chunks rank ``rank`` reads: the streaming form of :func:`rank_sequences` (the same users)."""
    files = sorted(dataset.shard_files)
    if mode not in ("shards", "global"):
        raise ValueError(f"data_split must be 'shards' or 'global', got {mode!r}")
    if mode == "global" or world_size == 1:
        return plan_chunks(files, chunk_rows, dataset.storage_cfg)
    if len(files) >= world_size:
        return plan_chunks(shards_for(files, rank, world_size), chunk_rows, dataset.storage_cfg)
    return plan_chunks(files, chunk_rows, dataset.storage_cfg, world_size, rank)


def count_train_examples(lengths: np.ndarray, max_history: int, mode: str) -> int:
    """How many examples :func:`train_examples` makes from sequences of these lengths, without making them."""
    n = np.asarray(lengths, dtype=np.int64) - 2  # training sequence items[:-2]
    n = n[n >= 2]
    if mode == "prefixes":
        return int((n - 1).sum())
    return int((-(-(n - 1) // max_history)).sum())  # windows ending at n-1, n-1-H, ... > 0


class ExampleSource:
    """A rank's examples of one kind (``train`` with ``mode`` prefixes/windows, or the ``valid``/``test`` split),
    chunk by chunk; ``sizes[i]`` is chunk i's example count (counted from the list lengths alone, on first use: a
    training plan needs them, streaming every chunk once for evaluation does not)."""

    def __init__(self, chunks: Sequence[Chunk], max_history: int, kind: str, mode: str = "prefixes",
                 storage_cfg: Any = None, seen: bool = False):
        if kind not in ("train", "valid", "test"):
            raise ValueError(f"kind must be train, valid or test, got {kind!r}")
        if kind == "train" and mode not in ("prefixes", "windows"):
            raise ValueError(f"train.examples must be 'prefixes' or 'windows', got {mode!r}")
        self.chunks, self.max_history, self.kind, self.mode = list(chunks), max_history, kind, mode
        self.storage_cfg = storage_cfg
        self.seen = seen  # valid/test: keep each user's seen items (Examples.seen) for evaluate.filter_seen

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self._count(c) for c in self.chunks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def _count(self, chunk: Chunk) -> int:
        lengths = read_chunk(chunk, self.storage_cfg)["items"].list.len().to_numpy()
        if self.kind != "train":
            return int((lengths >= 3).sum())
        return count_train_examples(lengths, self.max_history, self.mode)

    def __len__(self) -> int:
        return sum(self.sizes)

    def load_many(self, indices: Iterable[int]) -> Examples:
        """The examples of chunks ``indices``, one chunk after the other (each in user order)."""
        parts = []
        for i in indices:
            frame = read_chunk(self.chunks[int(i)], self.storage_cfg)
            parts.append(train_examples(frame, self.max_history, self.mode) if self.kind == "train"
                         else eval_examples(frame, self.max_history, self.kind, self.seen))
        return Examples.concat(parts, self.max_history)


class InMemorySource:
    """:class:`ExampleSource`'s interface over examples already in memory, cut into chunks of ``sizes`` rows (small
    data, tests)."""

    def __init__(self, examples: Examples, sizes: Sequence[int]):
        if sum(sizes) != len(examples):
            raise ValueError(f"chunk sizes sum to {sum(sizes)}, there are {len(examples)} examples")
        self.examples, self.sizes = examples, tuple(int(s) for s in sizes)
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return len(self.examples)

    def load_many(self, indices: Iterable[int]) -> Examples:
        rows = [np.arange(self._starts[i], self._starts[i + 1]) for i in indices]
        return self.examples.take(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))


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
    """Which examples rank ``rank`` uses for micro-batch ``micro`` of step ``step`` in ``epoch``.

    The epoch's example stream is the two-level shuffle of the module docstring over chunks of ``chunk_sizes``
    examples, keyed by ``(seed, epoch, rank)`` (mode ``shards``: the rank's own examples) or ``(seed, epoch)`` (mode
    ``global``: every example, the same stream on every rank). A step uses the next ``rows_per_step`` rows of the
    stream: ``grad_accum * micro_batch`` in ``shards`` mode, of which micro-batch ``m`` is block ``m``; ``world *
    grad_accum * micro_batch`` in ``global`` mode, of which micro-batch ``m`` of rank ``r`` is block ``m * world + r``.
    """

    chunk_sizes: tuple[int, ...]
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    mode: str = "shards"
    shuffle_buffer: int = 1_000_000

    @property
    def num_examples(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * (self.world_size if self.mode == "global" else 1)

    def _key(self, epoch: int) -> list[int]:
        return [self.seed, epoch] + ([self.rank] if self.mode == "shards" else [])

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The epoch's windows: chunk indices, in stream order (consecutive chunks of one chunk permutation)."""
        order = np.random.default_rng(self._key(epoch) + [0]).permutation(len(self.chunk_sizes))
        out, start, size = [], 0, 0
        for i, c in enumerate(order):
            if i > start and size + self.chunk_sizes[c] > self.shuffle_buffer:
                out.append(order[start:i])
                start, size = i, 0
            size += self.chunk_sizes[c]
        if start < len(order):
            out.append(order[start:])
        return out

    def window_order(self, epoch: int, window: int, size: int) -> np.ndarray:
        """The permutation of window ``window``'s ``size`` examples (its chunks concatenated in window order)."""
        return np.random.default_rng(self._key(epoch) + [1 + window]).permutation(size)

    def micro_span(self, step: int, micro: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of the epoch's stream that this rank's micro-batch ``micro`` of ``step`` takes."""
        block = micro * self.world_size + self.rank if self.mode == "global" else micro
        lo = step * self.rows_per_step + block * self.micro_batch
        return lo, lo + self.micro_batch

    def order(self, epoch: int) -> np.ndarray:
        """The whole epoch stream as example indices in storage order (chunk 0's examples first): the reference
        for tests and small data; training reads it window by window instead (:func:`iterate`)."""
        starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).astype(np.int64)
        parts = [np.zeros(0, dtype=np.int64)]
        for w, chunks in enumerate(self.windows(epoch)):
            rows = np.concatenate([np.arange(starts[c], starts[c + 1]) for c in chunks])
            parts.append(rows[self.window_order(epoch, w, len(rows))])
        return np.concatenate(parts)

    def rows(self, order: np.ndarray, step: int, micro: int) -> np.ndarray:
        lo, hi = self.micro_span(step, micro)
        return order[lo:hi]

    def steps_in_epoch(self) -> int:
        return self.num_examples // self.rows_per_step


def _epoch_stream(source: Any, plan: BatchPlan, epoch: int, skip: int) -> Iterator[Examples]:
    """The epoch's examples in stream order, one window at a time, from row ``skip`` on: the windows that end before
    ``skip`` are not read."""
    seen = 0
    for w, chunks in enumerate(plan.windows(epoch)):
        size = sum(plan.chunk_sizes[c] for c in chunks)
        if seen + size <= skip:
            seen += size
            continue
        window = source.load_many(chunks)  # (size, H): its chunks one after the other
        window = window.take(plan.window_order(epoch, w, size)[max(0, skip - seen):])  # (the unshuffled one goes)
        yield window
        window = None  # only the consumer holds it now: one window in memory, not two
        seen += size


def iterate(source: Any, plan: BatchPlan, cursor: Cursor, steps_per_epoch: int
            ) -> Iterator[tuple[Cursor, list[Examples]]]:
    """Endless ``(cursor before the step, [grad_accum micro-batches])`` from ``cursor`` on, read from ``source``
    (:class:`ExampleSource` or :class:`InMemorySource`) one window at a time; a step may span two windows. Holds
    one window plus the rows of a step that started in the previous one."""
    width = plan.rows_per_step
    while True:
        epoch = cursor.epoch
        base = cursor.step * width  # epoch stream row of pending[off]
        pending, off = Examples.concat([], 0), 0
        stream = _epoch_stream(source, plan, epoch, base)
        while cursor.epoch == epoch:
            end = (cursor.step + 1) * width
            while base + len(pending) - off < end:  # the step's rows run past this window: add the next one
                # < one step of rows, copied so the old window is gone before the next one is read
                left = Examples(pending.history[off:].copy(), pending.target[off:].copy())
                pending = None
                part = next(stream)
                pending, off = Examples.concat([left, part] if len(left) else [part], 0), 0
                left = part = None  # the window lives in pending alone (a concatenation copied it)
            micro = []
            for m in range(plan.grad_accum):
                lo, hi = (i - base + off for i in plan.micro_span(cursor.step, m))
                # copies (a step's rows): a consumer that keeps a step's batches does not keep the window alive
                micro.append(Examples(pending.history[lo:hi].copy(), pending.target[lo:hi].copy()))
            off += end - base
            base = end
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


def stream_batches(source: Any, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """``(history, target)`` batches (``(history, target, seen)`` from a source that keeps seen items) of
    ``batch_size`` rows (the last one may be shorter) in storage order, read one chunk at a time: evaluating any
    number of users holds one chunk and one batch. The chunks are not counted first (each is read once), so the
    first batches cost only the chunks they come from."""
    pending: Examples | None = None
    for i in range(source.num_chunks):
        part = source.load_many([i])
        if not len(part):
            continue
        pending = part if pending is None else Examples.concat([pending, part], part.history.shape[1])
        full = len(pending) - len(pending) % batch_size
        for lo in range(0, full, batch_size):
            yield pending.batch(lo, lo + batch_size)
        pending = pending.take(np.arange(full, len(pending)))
    if pending is not None and len(pending):
        yield pending.batch(0, len(pending))
