"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): causal self-attention over item
ids; a position's state scores every item through the (tied) item embedding table.

Training (``all_positions``, the default): one causal pass over a window of items and a loss at every position that
has a next item, as SASRec §III-E trains (position t predicts item t+1); ``train.examples: auto`` then feeds
non-overlapping windows, so each transition is trained once per epoch in ~1/mean-length the passes of one example
per prefix. ``all_positions: false`` keeps the loss of the last position only.

Loss: full-softmax cross-entropy over the catalog by default. The paper trains with binary cross-entropy against one
sampled negative per position, which is what TIGER's table quotes (Beauty R@10 0.0605); CE over all items is much
stronger on the same data (docs/results.md has the numbers), because every item is pushed down at
every step instead of one random item. ``loss: sampled`` scores the target against ``num_negatives`` uniform
negatives (accidental hits masked), drawn for every position (``negatives: position``, eSASRec's SASRec + sampled
softmax, Tikhonovich et al. RecSys 2025) or once per batch (``negatives: batch``): its cost does not grow with the
catalog.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec_dist.errors import ConfigError
from genrec_dist.models.blocks import (PositionalEmbedding, TokenTable, TransformerStack, attention_mask,
                                       by_length, init_weights)
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
        self.item_emb = TokenTable(num_items + 1, cfg.d_model, padding_idx=0)  # input and output table
        self.pos_emb = PositionalEmbedding(cfg.max_history, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = TransformerStack(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout)
        init_weights(self)

    def hidden_all(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) item ids -> (B, T, D) states; position t has seen items ..t only (causal)."""
        history = history[:, -self.cfg.max_history:]
        b, t = history.shape
        valid = history != 0
        if self.cfg.positions == "from_start":  # position = index among the row's items (padding: 0, masked)
            pos = self.pos_emb(t, index=(valid.cumsum(1) - 1).clamp(min=0))  # (B, T, D)
        else:  # right-aligned, so the most recent item always has the same position whatever the padding
            pos = self.pos_emb(t, self.cfg.max_history - t)  # (T, D)
        # Item embeddings scaled by sqrt(d) as in the authors' code; learned positions (SASRec §III-B).
        x = self.item_emb(history) * self.cfg.d_model ** 0.5 + pos  # (B, T, D)
        x = self.drop(x * valid[..., None])
        return self.blocks(x, mask=attention_mask(valid, causal=t))  # (B, T, D)

    def hidden(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) item ids -> (B, D) state of the most recent position."""
        return self.hidden_all(history)[:, -1]

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """(B, num_items + 1) scores; column 0 (padding) is -inf."""
        logits = self.item_emb.scores(self.hidden(history))  # (B, N+1)
        logits[:, 0] = float("-inf")
        return logits

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        history = history[:, -self.cfg.max_history:]
        if self.cfg.all_positions:
            # (B, T, D), the rows in length groups (padding columns: zeros, never selected below)
            h = by_length(history, self.cfg.length_group_rows, lambda _, hist: self.hidden_all(hist), per_position=True)
            nxt = torch.cat([history[:, 1:], target[:, None]], dim=1)  # (B, T) the item each position predicts
            valid = (history != 0) & (nxt != 0)
            h, y = h[valid], nxt[valid]  # (M, D), (M,): only positions with a real item and a next one
        else:
            h, y = by_length(history, self.cfg.length_group_rows, lambda _, hist: self.hidden(hist)), target  # (B, D)
        if y.numel() == 0:  # no position to train (every history empty): a zero that keeps the graph
            return {"loss": h.sum() * 0.0}
        return {"loss": self._loss(h, y)}

    def _loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of states ``h`` (M, D) for target items ``y`` (M,)."""
        if self.loss == "softmax":
            logits = self.item_emb.scores(h)  # (M, N+1)
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits.float(), y)  # float32 softmax even when the model runs in bf16
        n = self.cfg.num_negatives
        per_position = self.cfg.negatives == "position"
        neg = torch.randint(1, self.num_items + 1, (y.numel(), n) if per_position else (n,), device=h.device)
        pos_logit = (h * self.item_emb(y)).sum(-1, keepdim=True)  # (M, 1)
        if per_position:
            neg_logit = torch.einsum("md,mnd->mn", h, self.item_emb(neg))  # (M, n)
            hit = neg == y[:, None]
        else:
            neg_logit = h @ self.item_emb(neg).T  # (M, n)
            hit = neg[None, :] == y[:, None]
        neg_logit = neg_logit.masked_fill(hit, float("-inf"))  # accidental hits
        logits = torch.cat([pos_logit, neg_logit], dim=1)  # (M, 1 + n), the target is column 0
        return F.cross_entropy(logits.float(), torch.zeros_like(y))

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
