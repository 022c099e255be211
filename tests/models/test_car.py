"""CAR (genrec_dist/models/car.py): chunk layout and fusion on exact tensors, causality (outputs and gradients), the
loss variants, fast/slow inference, the AR ablation's constrained decoding, and learning a structured toy."""

import numpy as np
import pytest
import torch

from genrec_dist.config import load_config
from genrec_dist.evaluation.evaluate import MostPopular, evaluate_model, evaluate_variants
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.car import CAR, chunk_tokens, fuse_chunks
from genrec_dist.models.config import CARConfig

from toys import make_sids, successor_batch, train_steps

N = 30
# Two levels that collide on purpose: 12 distinct codes for 30 items, so only the uid tells items apart.
TOY_CODES = np.array([[i % 3, i % 4] for i in range(N)])


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0, max_history=8)
    return ModelConfig(car=CARConfig(**{**base, **kw}))


def toy_model(**kw) -> CAR:
    return build_model("car", small_cfg(**kw), N, make_sids(TOY_CODES, [3, 4]))


# ----- chunk layout and fusion: 2 items, L = 3 -----

def _two_item_model(fusion: str) -> CAR:
    # item 1 -> codes [1, 0, 2], item 2 -> codes [0, 3, 1]; level sizes 2, 4, 3 (token rows 0-1, 2-5, 6-8)
    sids = make_sids(np.array([[1, 0, 2], [0, 3, 1]]), [2, 4, 3])
    model = CAR(CARConfig(d_model=1, n_heads=1, n_layers=1, d_ff=4, dropout=0.0, max_history=4, fusion=fusion),
                sids)
    with torch.no_grad():
        model.sid_emb.weight.copy_(torch.tensor([1., 2., 10., 20., 30., 40., 100., 200., 300.])[:, None])
        model.item_emb.weight.copy_(torch.tensor([0., 1000., 2000.])[:, None])
    return model


def test_chunk_layout_exact():
    codes = torch.tensor([[0, 0, 0], [1, 0, 2], [0, 3, 1]])
    assert chunk_tokens(torch.tensor([[1, 2]]), codes).tolist() == [[1, 0, 2, 1, 0, 3, 1, 2]]
    assert chunk_tokens(torch.tensor([[0, 2]]), codes).tolist() == [[0, 0, 0, 0, 0, 3, 1, 2]]


@pytest.mark.parametrize("fusion, expected", [
    # own embeddings: item 1 = [2, 10, 300 | 1000], item 2 = [1, 40, 200 | 2000]
    ("none", [2., 10., 300., 1000., 1., 40., 200., 2000.]),
    # position k adds the think tokens 1..k-1 of its own chunk (never the other chunk's)
    ("sum", [2., 12., 312., 1312., 1., 41., 241., 2241.]),
    ("mean", [2., 6., 104., 328., 1., 20.5, 241. / 3, 2241. / 4]),
])
def test_fusion_exact(fusion, expected):
    model = _two_item_model(fusion)
    got = model.embed(torch.tensor([[1, 2]]))  # (1, 8, 1)
    torch.testing.assert_close(got[0, :, 0], torch.tensor(expected))
    # a padding chunk is all zeros and does not change the real chunk after it
    padded = model.embed(torch.tensor([[0, 2]]))[0, :, 0]
    torch.testing.assert_close(padded, torch.tensor([0., 0., 0., 0., *expected[4:]]))


def test_fuse_chunks_rejects_unknown_mode():
    with pytest.raises(ValueError, match="fusion"):
        fuse_chunks(torch.zeros(1, 1, 2, 3), "max")


# ----- causality -----

@pytest.mark.parametrize("fusion", ["mean", "none"])
def test_no_position_sees_a_later_chunk(fusion):
    torch.manual_seed(0)
    model = toy_model(fusion=fusion).eval()
    a = torch.tensor([[0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 3, 4, 17, 22]])  # chunks 3 and 4 changed
    ha, hb = model.encode(a, 3), model.encode(b, 3)  # (1, 5, L+1, D)
    # (chunk 0 is padding: blocks.attention_mask lets padded rows see every key to stay finite; nothing reads them)
    torch.testing.assert_close(ha[:, 1:3], hb[:, 1:3])
    assert not torch.allclose(ha[:, 3], hb[:, 3])
    # Within a chunk: items 5 and 17 share their codes ([1, 1]), so only the uid token of chunk 3 differs and the
    # think tokens before it cannot tell.
    c = torch.tensor([[0, 3, 4, 17, 6]])
    assert TOY_CODES[4].tolist() == TOY_CODES[16].tolist()
    hc = model.encode(c, 3)
    torch.testing.assert_close(ha[:, 3, :-1], hc[:, 3, :-1])
    assert not torch.allclose(ha[:, 3, -1], hc[:, 3, -1])


