import numpy as np
import pytest
import torch

from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.config import TigerConfig

from toys import make_sids, successor_batch, train_steps, toy_vs_most_popular

N = 30


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=2, head_dim=16, d_ff=64, encoder_layers=1, decoder_layers=2, dropout=0.0,
                max_history=8, beam_width=10)
    return ModelConfig(tiger=TigerConfig(**{**base, **kw}))


def unique_sids():
    ids = np.arange(N)
    return make_sids(np.stack([ids // 5, ids % 5], axis=1), [6, 5])


def colliding_sids():
    """3 levels; items 1-4 share one code, items 10 and 20 share another, codes cover a fraction of the space."""
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 4, N), rng.integers(0, 3, N), rng.integers(0, 3, N)], axis=1)
    codes[1:4] = codes[0]
    codes[19] = codes[9]
    return make_sids(codes, [4, 3, 3])


def test_needs_semantic_ids():
    with pytest.raises(ValueError, match="semantic IDs"):
        build_model("tiger", small_cfg(), N, None)
    with pytest.raises(ValueError, match="cover 30 items"):
        build_model("tiger", small_cfg(), N + 1, unique_sids())


def test_shapes_padding_and_no_nan(gen):
    torch.manual_seed(0)
    model = build_model("tiger", small_cfg(), N, unique_sids())
    history, target = successor_batch(N, 8, 6, gen)
    history[0] = 0  # a fully padded row
    out = model(history, target)
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "ce_level_0", "ce_level_1"}
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    res = model.beam_search(history, beam_width=5)
    assert torch.isfinite(res.scores).all()
    rec = model.recommend(history, 5)
    assert rec.shape == (8, 5) and (rec > 0).all()


def test_left_padding_and_long_histories():
    torch.manual_seed(0)
    model = build_model("tiger", small_cfg(), N, unique_sids()).eval()
    hist = torch.tensor([[0, 0, 4, 5, 6]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 0, 4, 5, 6]])
    target = torch.tensor([7])
    torch.testing.assert_close(model(hist, target)["loss"], model(padded, target)["loss"])
    long = torch.arange(1, 13)[None]  # 12 items > max_history 8: the last 8 are used
    torch.testing.assert_close(model(long, target)["loss"], model(long[:, -8:], target)["loss"])


def test_beam_scores_match_teacher_forcing(gen):
    """The cached decoder's beam score of a code = its log-likelihood under the training forward pass."""
    torch.manual_seed(0)
    model = build_model("tiger", small_cfg(), N, unique_sids()).eval()
    history, _ = successor_batch(N, 1, 6, gen)
    res = model.beam_search(history, beam_width=3)
    for w in range(3):
        code = res.codes[0, w]
        item = int(np.flatnonzero((model.codes == code).all(1).numpy())[0])
        with torch.no_grad():
            loglik = -model(history, torch.tensor([item]))["loss"] * model.num_levels
        assert float(res.scores[0, w]) == pytest.approx(float(loglik), abs=1e-4)


def test_recommend_returns_distinct_items_and_expands_collisions(gen):
    torch.manual_seed(0)
    sids = colliding_sids()
    model = build_model("tiger", small_cfg(), N, sids).eval()
    history, _ = successor_batch(N, 16, 6, gen)
    k = 12
    res = model.beam_search(history, beam_width=k)
    rec = model.recommend(history, k, beam_width=k)
    codes = torch.from_numpy(sids.codes)
    assert model.trie.contains(res.codes[res.valid]).all()  # no beam ends on a code that is no item
    for u in range(history.shape[0]):
        items = [i for i in rec[u].tolist() if i]
        assert len(items) == len(set(items))
        # Items come grouped by decoded code, in beam order, each code expanded to all its items.
        expected = []
        for code in res.codes[u][res.valid[u]]:
            expected += sorted(np.flatnonzero((sids.codes == code.numpy()).all(1)).tolist())
        assert items == expected[:k]
        assert all(bool((codes[i] == res.codes[u]).all(1).any()) for i in items)
    # Fewer codes than k exist for a tiny catalog: the tail is 0, never an invented item.
    tiny = build_model("tiger", small_cfg(), 3, make_sids(np.array([[0, 0], [0, 0], [1, 2]]), [2, 3])).eval()
    assert tiny.recommend(torch.tensor([[1, 2]]), 5).tolist() == [[1, 2, 3, 0, 0]] or \
        tiny.recommend(torch.tensor([[1, 2]]), 5).tolist() == [[3, 1, 2, 0, 0]]


def test_overfits_the_successor_toy_and_beats_most_popular(gen):
    torch.manual_seed(0)
    model = build_model("tiger", small_cfg(), N, unique_sids())
    losses = train_steps(model, N, steps=150)
    assert losses[-1] < 0.2 * losses[0]
    ours, base = toy_vs_most_popular(model, N, gen)
    assert ours["recall@5"] > 0.9
    assert ours["recall@5"] > base["recall@5"] + 0.5
    assert ours["ndcg@5"] > base["ndcg@5"] + 0.5
