"""Toy data for model tests (imported as ``toys``: pytest puts tests/models on sys.path): a cyclic catalog where
item i is always followed by item i+1, and semantic IDs with chosen collisions."""

from __future__ import annotations

import numpy as np
import torch

from genrec_dist.data.semantic_ids import SemanticIds


def successor_batch(num_items: int, batch: int, max_len: int, generator: torch.Generator):
    """Histories [s, s+1, ..., s+t-1] (cyclic over 1..num_items), left-padded to max_len; target = the next item."""
    start = torch.randint(0, num_items, (batch,), generator=generator)
    length = torch.randint(1, max_len + 1, (batch,), generator=generator)
    pos = torch.arange(max_len)[None, :] - (max_len - length[:, None])  # (B, T), < 0 on padding
    items = (start[:, None] + pos) % num_items + 1
    history = torch.where(pos >= 0, items, torch.zeros_like(items))
    target = (start + length) % num_items + 1
    return history, target


def train_steps(model, num_items: int, steps: int, batch: int = 64, max_len: int = 6, lr: float = 3e-3,
                seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        history, target = successor_batch(num_items, batch, max_len, gen)
        loss = model(history, target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def make_sids(codes: np.ndarray, codebook_sizes: list[int]) -> SemanticIds:
    """SemanticIds from (N, L) codes of items 1..N (a zero padding row is prepended)."""
    codes = np.asarray(codes, dtype=np.int64)
    full = np.concatenate([np.zeros((1, codes.shape[1]), dtype=np.int64), codes])
    return SemanticIds(codes=full, codebook_sizes=list(codebook_sizes), manifest={})


def toy_vs_most_popular(model, num_items: int, generator: torch.Generator, ks=(1, 5)) -> tuple[dict, dict]:
    """Metrics of ``model`` and of most-popular (fit on the same histories) on 3 successor batches of 64 users."""
    from genrec_dist.evaluation.evaluate import MostPopular, evaluate_model

    batches = [successor_batch(num_items, 64, 6, generator) for _ in range(3)]
    pop = MostPopular.fit([b[0][i][b[0][i] > 0].tolist() for b in batches for i in range(64)], num_items)
    return evaluate_model(model, batches, ks=ks), evaluate_model(pop, batches, ks=ks)
