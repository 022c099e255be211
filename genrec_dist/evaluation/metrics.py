"""Leave-one-out ranking metrics with one relevant item per user (TIGER §4.1, UNGER §4.1.1).

With a single relevant item, Recall@k is a hit indicator (= HR@k) and NDCG@k = 1 / log2(rank + 1) for a 1-based
rank <= k (the ideal DCG is 1), else 0.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch


def recall_ndcg(
    ranked: torch.Tensor,
    target: torch.Tensor,
    ks: Sequence[int],
    reduce: Literal["mean", "sum", "none"] = "mean",
) -> dict[str, float | torch.Tensor]:
    """``ranked`` (B, K) item ids best first (0 = empty slot, never a hit), ``target`` (B,) -> ``{"recall@k",
    "ndcg@k"}`` for every k in ``ks``: the mean over users (``reduce="mean"``), the sum (to add up over batches), or
    per-user tensors (B,) (``"none"``)."""
    if ranked.dim() != 2 or target.dim() != 1 or ranked.shape[0] != target.shape[0]:
        raise ValueError(f"expected ranked (B, K) and target (B,), got {tuple(ranked.shape)} and {tuple(target.shape)}")
    if any(k < 1 or k > ranked.shape[1] for k in ks):
        raise ValueError(f"every k in {list(ks)} must be in 1..{ranked.shape[1]} (the length of the ranked lists)")
    hit = (ranked == target[:, None].to(ranked.device)) & (ranked != 0)  # (B, K)
    found = hit.any(dim=1)
    rank = hit.float().argmax(dim=1)  # (B,) 0-based position of the first hit (0 when none; masked by `found`)
    gain = 1.0 / torch.log2(rank.double() + 2.0)
    out: dict[str, float | torch.Tensor] = {}
    for k in ks:
        within = found & (rank < k)
        for name, value in (("recall", within.double()), ("ndcg", within.double() * gain)):
            if reduce == "none":
                out[f"{name}@{k}"] = value
            elif reduce == "sum":
                out[f"{name}@{k}"] = float(value.sum())
            else:
                out[f"{name}@{k}"] = float(value.mean()) if len(value) else 0.0
    return out
