"""Length groups (``blocks.by_length``, the models' ``length_group_rows``) change what a training step computes, not
what it learns: at dropout 0 the loss and every gradient equal one padded batch's, for every model, at any group size,
including groups of one row, one group of the whole batch, and rows longer than the history the model reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from genrec_dist.data.semantic_ids import SemanticIds
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.blocks import by_length
from genrec_dist.models.config import CARConfig, SASRecConfig, TigerConfig, UngerConfig

from toys import make_sids, successor_batch

N = 40
SIDS = make_sids(np.array([[i % 3, i % 5] for i in range(N)]), [3, 5])
CONFIGS = {
    "sasrec": ("sasrec", SASRecConfig(d_model=16, n_heads=2, n_layers=2, d_ff=16, dropout=0.0, max_history=8)),
    "sasrec_prefix": ("sasrec", SASRecConfig(d_model=16, n_heads=2, n_layers=1, d_ff=16, dropout=0.0, max_history=8,
                                             all_positions=False)),
    "sasrec_from_start": ("sasrec", SASRecConfig(d_model=16, n_heads=1, n_layers=1, d_ff=16, dropout=0.0,
                                                 max_history=8, positions="from_start")),
    "car": ("car", CARConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, max_history=8)),
    "tiger": ("tiger", TigerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=2, decoder_layers=2,
                                   dropout=0.0, max_history=8)),
    "unger": ("unger", UngerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=2,
                                   dropout=0.0, max_history=8)),
}


def _model(which: str, rows: int) -> torch.nn.Module:
    name, section = CONFIGS[which]
    torch.manual_seed(3)
    sids = SIDS
    if name == "unger":  # its IKD term reads item embeddings
        emb = np.random.default_rng(1).normal(size=(N + 1, 6)).astype(np.float32)
        sids = SemanticIds(SIDS.codes, SIDS.codebook_sizes, {}, item_embeddings=emb)
    return build_model(name, ModelConfig(**{name: dataclasses.replace(section, length_group_rows=rows)}), N, sids)


def _loss_and_grads(model, history, target):
    model.train()
    loss = model(history, target)["loss"]
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", sorted(CONFIGS))
@pytest.mark.parametrize("rows", [1, 5, 12, 64])
def test_grouped_step_equals_one_padded_batch(which, rows):
    gen = torch.Generator().manual_seed(11)
    history, target = successor_batch(N, 24, 10, gen)  # lengths 1..10 over a width of 10 (the models read 8)
    want_loss, want = _loss_and_grads(_model(which, 0), history, target)
    got_loss, got = _loss_and_grads(_model(which, rows), history, target)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


def test_by_length_trims_each_run_to_its_longest_row():
    history = torch.tensor([[0, 0, 0, 5], [0, 1, 2, 3], [0, 0, 7, 8], [0, 0, 0, 0]])
    seen = []

    def fn(rows, hist):
        seen.append((sorted(rows.tolist()), hist.shape[1]))
        return hist.float()

    out = by_length(history, 2, fn, per_position=True)  # two rows a group
    # sorted by length: rows 3 (0), 0 (1) | 2 (2), 1 (3); widths 1 and 3
    assert seen == [([0, 3], 1), ([1, 2], 3)]
    assert torch.equal(out, history.float())  # trimmed columns come back as zeros, the rest in place
    rows_out = by_length(history, 1, lambda rows, hist: hist.sum(1))
    assert torch.equal(rows_out, history.sum(1))  # one value per row, back in the input's order
