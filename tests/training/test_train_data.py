"""The data path as plain values: examples follow split_user, rank assignment covers every user once, the batch
plan gives the same global batches at any world size, the cursor resumes where it stopped. No process group."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_dist.data.dataset import Dataset, split_user, write_dataset
from genrec_dist.training import data as D


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
    train = D.train_examples(frame, H)
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
        ex = D.eval_examples(frame, H, split)
        want = [split_user(s, H)[split] for s in seqs if len(s) >= 3]
        assert [(_unpad(r), int(t)) for r, t in zip(ex.history, ex.target)] == [(list(h), y) for h, y in want]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(1, 6))
def test_windows_hold_every_transition_exactly_once(seqs, H):
    """Position t of a window predicts item t+1 (CAR's every-position loss): over a user's windows, each transition
    of the training sequence appears exactly once, and each window is one of the prefix examples."""
    frame = _frame({i + 1: s for i, s in enumerate(seqs)})
    windows, prefixes = D.train_examples(frame, H, "windows"), D.train_examples(frame, H, "prefixes")
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
        D.train_examples(_frame({1: [1, 2, 3, 4]}), 5, "every")


def test_eval_examples_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        D.eval_examples(_frame({1: [1, 2, 3]}), 5, "train")


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
        part = D.rank_sequences(sharded, rank, world, "shards")
        seen += part["user_id"].to_list()
    assert sorted(seen) == list(range(1, 41))
    if world == 2:  # shard files themselves are split, not rows
        files0 = {f.rsplit("/", 1)[-1] for f in D.shards_for(sharded.shard_files, 0, 2)}
        assert files0 == {"part-00000.parquet", "part-00002.parquet"}


def test_global_mode_reads_everything(sharded):
    assert D.rank_sequences(sharded, 1, 2, "global").height == 40


def test_cursor_is_a_plain_resumable_value():
    c = D.Cursor()
    for _ in range(7):
        c = c.advance(3)
    assert c == D.Cursor(2, 1)
    assert D.Cursor.from_dict(c.to_dict()) == c


def test_steps_per_epoch_drops_remainder_and_refuses_empty():
    assert D.steps_per_epoch([100, 93, 120], 10) == 9
    with pytest.raises(ValueError, match="no full step"):
        D.steps_per_epoch([5, 100], 8)


def _global_batches(n, world, ga, mb, seed, epoch, steps):
    out = []
    for step in range(steps):
        rows = []
        for rank in range(world):
            plan = D.BatchPlan(n, mb, ga, world, rank, seed, "global")
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
    p0 = D.BatchPlan(50, 5, 1, 2, 0, 7, "shards")
    p1 = D.BatchPlan(50, 5, 1, 2, 1, 7, "shards")
    assert not np.array_equal(p0.order(0), p1.order(0))
    assert not np.array_equal(p0.order(0), p0.order(1))
    assert np.array_equal(p0.order(3), D.BatchPlan(50, 5, 1, 2, 0, 7, "shards").order(3))


def test_iterate_resumes_exactly():
    ex = D.Examples(np.arange(60).reshape(30, 2), np.arange(30))
    plan = D.BatchPlan(30, 4, 2, 1, 0, 3, "shards")
    spe = D.steps_per_epoch([30], 8)  # 3 steps, 6 examples dropped per epoch
    full = D.iterate(ex, plan, D.Cursor(), spe)
    seq = [next(full) for _ in range(8)]
    cursor_after_5 = seq[5][0]
    resumed = D.iterate(ex, plan, cursor_after_5, spe)
    for (c_a, m_a), (c_b, m_b) in zip(seq[5:], [next(resumed) for _ in range(3)]):
        assert c_a == c_b
        assert all(np.array_equal(a.target, b.target) for a, b in zip(m_a, m_b))


def test_eval_slice_partitions():
    parts = [D.eval_slice(10, r, 3) for r in range(3)]
    assert [list(range(10))[s] for s in parts] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
