"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): causal self-attention over item
ids; the last position's state scores every item through the (tied) item embedding table.

Loss: full-softmax cross-entropy over the catalog by default. The paper trains with binary cross-entropy against one
sampled negative per position, which is what TIGER's table quotes (Beauty R@10 0.0605); CE over all items is much
stronger on the same data (docs/results.md has the numbers), because every item is pushed down at
every step instead of one random item. ``loss: sampled`` (uniform negatives shared across the batch, accidental
hits masked) keeps the cost independent of the catalog size for very large catalogs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec_dist.errors import ConfigError
from genrec_dist.models.blocks import (PositionalEmbedding, TiedEmbedding, TransformerStack, attention_mask,
                                       init_weights)
from genrec_dist.models.config import SASRecConfig
from genrec_dist.models.ranking import blockwise_topk, full_or_sampled


class SASRec(nn.Module):
    """``forward(history (B, T), target (B,)) -> {"loss"}``; ``recommend(history, k) -> (B, k)`` item ids.

    ``history`` holds item ids 1..num_items, left-padded with 0, most recent last; histories longer than
    ``cfg.max_history`` keep their last ``max_history`` items.
    """

    def __init__(self, cfg: SASRecConfig, num_items: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"SASRec needs at least one item, got num_items={num_items}")
        self.loss = full_or_sampled(cfg.loss, num_items, cfg.full_softmax_max_items, "softmax")
        if self.loss == "sampled" and cfg.num_negatives < 1:
            raise ConfigError(f"model.sasrec.num_negatives must be >= 1 for sampled softmax, got {cfg.num_negatives}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_emb = TiedEmbedding(num_items + 1, cfg.d_model, padding_idx=0)  # input and output table
        self.pos_emb = PositionalEmbedding(cfg.max_history, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = TransformerStack(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout)
        init_weights(self)

    def hidden(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) item ids -> (B, D) state of the most recent position."""
        history = history[:, -self.cfg.max_history:]
        b, t = history.shape
        # Item embeddings scaled by sqrt(d) as in the authors' code; learned positions (SASRec §III), right-aligned
        # so the most recent item always has the same position whatever the padding.
        x = self.item_emb(history) * self.cfg.d_model ** 0.5 + self.pos_emb(t, self.cfg.max_history - t)  # (B, T, D)
        valid = history != 0
        x = self.drop(x * valid[..., None])
        h = self.blocks(x, mask=attention_mask(valid, causal=t))  # (B, T, D)
        return h[:, -1]

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """(B, num_items + 1) scores; column 0 (padding) is -inf."""
        logits = self.item_emb.scores(self.hidden(history))  # (B, N+1)
        logits[:, 0] = float("-inf")
        return logits

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.loss == "softmax":
            # float32 softmax even when the model runs in bf16 (DeepSpeed on GPU)
            return {"loss": F.cross_entropy(self.scores(history).float(), target)}
        h = self.hidden(history)  # (B, D)
        neg = torch.randint(1, self.num_items + 1, (self.cfg.num_negatives,), device=h.device)  # (n,)
        pos_logit = (h * self.item_emb(target)).sum(-1, keepdim=True)  # (B, 1)
        neg_logit = h @ self.item_emb(neg).T  # (B, n)
        neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], float("-inf"))  # accidental hits
        logits = torch.cat([pos_logit, neg_logit], dim=1)  # (B, 1 + n), the target is column 0
        return {"loss": F.cross_entropy(logits.float(), torch.zeros_like(target))}

    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k highest-scoring items (B, k) and their logits (B, k), best first (lower id first on ties); 0 / -inf
        where the catalog has fewer than k items. The catalog is scored ``block`` items at a time
        (:func:`~genrec_dist.models.ranking.blockwise_topk`), never as one (B, N) matrix."""
        h = self.hidden(history)  # (B, D)
        return blockwise_topk(lambda lo, hi: self.item_emb.scores(h, lo, hi), self.num_items, k, h.shape[0],
                              h.device, block)

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
        """The k highest-scoring items (B, k), best first; 0 where the catalog has fewer than k items."""
        return self.topk(history, k, block)[0]
