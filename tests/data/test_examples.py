"""The data path as plain values: examples follow split_user, rank assignment covers every user once, the batch
plan gives the same global batches at any world size, the streamed batches are the plan's, and the cursor resumes
where it stopped without reading the windows before it. No process group."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_dist.data import examples
from genrec_dist.data.dataset import Dataset, split_user, write_dataset


def _frame(seqs: dict[int, list[int]]) -> pl.DataFrame:
    return pl.DataFrame({"user_id": list(seqs), "items": list(seqs.values())},
                        schema={"user_id": pl.Int32, "items": pl.List(pl.Int32)})


def _unpad(row: np.ndarray) -> list[int]:
    return [int(x) for x in row if x != 0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(1, 6))
def test_examples_follow_split_user(seqs, H):
    frame = _frame({i + 1: s for i, s in enumerate(seqs)})
    train = examples.train_examples(frame, H)
    want_train = []
    for s in seqs:
        if len(s) < 3:
            continue
        t = split_user(s, H)["train"]
        want_train += [(t[max(0, i - H):i], t[i]) for i in range(1, len(t))]
    assert len(train) == len(want_train)
    for (h, y), row, target in zip(want_train, train.history, train.target):
        assert _unpad(row) == h and int(target) == y
        assert row.shape == (H,) and (row[:H - len(h)] == 0).all()  # left-padded: most recent item last
    for split in ("valid", "test"):
        ex = examples.eval_examples(frame, H, split)
        want = [split_user(s, H)[split] for s in seqs if len(s) >= 3]
        assert [(_unpad(r), int(t)) for r, t in zip(ex.history, ex.target)] == [(list(h), y) for h, y in want]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(1, 6))
def test_windows_hold_every_transition_exactly_once(seqs, H):
    """Position t of a window predicts item t+1 (CAR's every-position loss): over a user's windows, each transition
    of the training sequence appears exactly once, and each window is one of the prefix examples."""
    frame = _frame({i + 1: s for i, s in enumerate(seqs)})
    windows, prefixes = examples.train_examples(frame, H, "windows"), examples.train_examples(frame, H, "prefixes")
    prefix_set = {(tuple(_unpad(r)), int(t)) for r, t in zip(prefixes.history, prefixes.target)}
    covered, want = [], []
    for s in seqs:
        if len(s) >= 3:
            t = split_user(s, H)["train"]
            want += [(tuple(t[:i]), t[i]) for i in range(1, len(t))]
    for row, target in zip(windows.history, windows.target):
        h = _unpad(row)
        assert (tuple(h), int(target)) in prefix_set
        chain = h + [int(target)]
        covered += [(tuple(chain[:j]), chain[j]) for j in range(1, len(chain))]
    # the transition (previous item -> next) each window position trains, keyed by the last item seen and the next
    assert sorted((c[0][-1], c[1]) for c in covered) == sorted((w[0][-1], w[1]) for w in want)
    assert len(covered) == len(want)


def test_train_examples_rejects_unknown_mode():
    with pytest.raises(ValueError, match="train.examples"):
        examples.train_examples(_frame({1: [1, 2, 3, 4]}), 5, "every")


def test_eval_examples_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        examples.eval_examples(_frame({1: [1, 2, 3]}), 5, "train")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    users = 40
    items = pl.DataFrame({"item_id": np.arange(1, 11, dtype=np.int32), "item": [str(i) for i in range(1, 11)],
                          "title": ["t"] * 10, "text": ["t"] * 10})
    seqs = pl.DataFrame({
        "user_id": np.arange(1, users + 1, dtype=np.int32), "user": [f"u{u}" for u in range(users)],
        "items": [[1 + (u + j) % 10 for j in range(4 + u % 5)] for u in range(users)],
        "timestamps": [None] * users,
    }, schema={"user_id": pl.Int32, "user": pl.Utf8, "items": pl.List(pl.Int32), "timestamps": pl.List(pl.Int64)})
    manifest = {"counts": {"users": users, "items": 10}, "split": {"rule": "leave-one-out", "max_history": 20}}
    write_dataset(str(root / "d"), items, seqs, manifest, num_shards=3)
    return Dataset.open(str(root / "d"))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_sequences_cover_every_user_once(sharded, world):
    """Ranks <= shards: each rank reads only its shard files; ranks > shards: users split by row."""
    seen = []
    for rank in range(world):
        part = examples.rank_sequences(sharded, rank, world, "shards")
        seen += part["user_id"].to_list()
    assert sorted(seen) == list(range(1, 41))
    if world == 2:  # shard files themselves are split, not rows
        files0 = {f.rsplit("/", 1)[-1] for f in examples.shards_for(sharded.shard_files, 0, 2)}
        assert files0 == {"part-00000.parquet", "part-00002.parquet"}


def test_global_mode_reads_everything(sharded):
    assert examples.rank_sequences(sharded, 1, 2, "global").height == 40


def _sizes(n, chunk):
    return tuple([chunk] * (n // chunk) + ([n % chunk] if n % chunk else []))


def _global_batches(n, world, ga, mb, seed, epoch, steps, buffer=16):
    out = []
    for step in range(steps):
        rows = []
        for rank in range(world):
            plan = examples.BatchPlan(_sizes(n, 7), mb, ga, world, rank, seed, "global", buffer)
            order = plan.order(epoch)
            for m in range(ga):
                rows.append(plan.rows(order, step, m))
        out.append(np.sort(np.concatenate(rows)))
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(40, 200), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.integers(0, 3))
def test_global_plan_same_batches_at_any_world_size(n, world, ga, seed):
    """The union of all ranks' micro batches of a step equals the world-1 batch of that step."""
    global_batch = 8
    mb = global_batch // (world * ga)
    steps = n // global_batch
    ref = _global_batches(n, 1, 1, global_batch, seed, 0, steps)
    got = _global_batches(n, world, ga, mb, seed, 0, steps)
    for a, b in zip(ref, got):
        assert np.array_equal(a, b)
    assert len(np.unique(np.concatenate(got))) == steps * global_batch  # no example twice in an epoch


def test_shards_plan_differs_per_rank_and_epoch_but_is_reproducible():
    sizes = _sizes(50, 6)
    p0 = examples.BatchPlan(sizes, 5, 1, 2, 0, 7, "shards", 20)
    p1 = examples.BatchPlan(sizes, 5, 1, 2, 1, 7, "shards", 20)
    assert not np.array_equal(p0.order(0), p1.order(0))
    assert not np.array_equal(p0.order(0), p0.order(1))
    assert np.array_equal(p0.order(3), examples.BatchPlan(sizes, 5, 1, 2, 0, 7, "shards", 20).order(3))
    assert sorted(p0.order(2)) == list(range(50))  # a permutation of every example


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=12), st.integers(1, 40), st.integers(0, 5))
def test_windows_are_bounded_and_cover_every_chunk_once(sizes, buffer, seed):
    plan = examples.BatchPlan(tuple(sizes), 2, 1, 1, 0, seed, "shards", buffer)
    windows = plan.windows(1)
    assert sorted(np.concatenate(windows).tolist()) == list(range(len(sizes)))
    for w in windows:  # at most the buffer, unless one chunk alone is larger
        assert sum(sizes[c] for c in w) <= buffer or len(w) == 1


