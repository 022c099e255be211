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
        model = build_model("sasrec", small_cfg(full_softmax_max_items=limit, num_negatives=4, all_positions=False),
                            N)
        assert model.cfg.loss == "auto" and model.loss == want
        full = torch.nn.functional.cross_entropy(model.scores(history), target)
        assert torch.isclose(model(history, target)["loss"], full) == (want == "softmax")


def _prefixes(history: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefix of each left-padded row of ``history`` + ``target`` -> (its history, its next item)."""
    hs, ts = [], []
    for row, last in zip(history.tolist(), target.tolist()):
        items = [i for i in row if i] + [last]
        for j in range(1, len(items)):
            hs.append([0] * (history.shape[1] - j) + items[:j])
            ts.append(items[j])
    return torch.tensor(hs), torch.tensor(ts)


def test_every_position_loss_is_the_mean_of_the_per_prefix_losses():
    """One causal pass over windows (all_positions) trains exactly what one example per prefix trains: the window
    loss equals the mean of the per-prefix losses on the same transitions (positions counted from the first item, so
    a position's state is the same inside the window and as the end of its own prefix; no dropout)."""
    torch.manual_seed(0)
    windows = build_model("sasrec", small_cfg(positions="from_start"), N)
    prefixes = build_model("sasrec", small_cfg(positions="from_start", all_positions=False), N)
    prefixes.load_state_dict(windows.state_dict())
    history = torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 9, 12], [1, 2, 3, 4, 5, 6, 7, 8]])
    target = torch.tensor([7, 20, 9])
    ph, pt = _prefixes(history, target)
    assert len(pt) == 4 + 2 + 8  # every transition once
    window_loss = windows(history, target)["loss"]
    prefix_loss = prefixes(ph, pt)["loss"]
    torch.testing.assert_close(window_loss, prefix_loss)
    # and the gradients agree too: the same update either way
    window_loss.backward()
    prefix_loss.backward()
    for (name, a), b in zip(windows.named_parameters(), prefixes.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # from_end positions (the default, SASRec's layout) give each window position another slot than its prefix has
    default = build_model("sasrec", small_cfg(), N)
    default.load_state_dict(windows.state_dict())
    assert not torch.isclose(default(history, target)["loss"], window_loss)


def test_per_position_negatives_are_drawn_for_every_position():
    torch.manual_seed(0)
    for negatives in ("position", "batch"):
        model = build_model("sasrec", small_cfg(loss="sampled", num_negatives=8, negatives=negatives), N)
        losses = train_steps(model, N, steps=80)
        assert losses[-1] < 0.5 * losses[0], negatives


def test_from_start_positions_ignore_left_padding():
    torch.manual_seed(0)
    model = build_model("sasrec", small_cfg(positions="from_start"), N).eval()
    torch.testing.assert_close(model.scores(torch.tensor([[0, 0, 3, 4, 5]])),
                               model.scores(torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])))