def test_heads_at_chunk_t_get_no_gradient_from_later_chunks():
    torch.manual_seed(0)
    model = toy_model()
    captured = {}

    def keep(module, inputs, output):
        if module not in captured:  # the input lookup; the heads' later .scores calls are outputs
            output.retain_grad()
            captured[module] = output

    hooks = [model.sid_emb.register_forward_hook(keep), model.item_emb.register_forward_hook(keep)]
    history = torch.tensor([[0, 7, 8, 9, 10], [1, 2, 3, 4, 5]])
    for t in range(1, 4):
        captured.clear()
        model.zero_grad()
        h = model.encode(history, 3)[:, t, -1]  # (B, D) the state that predicts chunk t+1
        logits = [model.uid_logits(h)[:, 1:]] + [model.sid_logits(h, l) for l in range(model.num_levels)]
        sum(x.sum() for x in logits).backward()
        think, act = captured[model.sid_emb], captured[model.item_emb]  # (B, T, L, D), (B, T, D)
        for grad in (think.grad, act.grad):
            assert torch.count_nonzero(grad[:, t + 1:]) == 0, f"chunk {t} head got gradient from a later chunk"
        # ...while chunk t itself and the real chunks before it do feed the head
        assert torch.count_nonzero(act.grad[:, t]) > 0 and torch.count_nonzero(think.grad[1, : t + 1]) > 0
    for hk in hooks:
        hk.remove()


def test_left_padding_and_long_histories():
    torch.manual_seed(0)
    model = toy_model().eval()
    short = torch.tensor([[0, 0, 3, 4, 5]])
    longer = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 4, 5]])
    torch.testing.assert_close(model.scores(short), model.scores(longer))
    too_long = torch.arange(1, 13)[None]  # 12 items > max_history 8: the last 8 are read
    torch.testing.assert_close(model.scores(too_long), model.scores(too_long[:, -8:]))


# ----- loss -----

def test_loss_parts_every_position_and_alpha():
    torch.manual_seed(0)
    history = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    target = torch.tensor([6, 9, 6])
    model = toy_model(alpha=0.5)
    out = model(history, target)
    assert set(out) >= {"loss", "act_loss", "think_loss", "think_loss_level_0", "think_loss_level_1"}
    torch.testing.assert_close(out["loss"].detach(), out["act_loss"] + 0.5 * out["think_loss"])
    torch.testing.assert_close(out["think_loss"], (out["think_loss_level_0"] + out["think_loss_level_1"]) / 2)
    # Every chunk trains: the act loss is the mean over the 2 + 0 + 4 real (chunk, next chunk) pairs.
    model.eval()
    h = model.encode(history, 3)[:, :, -1]
    logp = model.uid_logits(h).log_softmax(-1)
    pairs = [(0, 2, 4), (0, 3, 5), (0, 4, 6)] + [(2, t, t + 2) for t in range(5)]
    pairs = [(b, t, y) for b, t, y in pairs if not (b == 2 and t == 4)] + [(2, 4, 6)]
    expected = -torch.stack([logp[b, t, y] for b, t, y in pairs]).mean()
    torch.testing.assert_close(model(history, target)["act_loss"], expected)
    # ...and with all_positions off only the last chunk does
    last = toy_model(alpha=0.5, all_positions=False)
    last.load_state_dict(model.state_dict())
    last.eval()
    expected_last = -torch.stack([logp[0, 4, 6], logp[2, 4, 6]]).mean()
    torch.testing.assert_close(last(history, target)["act_loss"], expected_last)
    # alpha = 0: the think heads get no gradient ("w/o T")
    no_think = toy_model(alpha=0.0, tie_embeddings=False)
    no_think(history, target)["loss"].backward()
    assert torch.count_nonzero(no_think.sid_head.weight.grad) == 0


def test_fully_padded_batch_is_finite():
    model = toy_model()
    out = model(torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 2]))
    assert out["loss"] == 0 and out["loss"].requires_grad
    # the same loss parts as a real batch: the trainer all-reduces them by name across ranks
    assert set(out) == set(model(torch.tensor([[1, 2]]), torch.tensor([3])))


