"""Naming a lost rank from what a failed collective says (genrec_dist/training/dist.py ``RankWatch``); the real loss
of a node is tests/training/test_train_runs.py (two network namespaces)."""

from __future__ import annotations

from genrec_dist.training.dist import RankWatch

TABLE = [("head", "10.1.77.1", 100), ("head", "10.1.77.1", 101), ("worker", "10.1.77.2", 200),
         ("worker", "10.1.77.2", 201)]
CLOSED = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                      "[10.1.77.2]:38062. This is typically caused by a remote worker crashing.")
TIMEOUT = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 600000ms "
                       "for recv operation to complete")


def test_the_peer_gloo_names_is_the_lost_rank():
    watch = RankWatch(0, TABLE)
    assert watch.is_loss(CLOSED)
    assert watch.lost(CLOSED) == "rank 2 (worker, 10.1.77.2, pid 200), rank 3 (worker, 10.1.77.2, pid 201)"


def test_a_timeout_names_the_ranks_on_other_nodes():
    watch = RankWatch(1, TABLE)
    assert watch.is_loss(TIMEOUT)
    assert watch.lost(TIMEOUT).startswith("rank 2 (worker") and "rank 1 " not in watch.lost(TIMEOUT)
    assert RankWatch(0, TABLE[:2]).lost(TIMEOUT) == "rank 1 (head, 10.1.77.1, pid 101)"  # one node: the others


def test_other_errors_are_not_a_lost_rank():
    watch = RankWatch(0, TABLE)
    assert not watch.is_loss(ValueError("bad batch"))
    assert not watch.is_loss(RuntimeError("shape mismatch in forward"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = CLOSED
    assert watch.is_loss(wrapped)  # a collective's error under another one
