"""CAR — chunk auto-regressive recommendation with Act-Think fusion (Wang, Gan et al., arXiv 2506.23643).

Every history item becomes a *chunk* ``[sid_1 .. sid_L, uid]``: its semantic-ID tokens ("think") followed by its
item token ("act"). A GPT-2 shaped causal stack (:mod:`~genrec_dist.models.blocks`) reads the chunks flattened to
``(B, T*(L+1))`` tokens, and the hidden state at chunk t's uid token predicts all of chunk t+1 at once. This module
holds the chunk fusion, the backbone and heads (:class:`ChunkBackbone`, shared with the AR ablation in
``car_ar.py``), the act/think losses and fast/slow ranking (:class:`CAR`). Each choice the paper leaves open is a
``model.car`` field; docs/design.md ("CAR") says which and why.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the annotation only: the semantic-ID format pulls in storage, fsspec and Polars
    from genrec_dist.data.semantic_ids import SemanticIds
from genrec_dist.errors import ConfigError
from genrec_dist.models.blocks import (KVCache, PositionalEmbedding, TokenTable, TransformerStack,
                                       attention_mask, by_length, init_weights)
from genrec_dist.models.config import CARConfig
from genrec_dist.models.ranking import blockwise_topk_many, full_or_sampled, logsumexp_blocks

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# chunk layout and fusion (pure functions: tested on exact tensors)
# ----------------------------------------------------------------------------------------------------------------

def chunk_tokens(items: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The chunk layout: item ids (B, T) -> (B, T*(L+1)) tokens ``[c_1(i) .. c_L(i), i]`` per item.

    Codes stay in their own level's range (0..K_l-1) and the last slot holds the item id; the embedding of a slot
    is looked up in that slot's table. Padding items (0) give ``[0 .. 0, 0]`` (masked downstream).
    """
    B, T = items.shape
    chunk = torch.cat([codes[items], items.unsqueeze(-1)], dim=-1)  # (B, T, L+1)
    return chunk.reshape(B, T * chunk.shape[-1])