@pytest.mark.parametrize("uid_loss", ["sampled", "in_batch"])
def test_large_catalog_losses_train(uid_loss):
    torch.manual_seed(0)
    model = toy_model(uid_loss=uid_loss, num_negatives=8)
    losses = train_steps(model, N, steps=60)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


# ----- inference -----

@pytest.mark.parametrize("inference", ["fast", "slow"])
def test_recommend_distinct_valid_items(inference, gen):
    torch.manual_seed(0)
    model = toy_model()
    history, _ = successor_batch(N, 16, 6, gen)
    history[0] = 0
    rec = model.recommend(history, 10, inference=inference)
    assert rec.shape == (16, 10) and (rec >= 1).all() and (rec <= N).all()
    assert all(len(set(r.tolist())) == 10 for r in rec)
    small = build_model("car", small_cfg(inference=inference), 3, make_sids(TOY_CODES[:3], [3, 4]))
    rec = small.recommend(torch.tensor([[1, 2]]), 5)
    assert sorted(rec[0, :3].tolist()) == [1, 2, 3] and rec[0, 3:].tolist() == [0, 0]


def test_slow_score_is_uid_plus_weighted_sid_path_logprobs():
    torch.manual_seed(0)
    model = toy_model(slow_weight=0.3).eval()
    history = torch.tensor([[0, 1, 2, 3]])
    h = model.encode(history, 4)[:, -1, -1]  # max_history 8 - 4 items
    item = 7
    expected = model.uid_logits(h).log_softmax(-1)[0, item] + 0.3 * sum(
        model.sid_logits(h, l).log_softmax(-1)[0, TOY_CODES[item - 1, l]] for l in range(2))
    torch.testing.assert_close(model.scores(history, "slow")[0, item], expected)
    torch.testing.assert_close(model.scores(history, "fast")[0, item], model.uid_logits(h).log_softmax(-1)[0, item])


@pytest.mark.parametrize("block", [7, None])
def test_topk_many_equals_each_setting_alone(block, gen):
    """One pass for several settings (what choosing slow_weight on validation does) gives each setting's own top-k
    bit for bit: items and scores, whatever the block size; and evaluate_variants' metrics equal evaluate_model's."""
    torch.manual_seed(0)
    model = toy_model(slow_weight=0.5).eval()
    history, target = successor_batch(N, 16, 6, gen)
    settings = [{"inference": "fast"}, {"inference": "slow"}, {"inference": "slow", "slow_weight": 0.1},
                {"inference": "slow", "slow_weight": 2.0}, {}]
    many = model.topk_many(history, 10, settings, block)
    for kw, (items, scores) in zip(settings, many):
        alone_items, alone_scores = model.topk(history, 10, block=block, **kw)
        assert torch.equal(items, alone_items) and torch.equal(scores, alone_scores), kw
    assert not torch.equal(many[2][0], many[3][0])  # the weights do change the ranking of this toy
    ranked = model.topk_many(history, 10, settings, block, scores=False)  # ranking only: no normaliser
    assert all(torch.equal(r, m[0]) and s is None for (r, s), m in zip(ranked, many))
    assert torch.equal(model.recommend(history, 10, "slow", block, 0.1), many[2][0])
    batches = [(history[:9], target[:9]), (history[9:], target[9:])]
    found = evaluate_variants(model, batches, [5, 10], None, {str(i): kw for i, kw in enumerate(settings)})
    for i, kw in enumerate(settings):
        alone = evaluate_model(model, batches, [5, 10], **kw)
        assert {m: found[str(i)][m] for m in ("recall@5", "ndcg@10", "users")} == \
            {m: alone[m] for m in ("recall@5", "ndcg@10", "users")}


