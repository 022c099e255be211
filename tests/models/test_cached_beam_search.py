"""The cached constrained beam search of TIGER, UNGER and CAR's AR ablation gives the same beams as the reference
that re-runs the model over the whole sequence at every step (reference_decoding.py), at several widths and for padded,
short and over-long histories; and its cache holds what is shared by a user's beams once per user."""

import numpy as np
import pytest
import torch

from genrec_dist.data.semantic_ids import SemanticIds
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.beam_search import BeamResult
from genrec_dist.models.blocks import TransformerStack
from genrec_dist.models.config import CARConfig, TigerConfig, UngerConfig

from reference_decoding import car_ar_beam_search, tiger_beam_search
from toys import make_sids, successor_batch

N = 30
MAX_HISTORY = 8


def _codes() -> np.ndarray:
    """3 levels; items 1-4 share one code, items 10 and 20 another; about a third of the 4x3x5 codes exist."""
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 4, N), rng.integers(0, 3, N), rng.integers(0, 5, N)], axis=1)
    codes[1:4] = codes[0]
    codes[19] = codes[9]
    return codes


def build(kind: str):
    sids = make_sids(_codes(), [4, 3, 5])
    torch.manual_seed(0)
    if kind == "tiger":
        cfg = ModelConfig(tiger=TigerConfig(d_model=32, n_heads=2, head_dim=16, d_ff=64, encoder_layers=1,
                                            decoder_layers=2, dropout=0.0, max_history=MAX_HISTORY))
        return build_model("tiger", cfg, N, sids).eval()
    if kind == "unger":
        emb = np.random.default_rng(1).normal(size=(N + 1, 6)).astype(np.float32)
        sids = SemanticIds(sids.codes, sids.codebook_sizes, {}, item_embeddings=emb)
        cfg = ModelConfig(unger=UngerConfig(d_model=24, n_heads=2, head_dim=12, d_ff=48, encoder_layers=1,
                                            decoder_layers=3, max_history=MAX_HISTORY))
        return build_model("unger", cfg, N, sids).eval()
    cfg = ModelConfig(car=CARConfig(mode="ar", d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0,
                                    max_history=MAX_HISTORY))
    return build_model("car", cfg, N, sids).eval()


def histories() -> torch.Tensor:
    """12 users: fully padded, one item, over-long (10 items > max_history 8), and random left-padded lengths."""
    history, _ = successor_batch(N, 12, 10, torch.Generator().manual_seed(0))
    history[0] = 0
    history[1, :-1] = 0
    history[2] = torch.arange(1, 11)
    return history


def assert_same_beams(got: BeamResult, ref: BeamResult, atol: float = 1e-5) -> None:
    """Same beams in the same order with scores within ``atol``. Beams whose reference scores tie within ``atol``
    may come in either order (a different summation order decides such ties) but must still be the same codes."""
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=atol)
    for u in range(ref.codes.shape[0]):
        for w in torch.nonzero((got.codes[u] != ref.codes[u]).any(-1)).view(-1).tolist():
            tied = (ref.scores[u] - ref.scores[u, w]).abs() <= atol
            assert (ref.codes[u][tied] == got.codes[u, w]).all(-1).any(), f"user {u} beam {w} differs"


@pytest.mark.parametrize("kind", ["tiger", "unger", "car-ar"])
def test_cached_beam_search_equals_recompute(kind):
    model = build(kind)
    history = histories()
    for width in (1, 3, 10, 40):
        cached = model.beam_search(history, width)
        ref = (car_ar_beam_search if kind == "car-ar" else tiger_beam_search)(model, history, width)
        assert cached.codes.shape == ref.codes.shape and cached.valid.any()
        assert_same_beams(cached, ref)
        items = model.trie.items_of(cached.leaves, cached.valid, min(width, 10))
        assert torch.equal(items, model.trie.items_of(ref.leaves, ref.valid, min(width, 10))), width
    # Left padding and truncation to max_history change nothing.
    short = history[3:4, -3:]
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    assert_same_beams(model.beam_search(padded, 10), model.beam_search(short, 10))


def _cached_stacks(model, monkeypatch) -> list:
    """Every KVCache the model's transformer stacks hand out, kept for inspection."""
    caches = []
    for stack in (m for m in model.modules() if isinstance(m, TransformerStack)):
        make = stack.new_cache

        def keep(make=make):
            caches.append(make())
            return caches[-1]
        monkeypatch.setattr(stack, "new_cache", keep)
    return caches


def test_car_ar_keeps_the_history_once_per_user(monkeypatch):
    model = build("car-ar")
    caches = _cached_stacks(model, monkeypatch)
    history = histories()
    b, width = history.shape[0], 20
    model.beam_search(history, width)
    (cache,) = caches
    prefix_len = MAX_HISTORY * model.chunk
    for layer in cache.layers:
        assert layer["prefix"]["kt"].shape[0] == b and layer["prefix"]["v"].shape[:3] == (b, 2, prefix_len)
        # per beam: only the next chunk's L tokens fed after the history (the last level's uid is never fed)
        assert layer["self"]["v"].shape[0] == b * width and layer["self"]["v"].shape[2] == model.num_levels
    assert cache.length == prefix_len + model.num_levels


@pytest.mark.parametrize("kind", ["tiger", "unger"])
def test_encoder_keys_values_are_projected_once_per_user(kind, monkeypatch):
    """Cross-attention reads the encoder memory at the user batch size, projected once for the whole search."""
    model = build(kind)
    caches = _cached_stacks(model, monkeypatch)
    rows = []
    hooks = [layer.cross_attn.kv.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for layer in model.decoder.layers]
    history = histories()
    model.beam_search(history, 20)
    for h in hooks:
        h.remove()
    assert rows == [history.shape[0]] * len(model.decoder.layers)  # one projection per layer, one row per user
    (cache,) = caches
    assert all(layer["cross"]["k"].shape[0] == history.shape[0] for layer in cache.layers)
    assert cache.length == model.num_levels  # BOS + the L-1 codes fed per beam
