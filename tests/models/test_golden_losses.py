"""Golden losses: the first 10 training losses of a tiny SASRec (per prefix and at every position), CAR, CAR's AR
ablation, TIGER and UNGER at a fixed seed, on one CPU thread, pinned to the values the code gave when they were
recorded. A refactor that changes a model's initialisation, forward pass or loss by more than float noise fails here.
Re-record only for an intended change. One padded batch (``length_group_rows=0``): with dropout on, length groups draw
other dropout masks; that they compute the same step is tests/models/test_length_groups.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec_dist.models import ModelConfig, build_model
from genrec_dist.data.semantic_ids import SemanticIds
from genrec_dist.models.config import CARConfig, SASRecConfig, TigerConfig, UngerConfig

from toys import make_sids, train_steps

NUM_ITEMS = 30
STEPS = 10

GOLDEN = {
    "car": [4.659005, 4.676665, 4.640434, 4.611148, 4.607701, 4.549675, 4.620619, 4.573175, 4.550316, 4.49402],
    "car_ar": [1.966893, 1.961633, 1.939688, 1.946327, 1.943758, 1.910959, 1.920625, 1.90654, 1.889639, 1.870462],
    "tiger": [1.213187, 1.252851, 1.227631, 1.25272, 1.21996, 1.22096, 1.235858, 1.223247, 1.221294, 1.164258],
    "unger": [7.702513, 12.203652, 8.208669, 8.098471, 8.058671, 7.015378, 7.15289, 7.704913, 9.44846, 6.897132],
    "sasrec": [3.449927, 3.34934, 3.370234, 3.340855, 3.321253, 3.245934, 3.291531, 3.25911, 3.221904, 3.184968],
    "sasrec_all": [3.440392, 3.343371, 3.330934, 3.307248, 3.243436, 3.209824, 3.197412, 3.195276, 3.150803, 3.128558],
}


def _sids():
    # two colliding levels: 12 distinct codes for 30 items
    return make_sids(np.array([[i % 3, i % 4] for i in range(NUM_ITEMS)]), [3, 4])


def _model(which: str) -> torch.nn.Module:
    if which.startswith("sasrec"):  # sasrec: the last position only (per prefix); sasrec_all: every position
        cfg = ModelConfig(sasrec=SASRecConfig(d_model=16, n_heads=1, n_layers=1, d_ff=16, dropout=0.1,
                                              max_history=6, all_positions=which == "sasrec_all", length_group_rows=0))
        return build_model("sasrec", cfg, NUM_ITEMS)
    if which == "tiger":
        cfg = ModelConfig(tiger=TigerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1,
                                            decoder_layers=1, dropout=0.1, max_history=6, length_group_rows=0))
        return build_model("tiger", cfg, NUM_ITEMS, _sids())
    if which == "unger":  # with its IKD term: the item embeddings a unified code carries
        sids = _sids()
        emb = np.random.default_rng(1).normal(size=(NUM_ITEMS + 1, 6)).astype(np.float32)
        cfg = ModelConfig(unger=UngerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1,
                                            decoder_layers=1, dropout=0.1, max_history=6, length_group_rows=0))
        return build_model("unger", cfg, NUM_ITEMS, SemanticIds(sids.codes, sids.codebook_sizes, {},
                                                                item_embeddings=emb))
    mode = "ar" if which == "car_ar" else "car"
    cfg = ModelConfig(car=CARConfig(mode=mode, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.1,
                                    max_history=6, length_group_rows=0))
    return build_model("car", cfg, NUM_ITEMS, _sids())


def _losses(which: str) -> list[float]:
    torch.manual_seed(1234)
    model = _model(which)
    # successor histories [s, s+1, ...] of up to 6 items, left-padded; the target is the next item
    return train_steps(model, NUM_ITEMS, STEPS, batch=16, max_len=6, lr=3e-3, seed=7)


@pytest.mark.parametrize("which", sorted(GOLDEN))
def test_first_losses_are_pinned(which):  # one thread: tests/models/conftest.py
    got = _losses(which)
    assert got == pytest.approx(GOLDEN[which], abs=1e-5), got


if __name__ == "__main__":  # print fresh values to paste above (only for an intended change)
    torch.set_num_threads(1)
    for name in sorted(GOLDEN):
        print(f'    "{name}": {[round(v, 6) for v in _losses(name)]},')