def test_ar_decodes_only_existing_paths_and_scores_match_teacher_forcing():
    torch.manual_seed(0)
    # 3 x 4 x 5 = 60 possible codes, 30 items: an unconstrained decoder would often produce codes nobody has.
    codes = np.array([[i % 3, (i // 3) % 4, (i * 7) % 5] for i in range(N)])
    model = build_model("car", small_cfg(mode="ar"), N, make_sids(codes, [3, 4, 5])).eval()
    history = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 9]])
    result = model.beam_search(history, beam_width=6)
    assert result.valid.all()
    items = result.codes[..., -1]  # (B, W): the last decoded token is the item id
    full = torch.cat([torch.as_tensor(codes)[items - 1], items[..., None]], dim=-1)
    assert torch.equal(result.codes, full)  # every decoded path is [codes of an item, that item]
    assert all(len(set(r.tolist())) == 6 for r in items)
    # The cached incremental decode (with fusion) gives the same log-probability as a full teacher-forced pass.
    for b in range(3):
        for w in (0, 5):
            seq = torch.cat([history[b], items[b, w: w + 1]])[None]
            hh = model.encode(seq, model.cfg.max_history + 1 - seq.shape[1])[0, -2:]  # (2, L+1, D)
            tok = full[b, w]
            lp = model.sid_logits(hh[0, -1], 0).log_softmax(-1)[tok[0]]
            lp = lp + sum(model.sid_logits(hh[1, l - 1], l).log_softmax(-1)[tok[l]] for l in (1, 2))
            lp = lp + model.uid_logits(hh[1, 2]).log_softmax(-1)[tok[3]]
            torch.testing.assert_close(result.scores[b, w], lp, rtol=1e-4, atol=1e-4)
    rec = model.recommend(history, 4, beam_width=6)
    assert torch.equal(rec, items[:, :4])


# ----- learning -----

@pytest.mark.parametrize("mode", ["car", "ar"])
def test_learns_the_successor_toy_and_beats_most_popular(mode, gen):
    torch.manual_seed(0)
    model = toy_model(mode=mode)
    losses = train_steps(model, N, steps=150)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    batches = [successor_batch(N, 64, 6, gen) for _ in range(3)]
    pop = MostPopular.fit([b[0][i][b[0][i] > 0].tolist() for b in batches for i in range(64)], N)
    base = evaluate_model(pop, batches, ks=(1, 5))
    for kwargs in ([{"inference": "fast"}, {"inference": "slow"}] if mode == "car" else [{"beam_width": 10}]):
        ours = evaluate_model(model, batches, ks=(1, 5), **kwargs)
        assert ours["recall@5"] > 0.9, kwargs
        assert ours["recall@5"] > base["recall@5"] + 0.5, kwargs


# ----- config -----

def test_config_section_levels_and_dedup():
    cfg = load_config(None, ["model.car.inference=slow", "model.car.mode=ar", "model.car.alpha=0.25",
                             "model.car.fusion=none"])
    assert (cfg.model.car.inference, cfg.model.car.mode, cfg.model.car.alpha) == ("slow", "ar", 0.25)
    dedup = make_sids(np.concatenate([TOY_CODES, np.arange(N)[:, None] % 3], axis=1), [3, 4, 3])
    dedup.manifest["dedup"] = True
    assert build_model("car", small_cfg(), N, dedup).num_levels == 2  # the appended de-dup level is dropped
    assert build_model("car", small_cfg(drop_dedup_level=False), N, dedup).num_levels == 3
    assert build_model("car", small_cfg(levels=1), N, dedup).num_levels == 1
    with pytest.raises(ValueError, match="levels"):
        build_model("car", small_cfg(levels=4), N, dedup)
    with pytest.raises(ValueError, match="semantic IDs"):
        build_model("car", small_cfg(), N, None)


# ----- ZeRO-3: parameters read only inside their own module (tests/models/test_zero3_access.py's simulation) -----

@pytest.mark.parametrize("kw", [{}, {"inference": "slow"}, {"uid_loss": "sampled", "num_negatives": 4},
                                {"uid_loss": "in_batch", "tie_embeddings": False}, {"mode": "ar", "beam_width": 4}])
def test_parameters_are_read_only_inside_their_module(kw, gen):
    from test_zero3_access import assert_same_under_partition

    torch.manual_seed(0)
    model = toy_model(**kw).eval()
    assert_same_under_partition(model, N, 4, gen)


def test_auto_uid_loss_switches_to_sampled_above_the_threshold():
    assert toy_model().uid_loss == "full"  # 30 items, default threshold 100k
    assert toy_model(full_softmax_max_items=N).uid_loss == "full"
    model = toy_model(full_softmax_max_items=N - 1, num_negatives=4)
    assert model.uid_loss == "sampled"
    history, target = successor_batch(N, 8, 6, torch.Generator().manual_seed(0))
    assert torch.isfinite(model(history, target)["loss"])
