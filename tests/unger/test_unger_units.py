"""UNGER pieces on hand-computed cases: AdaLN (Eq. 2), the InfoNCE of CKA (Eq. 3) and IKD (Eq. 11) with its target
lookup, the IKD token leaving TIGER's generation path untouched, the ablation embeddings and the modality share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec_dist.data.semantic_ids import SemanticIds
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.tiger import Tiger
from tokenization.unger_stage1 import AdaLN, DINStage1, ModalityAdapter, info_nce
from tokenization.unger import concat_embeddings, modality_share, pca


pytestmark = pytest.mark.usefixtures("one_thread")


def _sids(n=12, emb_dim=5, seed=0):
    rng = np.random.default_rng(seed)
    body = np.stack([np.arange(n) % 3, (np.arange(n) // 3) % 4, np.zeros(n, np.int64)], 1)  # unique (3x4 = 12)
    codes = np.concatenate([np.zeros((1, 3), np.int64), body])
    emb = rng.normal(size=(n + 1, emb_dim)).astype(np.float32)
    emb[0] = 0
    return SemanticIds(codes, [3, 4, 1], {"dedup": True}, item_embeddings=emb)


def _unger(sids, **over):
    cfg = ModelConfig()
    for k, v in {"d_model": 16, "n_heads": 2, "head_dim": 8, "d_ff": 32, **over}.items():
        setattr(cfg.unger, k, v)
    torch.manual_seed(0)
    return build_model("unger", cfg, sids.num_items, sids).eval()


# ----- AdaLN -----
def test_adaln_starts_as_layernorm_and_conditions_on_its_input():
    x = torch.randn(4, 6)
    ada = AdaLN(6)
    assert torch.allclose(ada(x), F.layer_norm(x, (6,), eps=1e-6), atol=1e-6)
    w, b = torch.randn(12, 6), torch.randn(12)
    with torch.no_grad():
        ada.mod.weight.copy_(w)
        ada.mod.bias.copy_(b)
    gamma, beta = (x @ w.T + b).chunk(2, dim=-1)  # scale and shift computed from x itself
    want = (1 + gamma) * F.layer_norm(x, (6,), eps=1e-6) + beta
    assert torch.allclose(ada(x), want, atol=1e-5)
    # Two inputs with the same normalised value but different scale get different outputs (unlike LayerNorm).
    assert not torch.allclose(ada(x[:1]), ada(3 * x[:1]), atol=1e-4)
    assert torch.allclose(F.layer_norm(x[:1], (6,), eps=1e-6), F.layer_norm(3 * x[:1], (6,), eps=1e-6), atol=1e-4)


def test_modality_adapter_maps_to_the_collaborative_width():
    mal = ModalityAdapter(10, 4)
    assert mal(torch.randn(7, 10)).shape == (7, 4)


# ----- InfoNCE (CKA, Eq. 3) -----
def test_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # dot, tau 1: logits = identity -> each row -log(e / (e + 1)) = log(1 + e^-1)
    assert info_nce(a, a, 1.0, "dot").item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # tau 0.5 doubles the logits
    assert info_nce(a, a, 0.5, "dot").item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # cosine ignores the scale; swapped positives are the worst case
    assert info_nce(5 * a, a, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert info_nce(a, a.flip(0), 1.0).item() == pytest.approx(math.log(1 + math.exp(1)), rel=1e-6)
    p = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    logits = a @ p.T / 0.3
    want = -(logits.log_softmax(1).diagonal()).mean()
    assert info_nce(a, p, 0.3, "dot").item() == pytest.approx(want.item(), rel=1e-6)


def test_din_stage1_losses_and_cka_switch():
    torch.manual_seed(0)
    sem = torch.randn(21, 7)
    hist = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    tgt = torch.tensor([5, 5])  # a duplicate target: one CKA row, not its own negative
    m = DINStage1(20, sem, dim=8, num_negatives=6, attention_hidden=(8,))
    out = m(hist, tgt)
    assert set(out) == {"loss", "next_item", "cka"}
    # one unique item -> a single-row InfoNCE: log(1) = 0
    assert out["cka"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["next_item"].item(), rel=1e-5)
    m0 = DINStage1(20, sem, dim=8, num_negatives=6, attention_hidden=(8,), cka_weight=0.0)
    assert "cka" not in m0(hist, torch.tensor([5, 6]))
    # padding never changes the user vector: a history with extra leading zeros scores the same
    s1 = m.scores(torch.tensor([[3, 4]]), torch.tensor([[5, 6]]))
    s2 = m.scores(torch.tensor([[0, 0, 3, 4]]), torch.tensor([[5, 6]]))
    assert torch.allclose(s1, s2, atol=1e-6)
    assert m.embeddings("collab").shape == (21, 8) and m.embeddings("adapted").shape == (21, 8)


# ----- IKD (Eq. 11) -----
def test_ikd_target_lookup_hand_computed():
    sids = _sids()
    m = _unger(sids, ikd_temperature=0.5)
    target = torch.tensor([3, 7])
    e = F.normalize(torch.from_numpy(sids.item_embeddings), dim=-1)
    z = torch.randn(2, 5)
    logits = F.normalize(z, dim=-1) @ e[1:].T / 0.5  # (2, 12): column j = item j + 1
    want = -(logits.log_softmax(1)[0, 2] + logits.log_softmax(1)[1, 6]) / 2
    assert m.ikd_loss(z, target).item() == pytest.approx(want.item(), rel=1e-5)
    # the target's own integrated embedding is the best query; another item's is worse
    good = m.ikd_loss(e[target] * 3, target).item()
    bad = m.ikd_loss(e[torch.tensor([4, 8])], target).item()
    assert good < bad


def test_ikd_sampled_negatives_mask_accidental_hits():
    sids = _sids()
    m = _unger(sids, ikd_negatives=200)  # 200 draws from 12 items: the target is drawn, masked
    target = torch.tensor([3])
    e = F.normalize(torch.from_numpy(sids.item_embeddings), dim=-1)
    torch.manual_seed(1)
    loss = m.ikd_loss(e[target], target)
    assert torch.isfinite(loss) and loss.item() > 0


def test_ikd_token_leaves_generation_as_tiger():
    sids = _sids()
    m = _unger(sids)
    hist = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([8, 9])
    out = m(hist, tgt)
    assert set(out) >= {"loss", "rec", "ikd", "ce_level_0"}
    tiger_loss = Tiger.forward(m, hist, tgt)["loss"]  # same weights, decoder input without the IKD token
    assert out["rec"].item() == pytest.approx(tiger_loss.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["rec"].item() + out["ikd"].item(), rel=1e-5)
    out["loss"].backward()
    assert m.ikd_token.grad is not None and m.ikd_token.grad.abs().sum() > 0
    rec = m.recommend(hist, 5)
    assert rec.shape == (2, 5) and all(len(set(r.tolist())) == 5 for r in rec)


def test_ikd_needs_integrated_embeddings_unless_off():
    sids = _sids()
    plain = SemanticIds(sids.codes, sids.codebook_sizes, {})
    with pytest.raises(ValueError, match="integrated embeddings"):
        _unger(plain)
    m = _unger(plain, ikd_weight=0.0)  # the "CKA only" ablation: TIGER over unified codes
    out = m(torch.tensor([[1, 2]]), torch.tensor([3]))
    assert "ikd" not in out and out["rec"].item() == pytest.approx(out["loss"].item())


# ----- ablation embeddings and the modality share (§4.3, Eq. 18-19) -----
def test_concat_is_pca_plus_collab_each_normalised():
    rng = np.random.default_rng(0)
    sem, col = rng.normal(size=(40, 10)), rng.normal(size=(40, 4))
    cat = concat_embeddings(sem, col)
    assert cat.shape == (40, 8)
    assert np.allclose(np.linalg.norm(cat[:, :4], axis=1), 1, atol=1e-5)
    assert np.allclose(cat[:, 4:], col / np.linalg.norm(col, axis=1, keepdims=True), atol=1e-5)
    p = pca(sem, 4)  # principal components: uncorrelated, decreasing variance
    cov = np.cov(p.T)
    assert np.allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-4) and np.all(np.diff(np.diag(cov)) <= 1e-6)


def test_modality_share_points_at_the_modality_the_embedding_copies():
    rng = np.random.default_rng(0)
    sem, col = rng.normal(size=(60, 12)), rng.normal(size=(60, 5))
    s = modality_share(sem + 0.01 * rng.normal(size=sem.shape), sem, col, sample=60)
    assert s["share_semantic"] > 0.9 and s["share_semantic"] + s["share_collab"] == pytest.approx(1.0)
    c = modality_share(col * 2.0, sem, col, sample=60)
    assert c["share_collab"] > 0.9
    mix = modality_share(np.concatenate([sem / 3, col], 1), sem, col, sample=60)
    assert 0.0 < mix["share_semantic"] < 1.0 and mix["kl_semantic"] > 0 and mix["kl_collab"] > 0


def test_din_attention_unit_equals_the_concatenated_form():
    torch.manual_seed(0)
    m = DINStage1(20, torch.randn(21, 7), dim=8, attention_hidden=(8, 4))
    hist, cand = torch.tensor([[0, 3, 4, 9]]), torch.tensor([[5, 6, 7]])
    h, c = m.item(hist)[:, None].expand(-1, 3, -1, -1), m.item(cand)[:, :, None].expand(-1, -1, 4, -1)
    w = m.attention(torch.cat([h, c, h - c, h * c], -1)).squeeze(-1) * (hist != 0)[:, None]  # DIN's unit as written
    want = m.user((w[..., None] * h).sum(2))
    assert torch.allclose(m.user_for(hist, cand), want, atol=1e-5)


def test_bf16_model_gives_float32_finite_losses():
    m = _unger(_sids()).to(torch.bfloat16).train()  # as DeepSpeed runs it on GPU (buffers cast too)
    out = m(torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([6, 7]))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]) and torch.isfinite(out["ikd"])


# ----- Stage I's streamed examples -----

def test_stage1_batches_stream_every_training_example_once_per_epoch(tiny_cfg, tiny_dataset):
    """Stage I reads its examples as training does (chunks of train.chunk_rows users, shuffled within windows of
    train.shuffle_buffer examples), so it never holds all of them: one epoch of batches is the in-memory examples,
    each once (less the rows that do not fill a batch), in an order that moves with the seed."""
    import copy
    from collections import Counter

    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.examples import train_examples
    from genrec_dist.errors import ConfigError
    from tokenization.unger import din_batches

    ds = Dataset.open(tiny_dataset)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.chunk_rows, cfg.train.shuffle_buffer, cfg.tokenize.unger.batch_size = 16, 300, 64
    whole = train_examples(ds.sequences(), 20)
    n, batches = din_batches(cfg, ds, 20)
    assert n == len(whole) > 4 * 64
    epoch = [next(batches) for _ in range(n // 64)]
    assert all(b.history.shape == (64, 20) for b in epoch)

    def rows(history, target):
        return Counter(map(tuple, np.concatenate([history, target[:, None]], 1).tolist()))

    got = rows(np.concatenate([b.history for b in epoch]), np.concatenate([b.target for b in epoch]))
    want = rows(whole.history, whole.target)
    # each example once (as often as it occurs), less the rows of the last partial batch
    assert not got - want and (want - got).total() == n - len(epoch) * 64
    # the order is shuffled (not storage order) and keyed by the seed
    assert not np.array_equal(epoch[0].target, whole.target[:64])
    cfg.seed += 1
    assert not np.array_equal(next(din_batches(cfg, ds, 20)[1]).target, epoch[0].target)

    cfg.tokenize.unger.batch_size = n + 1
    with pytest.raises(ConfigError, match="tokenize.unger.batch_size"):
        din_batches(cfg, ds, 20)
