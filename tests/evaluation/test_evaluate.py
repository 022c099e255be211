import time

import pytest
import torch

from genrec_dist.evaluation.evaluate import MostPopular, evaluate_model, evaluate_variants
from genrec_dist.reports import format_results


def test_most_popular_ranks_by_training_counts():
    pop = MostPopular.fit([[1, 2, 2, 3], [3, 2], [4]], num_items=5)
    rec = pop.recommend(torch.zeros(2, 4, dtype=torch.long), 5)
    # counts: 2 -> 3, 3 -> 2, then 1 and 4 once (tie -> lower id first), 5 never; padding 0 never listed.
    assert rec.tolist() == [[2, 3, 1, 4, 5]] * 2
    assert pop.recommend(torch.zeros(1, 1, dtype=torch.long), 7)[0].tolist() == [2, 3, 1, 4, 5, 0, 0]


def test_evaluate_model_adds_up_over_batches():
    pop = MostPopular.fit([[1, 2, 2, 3], [3, 2]], num_items=4)  # ranking 2, 3, 1, 4
    hist = torch.zeros(3, 2, dtype=torch.long)
    batches = [(hist, torch.tensor([2, 1, 4])), (hist[:1], torch.tensor([3]))]
    out = evaluate_model(pop, batches, ks=[1, 3])
    assert out["users"] == 4
    assert out["recall@1"] == 0.25  # only the first user
    assert out["recall@3"] == 0.75  # 2, 1 and 3 are in the top 3; 4 is not
    assert {"latency_ms_per_user", "latency_ms_per_user_p50", "latency_ms_per_user_p95", "ndcg@3"} <= set(out)
    table = format_results({"most-popular": out}, ks=[1, 3])
    assert table.splitlines()[0].startswith("| model | R@1 | N@1 | R@3 | N@3")
    assert "| most-popular | 0.2500 |" in table


def test_evaluate_variants_of_a_model_without_topk_many_call_it_per_setting():
    """A model with no shared pass is ranked once per setting, and each setting's metrics are its own."""
    class Shifted(MostPopular):  # recommend(shift=s) rotates the ranking by s places
        def recommend(self, history, k, shift=0):
            return super().recommend(history, 4).roll(-shift, dims=1)[:, :k]

    model = Shifted.fit([[1, 2, 2, 3], [3, 2]], num_items=4)  # ranking 2, 3, 1, 4
    hist = torch.zeros(2, 2, dtype=torch.long)
    batches = [(hist, torch.tensor([2, 3]))]
    out = evaluate_variants(model, batches, [1], None, {"a": {}, "b": {"shift": 1}})
    assert out["a"]["recall@1"] == 0.5 and out["b"]["recall@1"] == 0.5  # 2 first, then 3 first
    assert out["a"]["ndcg@1"] == evaluate_model(model, batches, [1])["ndcg@1"]
    assert evaluate_variants(model, batches, [1], None, {"b": {"shift": 2}})["b"]["recall@1"] == 0.0  # 1 first


class _Slow(MostPopular):
    """Most-popular whose ``recommend`` takes at least ``sleep_s`` per batch: a known floor under its latency."""

    sleep_s = 0.03

    def recommend(self, history, k):
        time.sleep(self.sleep_s)
        return super().recommend(history, k)


def test_latency_is_per_user_and_agrees_with_throughput():
    """Only floors (a sleep lasts at least its time), so a slow machine cannot fail it; a latency or throughput
    computed per batch instead of per user, over the wrong span, or left at 0 does."""
    model = _Slow.fit([[1, 2, 3]], num_items=3)
    hist = torch.zeros(4, 2, dtype=torch.long)
    one = evaluate_model(model, [(hist, torch.tensor([1, 2, 3, 1]))], ks=[1])
    # one batch of 4 users: each user's share of the >= 30 ms call, and users/s is the same number inverted
    assert one["latency_ms_per_user"] >= 1000 * _Slow.sleep_s / 4
    assert one["latency_ms_per_user"] == pytest.approx(1000 / one["users_per_s"], rel=1e-9)
    assert one["latency_ms_per_user_p50"] == one["latency_ms_per_user_p95"] == one["latency_ms_per_user"]
    assert one["users_per_s"] <= 4 / _Slow.sleep_s
    # batches of 1 and 3 users: per-user latencies >= 30 and >= 10 ms, their mean >= 20; p95 lies near the larger
    two = evaluate_model(model, [(hist[:1], torch.tensor([1])), (hist[:3], torch.tensor([1, 2, 3]))], ks=[1])
    assert two["users"] == 4 and two["users_per_s"] <= 4 / (2 * _Slow.sleep_s)
    assert two["latency_ms_per_user"] >= 1000 * _Slow.sleep_s * (1 + 1 / 3) / 2
    assert two["latency_ms_per_user_p95"] >= 1000 * _Slow.sleep_s * 0.9
    assert two["latency_ms_per_user_p50"] <= two["latency_ms_per_user_p95"]