class _Counting:
    """An InMemorySource that records how many examples each read loaded."""

    def __init__(self, src):
        self.src, self.sizes, self.loads = src, src.sizes, []

    def __len__(self):
        return len(self.src)

    def load_many(self, idx):
        out = self.src.load_many(idx)
        self.loads.append(len(out))
        return out


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=10), st.integers(1, 25), st.sampled_from([1, 2]),
       st.sampled_from(["shards", "global"]), st.integers(0, 30))
def test_streamed_batches_are_the_plans_and_resume_anywhere(sizes, buffer, world, mode, start):
    """iterate() reading window by window yields exactly plan.rows(plan.order(epoch), ...) for every step, across
    epochs, from any cursor; no read holds more than one window."""
    n = sum(sizes)
    mb, ga = 2, 2
    plan = examples.BatchPlan(tuple(sizes), mb, ga, world, world - 1, 5, mode, buffer)
    spe = plan.steps_in_epoch()
    if spe < 1:
        return
    ex = examples.Examples(np.arange(2 * n).reshape(n, 2), np.arange(n))
    src = _Counting(examples.InMemorySource(ex, sizes))
    cursor = examples.Cursor(start // spe, start % spe)
    it = examples.iterate(src, plan, cursor, spe)
    for _ in range(2 * spe + 1):
        c, micro = next(it)
        order = plan.order(c.epoch)
        for m, got in enumerate(micro):
            assert np.array_equal(got.target, plan.rows(order, c.step, m))
    biggest = max(sizes)
    assert max(src.loads) <= max(buffer, biggest)


def test_iterate_resumes_exactly():
    ex = examples.Examples(np.arange(60).reshape(30, 2), np.arange(30))
    plan = examples.BatchPlan((10, 10, 10), 4, 2, 1, 0, 3, "shards", 12)
    spe = examples.steps_per_epoch([30], 8)  # 3 steps, 6 examples dropped per epoch
    full = examples.iterate(examples.InMemorySource(ex, plan.chunk_sizes), plan, examples.Cursor(), spe)
    seq = [next(full) for _ in range(8)]
    cursor_after_5 = seq[5][0]
    resumed = examples.iterate(examples.InMemorySource(ex, plan.chunk_sizes), plan, cursor_after_5, spe)
    for (c_a, m_a), (c_b, m_b) in zip(seq[5:], [next(resumed) for _ in range(3)]):
        assert c_a == c_b
        assert all(np.array_equal(a.target, b.target) for a, b in zip(m_a, m_b))


def test_resume_skips_the_windows_before_the_cursor():
    ex = examples.Examples(np.zeros((40, 1), dtype=np.int64), np.arange(40))
    plan = examples.BatchPlan((10, 10, 10, 10), 5, 1, 1, 0, 0, "shards", 10)  # 4 windows of one chunk
    src = _Counting(examples.InMemorySource(ex, plan.chunk_sizes))
    next(examples.iterate(src, plan, examples.Cursor(0, 6), 8))  # step 6 = rows 30..34: the last window only
    assert src.loads == [10]


# ----- the streaming source on a real sharded dataset -----

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """120 users over 3 shards, each shard written in row groups of 16 users."""
    root = tmp_path_factory.mktemp("big")
    users = 120
    items = pl.DataFrame({"item_id": np.arange(1, 31, dtype=np.int32), "item": [str(i) for i in range(1, 31)],
                          "title": ["t"] * 30, "text": ["t"] * 30})
    seqs = pl.DataFrame({
        "user_id": np.arange(1, users + 1, dtype=np.int32), "user": [f"u{u}" for u in range(users)],
        "items": [[1 + (u * 7 + j) % 30 for j in range(2 + u % 11)] for u in range(users)],
        "timestamps": [None] * users,
    }, schema={"user_id": pl.Int32, "user": pl.Utf8, "items": pl.List(pl.Int32), "timestamps": pl.List(pl.Int64)})
    manifest = {"counts": {"users": users, "items": 30}, "split": {"rule": "leave-one-out", "max_history": 5}}
    write_dataset(str(root / "d"), items, seqs, manifest, num_shards=3)
    for f in (root / "d" / "sequences").iterdir():  # several row groups per shard (prepare's writer decides)
        pl.read_parquet(f).write_parquet(f, row_group_size=16)
    return Dataset.open(str(root / "d"))


def _rows(ex):
    return sorted((tuple(h), int(t)) for h, t in zip(ex.history.tolist(), ex.target.tolist()))


@pytest.mark.parametrize("mode", ["prefixes", "windows"])
@pytest.mark.parametrize("world", [1, 2, 5])
def test_source_holds_exactly_the_in_memory_examples(big, mode, world):
    for rank in range(world):
        chunks = examples.rank_chunks(big, rank, world, "shards", 5)
        src = examples.ExampleSource(chunks, 5, "train", mode)
        want = examples.train_examples(examples.rank_sequences(big, rank, world, "shards"), 5, mode)
        assert len(src) == len(want) and max(c.stop - c.start for c in chunks) <= 5
        assert _rows(src.load_many(range(len(chunks)))) == _rows(want)
        valid = examples.ExampleSource(chunks, 5, "valid")
        got = [b for b in examples.stream_batches(valid, 7)]
        assert all(len(t) == 7 for _, t in got[:-1])
        assert _rows(examples.Examples(np.concatenate([h for h, _ in got]), np.concatenate([t for _, t in got]))) == \
            _rows(examples.eval_examples(examples.rank_sequences(big, rank, world, "shards"), 5, "valid"))


@pytest.mark.parametrize("split", ["shards", "global"])
def test_same_batches_for_a_seed_and_exact_resume_on_a_dataset(big, split):
    """Two runs with one seed see the same batches; a run resumed at (epoch, step) sees the rest of them."""
    world, mb, ga = 2, 3, 2

    def run(rank, cursor, steps):
        src = examples.ExampleSource(examples.rank_chunks(big, rank, world, split, 6), 5, "train")
        plan = examples.BatchPlan(src.sizes, mb, ga, world, rank, 11, split, 40)
        usable = len(src) // world if split == "global" else len(src)
        spe = examples.steps_per_epoch([usable], mb * ga)
        it = examples.iterate(src, plan, cursor, spe)
        steps = 2 * spe + 1 - (cursor.epoch * spe + cursor.step)  # into the third epoch
        return [(c, [(m.history.tolist(), m.target.tolist()) for m in micro]) for c, micro in
                (next(it) for _ in range(steps))], spe

    for rank in range(world):
        first, spe = run(rank, examples.Cursor(), None)
        again, _ = run(rank, examples.Cursor(), None)
        assert first == again and spe >= 3
        k = spe + 2  # inside the second epoch
        resumed, _ = run(rank, first[k][0], None)
        assert resumed == first[k:]
        assert first[spe][0] == examples.Cursor(1, 0) and first[0][1] != first[spe][1]  # the next epoch reshuffles


def test_cursor_is_a_plain_resumable_value():
    c = examples.Cursor()
    for _ in range(7):
        c = c.advance(3)
    assert c == examples.Cursor(2, 1)
    assert examples.Cursor.from_dict(c.to_dict()) == c


def test_steps_per_epoch_drops_remainder_and_refuses_empty():
    assert examples.steps_per_epoch([100, 93, 120], 10) == 9
    with pytest.raises(ValueError, match="no full step"):
        examples.steps_per_epoch([5, 100], 8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(1, 6))
def test_seen_items_are_the_whole_history_before_the_target(seqs, H):
    """evaluate.filter_seen keeps every item before the target, not only the last H the model reads."""
    frame = _frame({i + 1: s for i, s in enumerate(seqs)})
    for split, drop in (("valid", 2), ("test", 1)):
        ex = examples.eval_examples(frame, H, split, seen=True)
        plain = examples.eval_examples(frame, H, split)
        assert (ex.history == plain.history).all() and (ex.target == plain.target).all()
        want = [s[:-drop] for s in seqs if len(s) >= 3]
        assert [_unpad(r) for r in ex.seen] == want


def test_streamed_batches_carry_seen_items_across_chunks(big):
    chunks = examples.rank_chunks(big, 0, 1, "shards", 5)
    plain = list(examples.stream_batches(examples.ExampleSource(chunks, 3, "test"), 7))
    seen = list(examples.stream_batches(examples.ExampleSource(chunks, 3, "test", seen=True), 7))
    assert len(plain) == len(seen) and all(len(b) == 2 for b in plain) and all(len(b) == 3 for b in seen)
    for (h, t), (hs, ts, s) in zip(plain, seen):
        assert (h == hs).all() and (t == ts).all() and len(s) == len(t)
        for hist, items in zip(h, s):  # the model's history is the tail of the seen items
            assert _unpad(items)[-len(_unpad(hist)):] == _unpad(hist)
