"""Most-popular baseline: every user gets the k items seen most often in training. Any learned model must beat it."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MostPopular(nn.Module):
    """Same API as the models: ``topk(history (B, T), k) -> (items (B, k), counts (B, k))`` and ``recommend`` (its
    items); ties broken by lower id."""

    def __init__(self, counts: np.ndarray | torch.Tensor):
        super().__init__()
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)  # (N+1,), index 0 = padding
        if counts.dim() != 1 or counts.shape[0] < 1:
            raise ValueError(f"counts must be 1-D (num_items + 1,), got shape {tuple(counts.shape)}")
        counts = counts.clone()
        counts[0] = -1.0  # padding is never recommended
        # Stable order: descending count, then ascending item id.
        order = torch.from_numpy(np.lexsort((np.arange(len(counts)), -counts.numpy())).copy())
        self.num_items = int(counts.shape[0]) - 1
        self.register_buffer("ranking", order[: self.num_items])  # (N,) best first
        self.register_buffer("counts", counts)  # (N+1,) the score topk() reports

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], num_items: int) -> "MostPopular":
        """Count item occurrences over training sequences (lists of item ids 1..num_items)."""
        counts = np.zeros(num_items + 1, dtype=np.int64)
        for seq in sequences:
            ids = np.asarray(seq, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() > num_items):
                raise ValueError(f"item id outside 0..{num_items} in a training sequence: {ids.min()}..{ids.max()}")
            np.add.at(counts, ids, 1)
        counts[0] = 0
        return cls(counts)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.zeros((), device=self.ranking.device)}  # nothing to train

    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most popular items (B, k) and their training counts as scores (B, k); 0 / -inf past the catalog."""
        top = self.ranking[:k]
        scores = self.counts[top].float()
        if top.shape[0] < k:
            top = F.pad(top, (0, k - top.shape[0]))
            scores = F.pad(scores, (0, k - scores.shape[0]), value=float("-inf"))
        b = history.shape[0]
        return (top[None, :].expand(b, k).to(history.device), scores[None, :].expand(b, k).to(history.device))

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int) -> torch.Tensor:
        return self.topk(history, k)[0]
