"""Full-catalog top-k in fixed-size blocks: the (B, N) score matrix is never built, only (B, block) at a time.

Every model's ``topk(history, k, **inference_kwargs) -> (items (B, k), scores (B, k))`` that ranks the whole catalog
goes through :func:`blockwise_topk`: the model scores items ``lo .. hi-1`` of one block, the block's best k are
merged into a running best k, and the next block is scored. Peak memory is one (B, block) matrix whatever N is
(B = 256, block = 65536: 64 MiB of float32), so a 1M-item catalog ranks in 16 blocks instead of a 1 GiB matrix.

The order is a total order, the same for any block size: higher score first, the lower item id first among equal
scores. ``torch.topk`` does not promise which of several equal values it returns, so each block's top k is made
exact (:func:`_block_top`) and the merge is a stable sort of [running, block] (every running id is lower than every
block id). With ``block >= N`` the result is that of one stable descending sort of the full matrix
(:func:`full_topk`, the reference the tests compare against).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
# Items scored per block: B x block float32 logits (256 x 65536 = 64 MiB) bounds evaluation memory at any N.
DEFAULT_SCORE_BLOCK = 65536

ScoreBlock = Callable[[int, int], torch.Tensor]


def full_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``scores`` (B, N+1) with column 0 the padding item -> the k best items 1..N (B, k) and their
    scores, best first, lower id first on ties; 0 / -inf where N < k."""
    keys = scores[:, 1:]
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]  # (B, min(k, N))
    return _pad(order + 1, keys.gather(1, order), k)


def blockwise_topk(score_block: ScoreBlock, num_items: int, k: int, batch: int, device: torch.device,
                   block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of items 1..``num_items`` for ``batch`` users, scoring ``block`` items at a time.

    ``score_block(lo, hi)`` returns the (batch, hi - lo) scores of items lo..hi-1. Returns (items (B, k) int64,
    scores (B, k) float32), best first, lower id first on ties, 0 / -inf where num_items < k."""
    return blockwise_topk_many(lambda lo, hi: [score_block(lo, hi)], 1, num_items, k, batch, device, block)[0]


def blockwise_topk_many(score_blocks: Callable[[int, int], list[torch.Tensor]], n: int, num_items: int, k: int,
                        batch: int, device: torch.device, block: int | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`blockwise_topk` of ``n`` scorings of the same items in one pass over the catalog: ``score_blocks(lo,
    hi)`` returns the ``n`` (batch, hi - lo) score matrices of one block, so what they share (CAR: the item logits)
    is computed once per block. Each result is exactly what :func:`blockwise_topk` gives for that scoring alone."""
    block = int(block or DEFAULT_SCORE_BLOCK)
    if block < 1 or k < 1:
        raise ValueError(f"block and k must be >= 1, got block={block}, k={k}")
    best_ids = [torch.zeros(batch, 0, dtype=torch.long, device=device) for _ in range(n)]
    best = [torch.zeros(batch, 0, dtype=torch.float32, device=device) for _ in range(n)]
    for lo in range(1, num_items + 1, block):
        hi = min(lo + block, num_items + 1)
        for j, keys in enumerate(score_blocks(lo, hi)):  # each (B, hi - lo)
            pos, vals = _block_top(keys.float(), k)  # (B, <=k) positions in the block, exact order
            ids = torch.cat([best_ids[j], pos + lo], dim=1)  # (B, <=2k): running ids all < this block's ids
            merged = torch.cat([best[j], vals], dim=1)
            order = torch.sort(merged, dim=1, descending=True, stable=True).indices[:, :k]
            best_ids[j], best[j] = ids.gather(1, order), merged.gather(1, order)
    return [_pad(i, v, k) for i, v in zip(best_ids, best)]


def _block_top(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) -> positions and values of the k best, ordered (value desc, position asc): exact under ties."""
    n = keys.shape[1]
    if n > k:
        vals, pos = keys.topk(k, dim=1)
        thr = vals[:, -1:]  # (B, 1) the k-th best value
        wide = int((keys >= thr).sum(dim=1).max())  # candidates of the row with the most ties at the threshold
        if wide < 4 * k:  # usual case: take the candidates, then order them exactly
            if wide > k:  # ties at the threshold: every row's tied candidates included (else the k are the set)
                vals, pos = keys.topk(wide, dim=1)  # (B, wide)
            pos, sort = pos.sort(dim=1)  # position ascending ...
            vals = vals.gather(1, sort)
            order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]  # ... then value, stably
            return pos.gather(1, order), vals.gather(1, order)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]  # few items or massive ties
    return order, keys.gather(1, order)


def _pad(ids: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.shape[1] < k:
        ids = F.pad(ids, (0, k - ids.shape[1]))
        scores = F.pad(scores, (0, k - scores.shape[1]), value=NEG_INF)
    return ids, scores


def logsumexp_blocks(lses: list[torch.Tensor]) -> torch.Tensor:
    """The log-partition of a softmax over all items from each block's ``logsumexp`` (B,) -> (B,)."""
    return torch.logsumexp(torch.stack(lses, dim=1), dim=1)


def full_or_sampled(choice: str, num_items: int, max_full: int, full: str = "full") -> str:
    """Resolve a loss setting ``auto``: the full softmax (named ``full``) up to ``max_full`` items, ``sampled`` above
    (the (rows, N) logits of a full softmax grow with the catalog, a sampled one's do not)."""
    if choice != "auto":
        return choice
    return full if num_items <= max_full else "sampled"
