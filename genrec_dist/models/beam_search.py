"""Beam search over semantic-ID codes, constrained to codes that exist, and the code -> items expansion.

:class:`CodeTrie` is a prefix trie over the catalog's codes stored as one sorted key array per level: the edge from
prefix node ``p`` (depth l) with code ``c`` exists iff ``p * K_l + c`` is in ``edges[l]``, and the child's node id
is that key's position in the array (so node ids are compact, 0..#prefixes-1 per depth), and a node's edges are
one contiguous run of it (CSR: ``first_l[p] .. first_l[p+1]``). The allowed codes of every beam are a scatter of
its run into a (beams, K_l) mask, and the child of each kept beam one ``searchsorted`` of its key: vectorised,
O(#items) memory per level (a dense (prefixes, K) table would need #prefixes x K), and the same on CPU and GPU.
Leaves (full codes) map to the items sharing that code through a padded (leaves, max collisions) table.

:func:`beam_search` is model-agnostic: the model supplies ``step(level, last_codes, parents) -> logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


class CodeTrie(nn.Module):
    """The codes of items 1..N (``codes`` (N+1, L), row 0 = padding, ignored) as a prefix trie; buffers follow
    ``.to(device)``."""

    def __init__(self, codes: np.ndarray, codebook_sizes: list[int]):
        super().__init__()
        codes = np.asarray(codes, dtype=np.int64)[1:]  # (N, L) real items
        if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes) or codes.shape[0] < 1:
            raise ValueError(f"codes must be (num_items + 1, {len(codebook_sizes)}) with at least one item, "
                             f"got {codes.shape[0] + 1} rows x {codes.shape[1:]}")
        self.sizes = [int(k) for k in codebook_sizes]
        self.degrees: list[int] = []
        node = np.zeros(codes.shape[0], dtype=np.int64)  # every item starts at the root
        for level, k in enumerate(self.sizes):
            bad = np.flatnonzero((codes[:, level] < 0) | (codes[:, level] >= k))
            if len(bad):
                raise ValueError(f"item {int(bad[0]) + 1} level {level}: code {int(codes[bad[0], level])} outside "
                                 f"[0, {k})")
            parents = int(node.max()) + 1  # prefix nodes at this depth
            keys, node = np.unique(node * k + codes[:, level], return_inverse=True)
            node = node.reshape(-1)
            first = np.searchsorted(keys, np.arange(parents + 1) * k)  # (parents + 1,) each node's run of edges
            self.register_buffer(f"edges_{level}", torch.from_numpy(keys), persistent=False)
            self.register_buffer(f"first_{level}", torch.from_numpy(first), persistent=False)
            self.degrees.append(int(np.diff(first).max()))  # most children of one node
        # node is now each item's leaf id; items of one leaf listed by item id.
        order = np.argsort(node, kind="stable")
        leaf_sorted = node[order]
        counts = np.bincount(node)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(len(order)) - first[leaf_sorted]
        table = np.zeros((len(counts), int(counts.max())), dtype=np.int64)
        table[leaf_sorted, slot] = order + 1  # item ids
        self.register_buffer("leaf_items", torch.from_numpy(table), persistent=False)  # (leaves, max collisions)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def edges(self, level: int) -> torch.Tensor:
        return getattr(self, f"edges_{level}")

    def allowed(self, level: int, node: torch.Tensor) -> torch.Tensor:
        """For prefix nodes ``node`` (N,) at depth ``level``: which of the K_l codes extend them, (N, K_l) bool."""
        k, edges, first = self.sizes[level], self.edges(level), getattr(self, f"first_{level}")
        start = first[node]  # (N,)
        j = torch.arange(self.degrees[level], device=node.device)  # (D,)
        e = (start[:, None] + j).clamp_(max=edges.numel() - 1)  # (N, D) the node's edges, then filler
        code = torch.where(j < (first[node + 1] - start)[:, None], edges[e] - node[:, None] * k, k)  # filler -> k
        return torch.zeros(node.shape[0], k + 1, dtype=torch.bool, device=node.device).scatter_(1, code, True)[:, :k]

    def child(self, level: int, node: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes (N,) at depth ``level`` and codes (N,) -> (the edge exists (N,) bool, the child node ids (N,));
        a missing edge gets some valid node id (its beam has score -inf and is never expanded to items)."""
        edges = self.edges(level)
        keys = node * self.sizes[level] + code
        pos = torch.searchsorted(edges, keys).clamp_(max=edges.numel() - 1)
        return edges[pos] == keys, pos

    def contains(self, codes: torch.Tensor) -> torch.Tensor:
        """(M, L) full codes -> (M,) bool: is this the code of some item."""
        node = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        ok = torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device)
        for level in range(self.num_levels):
            c = codes[:, level]
            exists, node = self.child(level, node, c.clamp(0, self.sizes[level] - 1))
            ok &= exists & (c >= 0) & (c < self.sizes[level])
        return ok

    def items_of(self, leaves: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        """Ranked leaves (B, W) -> the first k distinct items (B, k), each leaf expanded to all its items in item-id
        order; 0 where fewer exist. Leaves are distinct per row and partition the items, so items are distinct."""
        scores = torch.where(valid, 0.0, NEG_INF)
        return self.items_and_scores(leaves, scores, k)[0]

    def items_and_scores(self, leaves: torch.Tensor, scores: torch.Tensor, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`items_of` for beams with ``scores`` (B, W) (-inf = no item): the items (B, k) and each item's
        beam score (B, k) (items sharing a code share its score); 0 / -inf where fewer exist."""
        b = leaves.shape[0]
        valid = torch.isfinite(scores)
        items = self.leaf_items[leaves] * valid[..., None]  # (B, W, M); invalid beams contribute nothing
        items = items.reshape(b, -1)
        item_scores = scores[..., None].expand(-1, -1, self.leaf_items.shape[1]).reshape(b, -1).float()
        empty = (items == 0).to(torch.int8)
        order = torch.sort(empty, dim=1, stable=True).indices[:, :k]  # real items first, rank order kept
        items, item_scores = items.gather(1, order), item_scores.gather(1, order)
        item_scores = item_scores.masked_fill(items == 0, NEG_INF)
        if items.shape[1] < k:
            items = F.pad(items, (0, k - items.shape[1]))
            item_scores = F.pad(item_scores, (0, k - item_scores.shape[1]), value=NEG_INF)
        return items, item_scores


@dataclass
class BeamResult:
    codes: torch.Tensor  # (B, W, L) decoded codes, best first
    leaves: torch.Tensor  # (B, W) trie leaf ids
    scores: torch.Tensor  # (B, W) sum of log-probabilities; -inf for a beam that found no existing code

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.scores)


Step = Callable[[int, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def beam_search(step: Step, trie: CodeTrie, batch_size: int, beam_width: int) -> BeamResult:
    """Beam search of width ``beam_width`` over the trie's L levels.

    ``step(level, last_codes, parents)`` returns logits (rows, K_level) for the model's current rows. At level 0
    there is one row per user (``last_codes``/``parents`` None). At level l > 0 the rows are the beams kept at
    level l-1, user-major (row = user * beams + beam); ``parents`` (rows,) is the previous-level row each beam
    continues (the model re-indexes its KV cache with it, which also expands users to beams at level 1) and
    ``last_codes`` (rows,) the code it chose at level l-1. Scores are summed log-softmax probabilities; codes that no
    item has are masked to -inf before every top-k, so a finite-score beam always ends on an item's code.
    """
    b = batch_size
    node = None
    score = None
    codes = None
    last = parents = None
    for level, k in enumerate(trie.sizes):
        logp = step(level, last, parents).float().log_softmax(dim=-1)  # (rows, K)
        rows = logp.shape[0]
        if node is None:
            node = torch.zeros(rows, dtype=torch.long, device=logp.device)
            score = torch.zeros(rows, device=logp.device)
        cand = logp.add_(score[:, None]).masked_fill_(~trie.allowed(level, node), NEG_INF)  # in place, (rows, K)
        cand = cand.view(b, -1)  # (B, beams * K)
        width = min(beam_width, cand.shape[1])
        top, idx = cand.topk(width, dim=1)  # (B, width)
        beams = rows // b
        origin = idx // k  # beam (within its user) each survivor extends
        parents = (torch.arange(b, device=idx.device)[:, None] * beams + origin).view(-1)  # (B*width,)
        last = (idx % k).view(-1)
        node = trie.child(level, node[parents], last)[1]
        score = top.view(-1)
        prev = codes[parents] if codes is not None else last.new_zeros(b * width, 0)
        codes = torch.cat([prev, last[:, None]], dim=1)  # (B*width, level+1)
    width = score.numel() // b
    return BeamResult(codes.view(b, width, -1), node.view(b, width), score.view(b, width))
