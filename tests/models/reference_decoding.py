"""No-cache reference decoding, for tests only: the same constrained beam search as the models' cached
``beam_search``, but every step re-runs the model over the whole prefix (TIGER/UNGER: the decoder over
[BOS, codes so far]; CAR's AR ablation: the stack over [history chunks, partial chunk]). The production paths keep
one KV cache and feed one token per beam per step; tests/models/test_cached_beam_search.py checks they agree."""

from __future__ import annotations

import torch

from genrec_dist.models.beam_search import BeamResult, beam_search
from genrec_dist.models.blocks import attention_mask
from genrec_dist.models.car import fuse_chunks


@torch.no_grad()
def tiger_beam_search(model, history: torch.Tensor, beam_width: int) -> BeamResult:
    """:meth:`Tiger.beam_search` (UNGER inherits it) re-decoding [BOS, c_0 .. c_{l-1}] at every level."""
    memory, memory_mask = model.encode(history)
    b = history.shape[0]
    prefix: torch.Tensor | None = None  # (rows, l) decoder tokens after BOS

    def step(level: int, last: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
        nonlocal prefix
        if level == 0:
            tokens = torch.full((b, 1), model.bos, dtype=torch.long, device=history.device)
        else:
            tok = (last + 1 + model.offsets[level - 1])[:, None]
            prefix = tok if prefix is None else torch.cat([prefix[parents], tok], dim=1)
            tokens = torch.cat([torch.full_like(tok, model.bos), prefix], dim=1)
        h = model.decode(model.embed_decoder(tokens, 0), memory, memory_mask)
        return model.level_logits(h[:, -1], level)

    return beam_search(step, model.trie, b, beam_width)


@torch.no_grad()
def car_ar_beam_search(model, history: torch.Tensor, beam_width: int) -> BeamResult:
    """:meth:`CARAR.beam_search` re-running the stack over [history chunks, the beam's partial chunk] per step."""
    history = model._history(history)
    b, t = history.shape
    first_slot = model.cfg.max_history - t
    base = model.cfg.max_history * model.chunk  # position of the next chunk's first token
    key_valid = (history != 0).repeat_interleave(model.chunk, dim=1)  # (B, P)
    last_state = model.encode(history, first_slot)[:, -1, -1]  # (B, D)
    hist_x = model.inputs(history, first_slot)  # (B, P, D)
    chosen: torch.Tensor | None = None  # (rows, level) the beam's SID tokens so far
    user = torch.arange(b, device=history.device)  # (rows,) each row's user

    def step(level: int, last: torch.Tensor | None, parents: torch.Tensor | None) -> torch.Tensor:
        nonlocal chosen, user
        if level == 0:
            h = last_state
        else:
            tok = (last + model.offsets[level - 1])[:, None]
            chosen = tok if chosen is None else torch.cat([chosen[parents], tok], dim=1)
            user = user[parents]
            part = fuse_chunks(model.sid_emb(chosen)[:, None], model.cfg.fusion)[:, 0]  # (rows, level, D)
            x = torch.cat([hist_x[user], part + model.pos_emb(level, base)], dim=1)  # (rows, P + level, D)
            valid = torch.cat([key_valid[user], torch.ones_like(chosen, dtype=torch.bool)], dim=1)
            h = model.blocks(x, mask=attention_mask(valid, causal=x.shape[1]))[:, -1]
        return model.uid_logits(h) if level == model.num_levels else model.sid_logits(h, level)

    return beam_search(step, model.trie, b, beam_width)
