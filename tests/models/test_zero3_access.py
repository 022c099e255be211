"""ZeRO-3 gathers a module's partitioned parameters only around that module's own forward call. Simulate that
(every parameter is an empty tensor except while its owner runs) and check that training forward and recommend
still run and give the same numbers, i.e. no model reads another module's weight directly."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from genrec_dist.models import ModelConfig, build_model
from genrec_dist.models.config import SASRecConfig, TigerConfig

from toys import make_sids, successor_batch

N = 20


@contextlib.contextmanager
def partitioned(model: torch.nn.Module):
    real = {p: p.data for p in model.parameters()}

    def release(module, *_):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    def gather(module, *_):
        for p in module.parameters(recurse=False):
            p.data = real[p]

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(gather), m.register_forward_hook(release)]
        release(m)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, data in real.items():
            p.data = data


def assert_same_under_partition(model: torch.nn.Module, num_items: int, k: int, gen: torch.Generator) -> None:
    """Loss and recommendations of ``model`` are identical with and without the simulated ZeRO-3 partitioning."""
    history, target = successor_batch(num_items, 4, 5, gen)
    with torch.no_grad():
        torch.manual_seed(1)
        loss = model(history, target)["loss"]
        rec = model.recommend(history, k)
        with partitioned(model):
            torch.manual_seed(1)
            loss_z3 = model(history, target)["loss"]
            rec_z3 = model.recommend(history, k)
    torch.testing.assert_close(loss, loss_z3)
    assert torch.equal(rec, rec_z3)


def models():
    ids = np.arange(N)
    sids = make_sids(np.stack([ids // 5, ids % 5], axis=1), [4, 5])
    cfg = ModelConfig(
        tiger=TigerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1,
                          max_history=6, beam_width=4),
        sasrec=SASRecConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_history=6, num_negatives=4),
    )
    sampled = ModelConfig(sasrec=SASRecConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, loss="sampled",
                                              num_negatives=4))
    return {"tiger": (cfg, sids), "sasrec": (cfg, None), "sasrec-sampled": (sampled, None)}


@pytest.mark.parametrize("name", ["tiger", "sasrec", "sasrec-sampled"])
def test_parameters_are_read_only_inside_their_module(name, gen):
    cfg, sids = models()[name]
    torch.manual_seed(0)
    model = build_model(name.split("-")[0], cfg, N, sids).eval()
    assert_same_under_partition(model, N, 5, gen)
