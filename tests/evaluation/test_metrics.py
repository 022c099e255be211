import math

import pytest
import torch

from genrec_dist.evaluation.evaluate import recall_ndcg


def test_hand_computed_cases():
    ranked = torch.tensor([
        [7, 3, 9, 1, 2],   # target 7 at rank 1
        [4, 5, 6, 8, 3],   # target 3 at rank 5
        [1, 2, 3, 4, 5],   # target 9 missing
        [2, 9, 0, 0, 0],   # target 9 at rank 2, short list padded with 0
    ])
    target = torch.tensor([7, 3, 9, 9])
    per_user = recall_ndcg(ranked, target, ks=[1, 2, 5], reduce="none")
    assert per_user["recall@1"].tolist() == [1, 0, 0, 0]
    assert per_user["recall@2"].tolist() == [1, 0, 0, 1]
    assert per_user["recall@5"].tolist() == [1, 1, 0, 1]
    assert per_user["ndcg@5"].tolist() == pytest.approx([1.0, 1 / math.log2(6), 0.0, 1 / math.log2(3)])
    assert per_user["ndcg@2"].tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / math.log2(3)])
    mean = recall_ndcg(ranked, target, ks=[5])
    assert mean["recall@5"] == pytest.approx(0.75)
    assert mean["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(3)) / 4)
    assert recall_ndcg(ranked, target, ks=[5], reduce="sum")["recall@5"] == pytest.approx(3.0)


def test_padding_slot_is_never_a_hit():
    out = recall_ndcg(torch.tensor([[0, 0]]), torch.tensor([0]), ks=[2])
    assert out["recall@2"] == 0.0 and out["ndcg@2"] == 0.0


def test_k_longer_than_the_list_is_an_error():
    with pytest.raises(ValueError, match="1..3"):
        recall_ndcg(torch.ones(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.long), ks=[5])
