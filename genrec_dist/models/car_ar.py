"""CAR's "AR" ablation (Wang, Gan et al., arXiv 2506.23643): CAR's chunk backbone trained as plain token-level
autoregression and decoded by beam search (``model.car.mode: ar``; the model registry builds this class for it).

The same tables, positions and causal stack as CAR (:class:`~genrec_dist.models.car.ChunkBackbone`) read the chunk
tokens ``[c_1 .. c_L, uid]``; every token predicts the next one (loss = mean over the L+1 token cross-entropies). It
is decoded with a beam search over the next chunk's L SID tokens and then its uid, constrained to paths that exist:
the shared :func:`~genrec_dist.models.beam_search.beam_search` over a :class:`~genrec_dist.models.beam_search.CodeTrie`
of ``[c_1 .. c_L, item id]`` (the item id is the trie's last level), with the history prefilled once into a KV cache
shared by the user's beams and one token per beam fed per step. Its cost grows with the beam width; CAR's does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from genrec_dist.errors import ConfigError
from genrec_dist.models.beam_search import BeamResult, CodeTrie, beam_search
from genrec_dist.models.car import ChunkBackbone
from genrec_dist.models.config import CARConfig

if TYPE_CHECKING:  # the annotation only: the semantic-ID format pulls in storage, fsspec and Polars
    from genrec_dist.data.semantic_ids import SemanticIds


class CARAR(ChunkBackbone):
    """``forward(history (B, T), target (B,)) -> {"loss", "act_loss", "think_loss", "think_loss_level_<l>"}``;
    ``recommend(history, k, beam_width=None) -> (B, k)`` distinct item ids by constrained beam search."""

    def __init__(self, cfg: CARConfig, sids: SemanticIds):
        if cfg.mode != "ar":
            raise ConfigError(f"model.car.mode={cfg.mode} is the class car.CAR (build_model picks it)")
        super().__init__(cfg, sids)
        # [c_1 .. c_L, uid] decode as one path through a trie whose last level is the item id
        paths = np.concatenate([self.codes_np, np.arange(self.num_items + 1)[:, None]], axis=1)  # (N+1, L+1)
        self.trie = CodeTrie(paths, self.sizes + [self.num_items + 1])  # also validates the codes

    # ----- training -----
    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-token prediction over [history chunks, target chunk]; loss = mean over the L+1 token types of their
        cross-entropy (every token weighs the same, as in a plain causal LM)."""
        history = self._history(history)
        items = torch.cat([history, target[:, None]], dim=1)  # (B, T+1)
        t = items.shape[1]
        h = self.encode(items, self.cfg.max_history + 1 - t)  # (B, T+1, L+1, D)
        valid = items != 0  # (B, T+1)
        if not self.cfg.all_positions:
            valid = valid & (torch.arange(t, device=items.device) == t - 1)
        codes = self.codes[items]  # (B, T+1, L)
        # Level 0 of chunk t is read off the uid token of chunk t-1; level l > 0 off token l-1 of chunk t; the uid
        # off token L-1 of chunk t.
        first = valid[:, 1:] & (items[:, :-1] != 0)
        think = [_ce(self.sid_logits(h[:, :-1, -1][first], 0), codes[:, 1:, 0][first])]
        think += [_ce(self.sid_logits(h[:, :, l - 1][valid], l), codes[:, :, l][valid])
                  for l in range(1, self.num_levels)]
        act = self._uid_loss(h[:, :, -2][valid], items[valid])
        loss = (act + torch.stack(think).sum()) / self.chunk
        out = {"loss": loss, "act_loss": act.detach(), "think_loss": torch.stack(think).mean().detach()}
        out.update({f"think_loss_level_{l}": ce.detach() for l, ce in enumerate(think)})
        return out

    # ----- inference -----
    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int, beam_width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best distinct items (B, k) and their beam log-probs (B, k), best first; 0 / -inf where fewer
        exist (items sharing a code share its beam's score). Beam width: ``beam_width`` or ``cfg.beam_width``, at
        least k (so k items are found whenever k codes exist)."""
        width = max(beam_width or self.cfg.beam_width, k)
        result = self.beam_search(history, width)
        return self.trie.items_and_scores(result.leaves, result.scores, k)

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int, beam_width: int | None = None) -> torch.Tensor:
        """The k best distinct items (B, k), best first, 0 where fewer exist (:meth:`topk`'s items)."""
        return self.topk(history, k, beam_width)[0]

    @torch.no_grad()
    def beam_search(self, history: torch.Tensor, beam_width: int) -> BeamResult:
        """The AR ablation's decoding: a beam over the next chunk's L SID tokens and its uid, constrained to
        [codes, item] paths that exist (the shared :func:`~genrec_dist.models.beam_search.beam_search` over a trie
        whose last level is the item id).

        The history chunks are prefilled once into a KV cache kept as a prefix shared by the user's beams
        (:meth:`~genrec_dist.models.blocks.KVCache.share_prefix`), so a step projects, caches and re-indexes only
        the beams' own new tokens (tests/models/reference_decoding.py holds the no-cache reference it is tested
        against).
        """
        history = self._history(history)
        b, t = history.shape
        first_slot = self.cfg.max_history - t
        base = self.cfg.max_history * self.chunk  # position of the next chunk's first token
        key_valid = (history != 0).repeat_interleave(self.chunk, dim=1)  # (B, P)
        cache = self.blocks.new_cache()
        last_state = self.encode(history, first_slot, cache)[:, -1, -1]  # (B, D) the last history chunk's uid token
        cache.share_prefix(key_valid)
        think_sum: torch.Tensor | None = None  # (rows, D) sum of the beam's think embeddings so far

        def step(level: int, last: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
            nonlocal think_sum
            if level == 0:
                h = last_state
            else:
                cache.reorder(parents)
                e = self.sid_emb(last + self.offsets[level - 1])  # (rows, D) the SID chosen at level-1
                own = e
                if self.cfg.fusion != "none" and think_sum is not None:
                    own = e + think_sum[parents]
                    if self.cfg.fusion == "mean":
                        own = own / level
                think_sum = e if think_sum is None else think_sum[parents] + e
                x = own[:, None] + self.pos_emb(1, base + level - 1)  # (rows, 1, D)
                h = self.blocks(x, cache=cache)[:, -1]  # (rows, D)
            return self.uid_logits(h) if level == self.num_levels else self.sid_logits(h, level)

        return beam_search(step, self.trie, b, beam_width)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that is 0 (with a graph) on no rows instead of NaN (e.g. a batch of one-item histories)."""
    return F.cross_entropy(logits, y) if y.numel() else logits.sum() * 0.0