def test_train_mode_is_restored():
    pop = MostPopular.fit([[1]], num_items=1).train()
    evaluate_model(pop, [(torch.ones(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))], ks=[1])
    assert pop.training


def test_format_results_gives_each_inference_mode_its_row():
    row = {"recall@10": 0.1, "ndcg@10": 0.05, "fast/recall@10": 0.1, "fast/ndcg@10": 0.05,
           "slow/recall@10": 0.2, "slow/ndcg@10": 0.07}
    lines = format_results({"car": row}, ks=[10]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| car", "| car fast", "| car slow"]
    assert lines[4].split(" | ")[1:3] == ["0.2000", "0.0700"]


def test_max_users_evaluates_the_first_users_of_the_split(tiny_cfg, tiny_dataset):
    """``evaluate.max_users`` cuts the split to its first N users (across batch and chunk borders), same rows as the
    whole split's first N; 0 is every user."""
    import copy

    from genrec_dist.data.dataset import Dataset
    from genrec_dist.evaluation.split import SplitBatches

    dataset = Dataset.open(tiny_dataset)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.chunk_rows = 64  # several chunks, so the cut may fall inside any of them
    every = list(SplitBatches(dataset, cfg, "test", 20, batch_size=32))
    hist = torch.cat([h for h, _ in every])
    assert len(hist) == dataset.num_users > 150
    for n in (1, 32, 45, 150):
        cfg.evaluate.max_users = n
        cut = list(SplitBatches(dataset, cfg, "test", 20, batch_size=32))
        assert [len(h) for h, _ in cut][:-1] == [32] * ((n - 1) // 32)
        assert torch.equal(torch.cat([h for h, _ in cut]), hist[:n])
        assert torch.equal(torch.cat([t for _, t in cut]), torch.cat([t for _, t in every])[:n])
    cfg.evaluate.max_users = 0
    assert sum(len(h) for h, _ in SplitBatches(dataset, cfg, "test", 20, batch_size=32)) == dataset.num_users


def test_drop_seen_keeps_rank_order_and_pads():
    from genrec_dist.evaluation.evaluate import drop_seen

    ranked = torch.tensor([[5, 3, 9, 1, 7], [2, 4, 6, 8, 10]])
    seen = torch.tensor([[0, 3, 5], [0, 0, 0]])
    assert drop_seen(ranked, seen, 3).tolist() == [[9, 1, 7], [2, 4, 6]]
    assert drop_seen(ranked, torch.tensor([[5, 3, 9], [2, 4, 6]]), 3, block=2).tolist() == [[1, 7, 0], [8, 10, 0]]


def test_seen_filter_turns_a_repeat_recommender_into_the_next_best():
    """A model that ranks the user's own history first scores 0 when the target is new; with the seen filter the
    history goes and the next items count."""
    from genrec_dist.evaluation.evaluate import evaluate_model

    class Repeat(torch.nn.Module):
        num_items = 10

        def recommend(self, history, k):
            rows = [[int(i) for i in h.flip(0) if i] for h in history]  # most recent first
            return torch.tensor([(r + [i for i in range(1, 11) if i not in r])[:k] for r in rows])

    history = torch.tensor([[1, 2, 3], [0, 4, 5]])
    target = torch.tensor([6, 1])
    plain = evaluate_model(Repeat(), [(history, target)], ks=[1, 3])
    seen = evaluate_model(Repeat(), [(history, target, history)], ks=[1, 3])
    # plain: [3, 2, 1] and [5, 4, 1] (only user 2's target, at rank 3); seen: [4, 5, 6] and [1, 2, 3]
    assert (plain["recall@1"], plain["recall@3"]) == (0.0, 0.5)
    assert (seen["recall@1"], seen["recall@3"]) == (0.5, 1.0)