def fuse_chunks(emb: torch.Tensor, mode: str) -> torch.Tensor:
    """Progressive Act-Think fusion of per-token embeddings (B, T, L+1, D) (last slot = uid, others = SIDs).

    Position k's input = own embedding + the embeddings of think positions 1..k-1 of its chunk, i.e. a cumulative
    sum along the chunk axis (every earlier slot of a chunk is a think slot). ``mean`` divides by the number of
    terms (k); ``sum`` keeps the sum; ``none`` returns ``emb`` unchanged (ablation "w/o F").
    """
    if mode == "none":
        return emb
    fused = emb.cumsum(dim=2)  # (B, T, L+1, D)
    if mode == "sum":
        return fused
    if mode == "mean":
        count = torch.arange(1, emb.shape[2] + 1, device=emb.device, dtype=emb.dtype)
        return fused / count.view(1, 1, -1, 1)
    raise ValueError(f"model.car.fusion must be one of none|sum|mean, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# the chunk backbone CAR and its AR ablation share: tables, positions, causal stack, heads, act loss
# ----------------------------------------------------------------------------------------------------------------

class ChunkBackbone(nn.Module):
    """Items as chunks ``[sid_1 .. sid_L, uid]`` read by a causal transformer, with tied SID and uid heads: what CAR
    (:class:`CAR`) and its AR ablation (:class:`~genrec_dist.models.car_ar.CARAR`) share. ``history`` holds item ids
    1..N left-padded with 0 (most recent last); only the last ``cfg.max_history`` items are read."""

    def __init__(self, cfg: CARConfig, sids: SemanticIds):
        super().__init__()
        codes = np.asarray(sids.codes, dtype=np.int64)  # (N+1, L)
        sizes = [int(k) for k in sids.codebook_sizes]
        if codes.ndim != 2 or codes.shape[1] != len(sizes) or codes.shape[0] < 2:
            raise ValueError(f"CAR needs codes (num_items + 1, {len(sizes)}) with at least one item, got "
                             f"{codes.shape}")
        if cfg.drop_dedup_level and sids.has_dedup_level and len(sizes) > 1:
            codes, sizes = codes[:, :-1], sizes[:-1]  # CAR's uid disambiguates (CAR: its SIDs need not be unique)
        if cfg.levels:
            if not 1 <= cfg.levels <= len(sizes):
                raise ConfigError(f"model.car.levels={cfg.levels} but the semantic IDs have {len(sizes)} levels")
            codes, sizes = codes[:, : cfg.levels], sizes[: cfg.levels]
        self.cfg = cfg
        self.codes_np = codes  # (N+1, L): the levels read (after drop_dedup_level / levels)
        self.num_items = int(codes.shape[0]) - 1
        self.uid_loss = full_or_sampled(cfg.uid_loss, self.num_items, cfg.full_softmax_max_items)
        self.num_levels = len(sizes)
        self.sizes = sizes
        self.chunk = self.num_levels + 1  # tokens per item
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.offsets = [int(o) for o in offsets]
        self.register_buffer("codes", torch.from_numpy(codes.copy()), persistent=False)  # (N+1, L)
        self.register_buffer("sid_tokens", torch.from_numpy(codes + offsets), persistent=False)  # (N+1, L)
        d = cfg.d_model
        # Tables are read only through their own calls (lookup or .scores), never as .weight from here, so ZeRO-3
        # has them gathered (blocks.TokenTable; tests/models/test_car.py simulates the partitioning).
        self.sid_emb = TokenTable(sum(sizes), d)  # think tokens, level l in rows offset_l .. offset_l + K_l
        self.item_emb = TokenTable(self.num_items + 1, d, padding_idx=0)  # act tokens
        # Positions right-aligned on chunk boundaries: the last history chunk always occupies chunk slot
        # max_history - 1 and the next chunk (decoded by the AR ablation) slot max_history.
        self.pos_emb = PositionalEmbedding((cfg.max_history + 1) * self.chunk, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = TransformerStack(cfg.n_layers, d, cfg.n_heads, cfg.d_ff, cfg.dropout)
        if not cfg.tie_embeddings:  # separate output tables (TokenTable for its row lookup + scores calls)
            self.sid_head = TokenTable(sum(sizes), d)
            self.uid_head = TokenTable(self.num_items + 1, d)
        init_weights(self)

    # ----- inputs -----
    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """Item ids (B, T) -> fused chunk embeddings (B, T*(L+1), D) (no positions; padding chunks are zero)."""
        b, t = items.shape
        tokens = chunk_tokens(items, self.sid_tokens).view(b, t, self.chunk)  # (B, T, L+1), sids offset per level
        think = self.sid_emb(tokens[..., :-1])  # (B, T, L, D)
        act = self.item_emb(tokens[..., -1:])  # (B, T, 1, D)
        emb = fuse_chunks(torch.cat([think, act], dim=2), self.cfg.fusion)  # (B, T, L+1, D)
        emb = emb * (items != 0)[:, :, None, None]
        return emb.reshape(b, t * self.chunk, -1)

    def inputs(self, items: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Chunks of ``items`` (B, T) at chunk slots first_slot.. -> the stack's input (B, T*(L+1), D)."""
        n = items.shape[1] * self.chunk
        return self.drop(self.embed(items) + self.pos_emb(n, first_slot * self.chunk))

    def encode(self, items: torch.Tensor, first_slot: int, cache: KVCache | None = None) -> torch.Tensor:
        """Chunks of ``items`` (B, T) at chunk slots first_slot.. -> hidden states (B, T, L+1, D).

        Causal over tokens (so no position sees a later chunk) plus key padding; with ``cache`` the keys/values are
        kept for the AR ablation's incremental decoding.
        """
        b, t = items.shape
        n = t * self.chunk
        x = self.inputs(items, first_slot)  # (B, n, D)
        valid = (items != 0).repeat_interleave(self.chunk, dim=1)  # (B, n)
        h = self.blocks(x, mask=attention_mask(valid, causal=n), cache=cache)  # (B, n, D)
        return h.view(b, t, self.chunk, -1)

    def _history(self, history: torch.Tensor) -> torch.Tensor:
        return history[:, -self.cfg.max_history:]

    # ----- heads (tied to the input tables unless tie_embeddings is off) -----
    def _sid_out(self) -> TokenTable:
        return self.sid_emb if self.cfg.tie_embeddings else self.sid_head

    def _uid_out(self) -> TokenTable:
        return self.item_emb if self.cfg.tie_embeddings else self.uid_head

    def sid_logits_all(self, h: torch.Tensor) -> list[torch.Tensor]:
        """(..., D) -> per level l, (..., K_l) logits (one matmul over all levels' codes, then split)."""
        return list(self._sid_out().scores(h).split(self.sizes, dim=-1))

    def sid_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """(..., D) -> (..., K_level) logits of SID level ``level``."""
        lo = self.offsets[level]
        return self._sid_out().scores(h)[..., lo: lo + self.sizes[level]]

    def uid_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., N+1) item logits; column 0 (padding) is -inf."""
        logits = self._uid_out().scores(h)
        return logits.masked_fill(self._pad_column(logits), NEG_INF)

    @staticmethod
    def _pad_column(logits: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask[0] = True
        return mask

    # ----- act loss -----
    def _uid_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Act loss of states ``h`` (M, D) for target items ``y`` (M,): full, sampled or in-batch softmax."""
        if self.uid_loss == "full":
            return F.cross_entropy(self.uid_logits(h), y)
        if self.uid_loss == "sampled":
            neg = torch.randint(1, self.num_items + 1, (self.cfg.num_negatives,), device=h.device)  # (S,)
            rows = self._uid_out()(torch.cat([y, neg]))  # (M + S, D) output rows of the targets and negatives
            pos_logit = (h * rows[: y.numel()]).sum(-1, keepdim=True)  # (M, 1)
            neg_logit = (h @ rows[y.numel():].T).masked_fill(neg[None, :] == y[:, None], NEG_INF)  # (M, S)
            logits = torch.cat([pos_logit, neg_logit], dim=1)  # the target is column 0
            return F.cross_entropy(logits, torch.zeros_like(y))
        # in_batch: every position's target is a candidate for all; logQ correction by in-batch frequency.
        logits = h @ self._uid_out()(y).T  # (M, M)
        same = y[None, :] == y[:, None]  # (M, M)
        log_q = torch.log(same.sum(0).to(logits.dtype) / y.numel())  # (M,) log share of y_j among the targets
        eye = torch.eye(y.numel(), dtype=torch.bool, device=y.device)
        logits = (logits - log_q[None, :]).masked_fill(same & ~eye, NEG_INF)  # accidental hits
        return F.cross_entropy(logits, torch.arange(y.numel(), device=y.device))


# ----------------------------------------------------------------------------------------------------------------
# CAR
# ----------------------------------------------------------------------------------------------------------------

class CAR(ChunkBackbone):
    """``forward(history (B, T), target (B,)) -> {"loss", "act_loss", "think_loss", "think_loss_level_<l>"}``;
    ``recommend(history, k, inference=None) -> (B, k)`` distinct item ids. ``inference`` overrides
    ``cfg.inference`` (``fast``/``slow``) so one model is evaluated both ways."""

    def __init__(self, cfg: CARConfig, sids: SemanticIds):
        if cfg.mode != "car":
            raise ConfigError(f"model.car.mode={cfg.mode} is the class car_ar.CARAR (build_model picks it)")
        super().__init__(cfg, sids)

    # ----- training -----
    def _think_losses(self, h: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Cross-entropy per SID level for states ``h`` (M, D) predicting the codes of items ``y`` (M,)."""
        codes = self.codes[y]  # (M, L)
        return [F.cross_entropy(logits, codes[:, l]) for l, logits in enumerate(self.sid_logits_all(h))]

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        history = self._history(history)
        t = history.shape[1]
        # (B, T, D) states at the uid tokens, the rows in length groups (padding columns: zeros, never selected)
        h = by_length(history, self.cfg.length_group_rows,
                      lambda _, hist: self.encode(hist, self.cfg.max_history - hist.shape[1])[:, :, -1],
                      per_position=True)
        nxt = torch.cat([history[:, 1:], target[:, None]], dim=1)  # (B, T) the chunk each position predicts
        valid = (history != 0) & (nxt != 0)
        if not self.cfg.all_positions:
            valid = valid & (torch.arange(t, device=history.device) == t - 1)
        hv, y = h[valid], nxt[valid]  # (M, D), (M,)
        if y.numel() == 0:  # no real chunk in the batch: zeros that keep the graph (and the same keys on every rank)
            act, think = h.sum() * 0.0, [h.sum() * 0.0] * self.num_levels
        else:
            act, think = self._uid_loss(hv, y), self._think_losses(hv, y)
        think_mean = torch.stack(think).mean()
        out = {"loss": act + self.cfg.alpha * think_mean, "act_loss": act.detach(), "think_loss": think_mean.detach()}
        out.update({f"think_loss_level_{l}": ce.detach() for l, ce in enumerate(think)})
        return out

    # ----- inference -----
    @property
    def inference_modes(self) -> tuple[str, ...]:
        """The ``recommend(inference=...)`` values evaluation reports separately."""
        return _INFERENCES

    @property
    def validation_choices(self) -> dict[str, tuple[str, list[float]]]:
        """Inference settings chosen on the validation split after training: ``{cfg field: (the inference mode it
        changes, candidates)}``, i.e. slow inference's ``slow_weight`` over ``slow_weight_grid``."""
        if not self.cfg.slow_weight_grid:
            return {}
        return {"slow_weight": ("slow", [float(w) for w in self.cfg.slow_weight_grid])}

    @torch.no_grad()
    def scores(self, history: torch.Tensor, inference: str | None = None) -> torch.Tensor:
        """(B, N+1) item scores of the next chunk (column 0 = -inf): log P(UID=i | H) (fast) or
        log P(UID=i | H) + slow_weight * sum_l log P(S_l = c_l(i) | H) (slow)."""
        inference = inference or self.cfg.inference
        if inference not in _INFERENCES:
            raise ValueError(f"inference must be one of {'|'.join(_INFERENCES)}, got {inference!r}")
        history = self._history(history)
        h = self.encode(history, self.cfg.max_history - history.shape[1])[:, -1, -1]  # (B, D)
        score = self.uid_logits(h).float().log_softmax(dim=-1)  # (B, N+1)
        if inference == "slow":
            score = score + self.cfg.slow_weight * self._sid_path_logp(self._sid_logp_table(h), 0, self.num_items + 1)
        return score

    def _sid_logp_table(self, h: torch.Tensor) -> torch.Tensor:
        """(sum_l K_l, B): log P(S_l = c | H) of every level's codes, one row per think token (``sid_tokens``)."""
        return torch.cat([logits.float().log_softmax(dim=-1) for logits in self.sid_logits_all(h)], dim=1).T \
            .contiguous()

    def _sid_path_logp(self, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """(B, hi - lo): sum_l log P(S_l = c_l(i) | H) of items lo..hi-1, the levels added in order. One
        ``embedding_bag`` over the items' think tokens: ~10x faster than a gather per level at 1M items, and the same
        sums bit for bit."""
        return F.embedding_bag(self.sid_tokens[lo:hi], table, mode="sum").T

    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int, inference: str | None = None,
             block: int | None = None, slow_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best distinct items (B, k) and their scores (B, k), best first; 0 / -inf where fewer exist.

        The scores of :meth:`scores` (log-probs), computed ``block`` items at a time with a running top-k merge
        (:func:`~genrec_dist.models.ranking.blockwise_topk`), so no (B, N) matrix is built. Items are ranked by the
        unnormalised score (uid logit + slow_weight x SID log-probs); the log-partition of the uid softmax, summed
        from each block's logsumexp, is subtracted from the k winners only. ``slow_weight`` replaces the configured
        one for this call."""
        return self.topk_many(history, k, [{"inference": inference, "slow_weight": slow_weight}], block)[0]

    @torch.no_grad()
    def topk_many(self, history: torch.Tensor, k: int, variants: list[dict[str, Any]],
                  block: int | None = None, scores: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """:meth:`topk` under several inference settings (``variants``: ``inference`` and ``slow_weight`` each, a
        missing or None one is the configured value) in one pass: the history is encoded once, and each block's item
        logits and SID path log-probs are computed once for all of them. Each result equals that setting's
        :meth:`topk`. ``scores=False`` (ranking only: evaluation, ``recommend``) skips the softmax normaliser and
        returns ``None`` for the scores."""
        modes = [v.get("inference") or self.cfg.inference for v in variants]
        for mode in modes:
            if mode not in _INFERENCES:
                raise ValueError(f"inference must be one of {'|'.join(_INFERENCES)}, got {mode!r}")
        weights = [self.cfg.slow_weight if v.get("slow_weight") is None else float(v["slow_weight"])
                   for v in variants]
        history = self._history(history)
        h = self.encode(history, self.cfg.max_history - history.shape[1])[:, -1, -1]  # (B, D)
        table = self._sid_logp_table(h) if "slow" in modes else None
        lses: list[torch.Tensor] = []  # (B,) per block; the padding column (-inf) adds nothing

        def score_blocks(lo: int, hi: int) -> list[torch.Tensor]:
            uid = self._uid_out().scores(h, lo, hi).float()  # (B, hi - lo)
            if scores:
                lses.append(uid.logsumexp(dim=-1))
            sid = self._sid_path_logp(table, lo, hi) if table is not None else None
            return [uid + w * sid if mode == "slow" else uid for mode, w in zip(modes, weights)]

        ranked = blockwise_topk_many(score_blocks, len(variants), self.num_items, k, h.shape[0], h.device, block)
        if not scores:
            return [(items, None) for items, _ in ranked]
        log_z = logsumexp_blocks(lses)[:, None]
        return [(items, keys - log_z) for items, keys in ranked]

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int, inference: str | None = None,
                  block: int | None = None, slow_weight: float | None = None) -> torch.Tensor:
        """The k best distinct items (B, k), best first; 0 where fewer exist."""
        return self.topk_many(history, k, [{"inference": inference, "slow_weight": slow_weight}], block,
                              scores=False)[0][0]


_INFERENCES = typing.get_args(typing.get_type_hints(CARConfig)["inference"])  # ("fast", "slow")
