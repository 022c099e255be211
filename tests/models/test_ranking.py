"""Block-wise full-catalog top-k (genrec_dist/models/ranking.py) and every model's ``topk``: ids and scores of a block
smaller than the catalog equal the one-block path and a stable sort of the full score matrix, ties included."""

import numpy as np
import pytest
import torch

from genrec_dist.evaluation.evaluate import MostPopular
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.config import CARConfig, SASRecConfig, TigerConfig
from genrec_dist.models.ranking import blockwise_topk, full_topk

from toys import make_sids, successor_batch

N = 37


def _blocks_of(matrix: torch.Tensor):
    return lambda lo, hi: matrix[:, lo:hi]


@pytest.mark.parametrize("block", [1, 3, 7, 16, 36, 37, 1000])
@pytest.mark.parametrize("k", [1, 5, 12, 40])
def test_blockwise_equals_full_sort_with_ties(block, k):
    """Scores drawn from 4 values: nearly every cut falls inside a tie; lower id first, like a stable sort."""
    gen = torch.Generator().manual_seed(block * 100 + k)
    scores = torch.randint(0, 4, (6, N + 1), generator=gen).float()
    scores[2] = 1.0  # a row that is one big tie
    scores[3, 5:] = float("-inf")  # fewer finite items than k
    scores[:, 0] = float("-inf")
    want_ids, want = full_topk(scores, k)
    ids, got = blockwise_topk(_blocks_of(scores), N, k, 6, torch.device("cpu"), block)
    assert torch.equal(ids, want_ids) and torch.equal(got, want)
    if k > N:
        assert (ids[:, N:] == 0).all() and torch.isinf(got[:, N:]).all()
    ref = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True)
    assert torch.equal(ids[:, :min(k, N)], ref.indices[:, :k] + 1)


def test_blockwise_equals_torch_topk_without_ties():
    scores = torch.randn(5, N + 1, generator=torch.Generator().manual_seed(1))
    ids, vals = blockwise_topk(_blocks_of(scores), N, 10, 5, torch.device("cpu"), 8)
    ref = scores[:, 1:].topk(10, dim=1)
    assert torch.equal(ids, ref.indices + 1) and torch.equal(vals, ref.values)


def test_massive_ties_in_one_block_take_the_exact_path():
    scores = torch.zeros(2, 501)
    scores[:, 0] = float("-inf")
    ids, _ = blockwise_topk(_blocks_of(scores), 500, 3, 2, torch.device("cpu"), 200)
    assert ids.tolist() == [[1, 2, 3], [1, 2, 3]]


def _sasrec():
    torch.manual_seed(0)
    cfg = ModelConfig(sasrec=SASRecConfig(d_model=16, n_heads=1, n_layers=1, d_ff=16, dropout=0.0, max_history=6))
    return build_model("sasrec", cfg, N).eval()


def _car(**kw):
    torch.manual_seed(0)
    codes = np.array([[i % 3, i % 5] for i in range(N)])
    base = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0, max_history=6)
    return build_model("car", ModelConfig(car=CARConfig(**{**base, **kw})), N, make_sids(codes, [3, 5])).eval()


@pytest.mark.parametrize("which", ["sasrec", "car-fast", "car-slow"])
@pytest.mark.parametrize("block", [4, 10, N])
def test_model_topk_chunked_equals_unchunked_and_scores(which, block):
    model = _sasrec() if which == "sasrec" else _car(slow_weight=0.5)
    kw = {} if which == "sasrec" else {"inference": which.split("-")[1]}
    history, _ = successor_batch(N, 9, 6, torch.Generator().manual_seed(2))
    # two identical item rows -> tied scores in different blocks: the lower id must come first
    table = model.item_emb.weight
    with torch.no_grad():
        table[30] = table[3]
    ids, vals = model.topk(history, 12, block=block, **kw)
    one_ids, one_vals = model.topk(history, 12, block=N, **kw)
    assert torch.equal(ids, one_ids)
    torch.testing.assert_close(vals, one_vals, rtol=1e-6, atol=1e-5)
    full = model.scores(history, **kw)  # (B, N+1): the unchunked matrix
    torch.testing.assert_close(vals, full.gather(1, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, full_topk(full, 12)[0])
    assert torch.equal(model.recommend(history, 12, block=block, **kw), ids)
    assert (vals[:, :-1] >= vals[:, 1:]).all()


def test_small_catalog_pads_with_zero_and_minus_inf():
    model = _sasrec()
    ids, vals = model.topk(torch.tensor([[1, 2]]), N + 3, block=5)
    assert (ids[0, N:] == 0).all() and torch.isinf(vals[0, N:]).all() and sorted(ids[0, :N].tolist()) == \
        list(range(1, N + 1))


@pytest.mark.parametrize("model_name", ["tiger", "car-ar"])
def test_beam_models_return_items_with_their_beam_logprob(model_name):
    codes = np.array([[i % 3, (i // 3) % 4] for i in range(N)])  # 12 codes, collisions expand to several items
    sids = make_sids(codes, [3, 4])
    torch.manual_seed(0)
    if model_name == "tiger":
        cfg = ModelConfig(tiger=TigerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1,
                                            decoder_layers=1, dropout=0.0, max_history=6))
        model = build_model("tiger", cfg, N, sids).eval()
    else:
        model = _car(mode="ar")
    history, _ = successor_batch(N, 4, 6, torch.Generator().manual_seed(3))
    ids, vals = model.topk(history, 8, beam_width=8)
    assert torch.equal(ids, model.recommend(history, 8, beam_width=8))
    res = model.beam_search(history, 8)
    for b in range(4):
        for item, score in zip(ids[b].tolist(), vals[b].tolist()):
            w = int((model.trie.leaf_items[res.leaves[b]] == item).any(dim=1).nonzero()[0])  # the beam of the item
            assert score == pytest.approx(float(res.scores[b, w]))
        assert (vals[b, :-1] >= vals[b, 1:]).all()


def test_most_popular_topk_scores_are_counts():
    pop = MostPopular.fit([[1, 2, 2, 3], [3, 2], [4]], num_items=5)
    ids, vals = pop.topk(torch.zeros(2, 4, dtype=torch.long), 7)
    assert ids[0].tolist() == [2, 3, 1, 4, 5, 0, 0]
    assert vals[0, :5].tolist() == [3.0, 2.0, 1.0, 1.0, 0.0] and torch.isinf(vals[0, 5:]).all()
