import torch

from genrec_dist.config import load_config
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.config import SASRecConfig

from toys import successor_batch, train_steps, toy_vs_most_popular

N = 30


def small_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(sasrec=SASRecConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0, max_history=8,
                                          **kw))
    return cfg


def test_shapes_padding_and_no_nan(gen):
    torch.manual_seed(0)
    model = build_model("sasrec", small_cfg(), N)
    history, target = successor_batch(N, 8, 6, gen)
    history[0] = 0  # a fully padded row
    out = model(history, target)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    rec = model.recommend(history, 5)
    assert rec.shape == (8, 5)
    assert (rec > 0).all() and (rec <= N).all()
    assert all(len(set(r.tolist())) == 5 for r in rec)  # distinct items


def test_left_padding_does_not_change_the_output(gen):
    torch.manual_seed(0)
    model = build_model("sasrec", small_cfg(), N).eval()
    history = torch.tensor([[0, 0, 3, 4, 5]])
    longer = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
    # Right-aligned positions + padding mask: extra left padding is invisible.
    torch.testing.assert_close(model.scores(history), model.scores(longer))


def test_recommend_pads_with_zero_when_catalog_is_small():
    model = build_model("sasrec", small_cfg(), 3)
    rec = model.recommend(torch.tensor([[1, 2]]), 5)
    assert sorted(rec[0, :3].tolist()) == [1, 2, 3] and rec[0, 3:].tolist() == [0, 0]


def test_overfits_the_successor_toy_and_beats_most_popular(gen):
    torch.manual_seed(0)
    model = build_model("sasrec", small_cfg(), N)
    losses = train_steps(model, N, steps=120)
    assert losses[-1] < 0.3 * losses[0]
    ours, base = toy_vs_most_popular(model, N, gen)
    assert ours["recall@5"] > 0.9
    assert ours["recall@5"] > base["recall@5"] + 0.5


def test_sampled_softmax_trains():
    torch.manual_seed(0)
    model = build_model("sasrec", small_cfg(loss="sampled", num_negatives=8), N)
    losses = train_steps(model, N, steps=80)
    assert losses[-1] < 0.5 * losses[0]


def test_config_section_loads_from_overrides():
    cfg = load_config(None, ["model.sasrec.loss=sampled", "model.sasrec.num_negatives=16", "model.tiger.beam_width=7"])
    assert cfg.model.sasrec.loss == "sampled" and cfg.model.sasrec.num_negatives == 16
    assert cfg.model.tiger.beam_width == 7


def test_auto_loss_is_full_softmax_up_to_the_threshold_then_sampled():
    """loss=auto: the exact softmax up to full_softmax_max_items items, sampled negatives above (the loss then no
    longer equals the full cross-entropy)."""
    history, target = successor_batch(N, 8, 6, torch.Generator().manual_seed(0))
    for limit, want in ((N, "softmax"), (N - 1, "sampled")):
        torch.manual_seed(0)
        model = build_model("sasrec", small_cfg(full_softmax_max_items=limit, num_negatives=4), N)
        assert model.cfg.loss == "auto" and model.loss == want
        full = torch.nn.functional.cross_entropy(model.scores(history), target)
        assert torch.isclose(model(history, target)["loss"], full) == (want == "softmax")
