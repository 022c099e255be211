"""TIGER (Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023): an encoder-decoder that
reads the history as semantic-ID tokens and decodes the next item's L codes.

Tokens: code c at level l is token ``1 + offset_l + c`` (offset_l = K_0 + ... + K_{l-1}; 0 = padding, last = BOS),
one table shared by encoder and decoder (as in TIGER, every level has its own code vocabulary). The encoder reads
the last ``max_history`` items, each as its L tokens, left-padded; the decoder input is [BOS, c_0, ..., c_{L-2}] and
position l predicts c_l from level l's slice of one output projection (teacher forcing, cross-entropy averaged
over levels). TIGER's hashed user token is left out: the model contract carries no user ids.

``recommend`` runs :func:`~genrec_dist.models.beam_search.beam_search` constrained to codes that exist: the
history is encoded once, the decoder is prefilled with BOS and then fed one token per step for all beams through a
KV cache; a decoded code expands to all items sharing it (collisions), so a code hit is never counted as an item hit.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genrec_dist.models.beam_search import BeamRanking, BeamResult, CodeTrie, beam_search
from genrec_dist.models.blocks import (KVCache, PositionalEmbedding, TransformerStack, attention_mask, by_length,
                                       init_weights)
from genrec_dist.models.config import TigerConfig


class Tiger(BeamRanking, nn.Module):
    """``forward(history (B, T), target (B,)) -> {"loss", "ce_level_<l>"}``; ``recommend(history, k) -> (B, k)``."""

    def __init__(self, cfg: TigerConfig, sids):
        super().__init__()
        codes = np.asarray(sids.codes, dtype=np.int64)  # (N+1, L)
        sizes = [int(k) for k in sids.codebook_sizes]
        self.cfg = cfg
        self.trie = CodeTrie(codes, sizes)  # validates the codes
        self.num_items = codes.shape[0] - 1
        self.sizes = sizes
        self.num_levels = len(sizes)
        self.offsets = [int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
        tokens = torch.from_numpy(codes + np.asarray(self.offsets) + 1)
        tokens[0] = 0  # padding item -> padding tokens
        self.register_buffer("codes", torch.from_numpy(codes), persistent=False)  # (N+1, L)
        self.register_buffer("item_tokens", tokens, persistent=False)  # (N+1, L)
        self.bos = 1 + sum(sizes)
        d = cfg.d_model
        self.tok = nn.Embedding(self.bos + 1, d, padding_idx=0)
        self.enc_pos = PositionalEmbedding(cfg.max_history * self.num_levels, d)
        self.dec_pos = PositionalEmbedding(self.num_levels, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = TransformerStack(cfg.encoder_layers, d, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.head_dim)
        self.decoder = TransformerStack(cfg.decoder_layers, d, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.head_dim,
                                        cross_attention=True)
        self.head = nn.Linear(d, sum(sizes), bias=False)  # level l's logits are columns offset_l .. offset_l+K_l
        init_weights(self)

    # ----- building blocks (UNGER extends these) -----
    def encode(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) item ids -> memory (B, S, D) and its attention mask (B, 1, 1, S), S = min(T, max_history) * L."""
        history = history[:, -self.cfg.max_history:]
        tokens = self.item_tokens[history].flatten(1)  # (B, S)
        s = tokens.shape[1]
        # Right-aligned positions: the most recent item's tokens always sit at the same positions.
        x = self.drop(self.tok(tokens) + self.enc_pos(s, self.enc_pos.max_len - s))  # (B, S, D)
        mask = attention_mask(tokens != 0)
        return self.encoder(x, mask=mask), mask

    def embed_decoder(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Decoder input tokens (B, t) at decoder positions offset..offset+t-1 -> (B, t, D)."""
        return self.drop(self.tok(tokens) + self.dec_pos(tokens.shape[1], offset))

    def decode(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Decoder embeddings (rows, t, D) -> hidden states (rows, t, D); causal unless ``cache`` (one new step)."""
        mask = None if cache is not None else attention_mask(None, causal=x.shape[1])
        return self.decoder(x, mask=mask, memory=memory, memory_mask=memory_mask, cache=cache)

    def level_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """Hidden states (..., D) -> logits over level ``level``'s K codes (..., K)."""
        lo = self.offsets[level]
        # Through head's own call (not a slice of head.weight) so ZeRO-3 has the weight gathered; the extra columns
        # cost sum(K) instead of K_l multiply-adds per row, noise next to the decoder.
        return self.head(h)[..., lo: lo + self.sizes[level]]

    # ----- training -----
    def decode_batch(self, history: torch.Tensor, inputs: Callable[[torch.Tensor | None], torch.Tensor]
                     ) -> torch.Tensor:
        """Teacher forcing over ``history`` (B, T): ``inputs(rows)`` gives the decoder input embeddings of those rows
        (all rows: None) -> hidden states (B, t, D), causal. The rows run in length groups (``cfg.length_group_rows``,
        :func:`~genrec_dist.models.blocks.by_length`), each encoded before its inputs are embedded."""
        history = history[:, -self.cfg.max_history:]

        def run(rows: torch.Tensor | None, hist: torch.Tensor) -> torch.Tensor:
            memory, memory_mask = self.encode(hist)
            return self.decode(inputs(rows), memory, memory_mask)

        return by_length(history, self.cfg.length_group_rows, run)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target_codes = self.codes[target]  # (B, L)
        bos = torch.full_like(target[:, None], self.bos)
        dec_in = torch.cat([bos, self.item_tokens[target][:, :-1]], dim=1)  # (B, L): BOS, c_0 .. c_{L-2}
        h = self.decode_batch(history, lambda rows: self.embed_decoder(dec_in if rows is None else dec_in[rows]))
        out: dict[str, torch.Tensor] = {}
        losses = []
        for level in range(self.num_levels):
            ce = F.cross_entropy(self.level_logits(h[:, level], level).float(), target_codes[:, level])
            losses.append(ce)
            out[f"ce_level_{level}"] = ce.detach()
        out["loss"] = torch.stack(losses).mean()
        return out

    # ----- inference (topk / recommend: BeamRanking) -----
    @torch.no_grad()
    def beam_search(self, history: torch.Tensor, beam_width: int) -> BeamResult:
        """Constrained beam search for every user, one decoder step per level over a KV cache (the no-cache
        reference it is tested against is in tests/models/reference_decoding.py)."""
        memory, memory_mask = self.encode(history)
        b = history.shape[0]
        cache = self.decoder.new_cache()

        def step(level: int, last: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
            if level == 0:
                tokens = torch.full((b, 1), self.bos, dtype=torch.long, device=history.device)
            else:
                cache.reorder(parents)
                tokens = (last + 1 + self.offsets[level - 1])[:, None]  # (rows, 1) token of the code of level-1
            h = self.decode(self.embed_decoder(tokens, level), memory, memory_mask, cache)
            return self.level_logits(h[:, -1], level)  # (rows, K_level)

        return beam_search(step, self.trie, b, beam_width)

