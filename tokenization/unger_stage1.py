"""UNGER Stage I (§3.3): a DIN collaborative model, the AdaLN modality adaptation layer, and the two losses whose
weighted sum learns the *integrated* item embeddings that are quantised into unified codes ("unicodes").

The paper's equations did not survive in our copy of the text, so each form below is a documented reading of its
prose (docs/design.md); EAGER's released DIN (Wang et al., KDD 2024; yewzz/EAGER:EAGER/train_din.py) gives the sizes.

- DIN (Zhou et al., KDD 2018), the collaborative encoder: the user representation for candidate ``c`` is
  ``u_c = sum_j a(e_j, e_c) e_j`` over the history, with DIN's local activation unit
  ``a = MLP([e_j, e_c, e_j - e_c, e_j * e_c])`` (no softmax over positions, as in DIN §4.3) and padding masked out;
  the matching score is ``<W u_c, e_c>``.
- Modality adaptation layer (Eq. 2): ``MAL(s) = AdaLN(W s + b)`` with
  ``AdaLN(h) = (1 + gamma(h)) * LN(h) + beta(h)`` and ``[gamma, beta] = Linear(h)`` -- the normalisation's scale and
  shift are computed from the input itself (DiT's adaLN, Peebles & Xie 2023, zero-initialised so it starts as LN).
- Cross-modality knowledge alignment (Eq. 3): InfoNCE from an item's collaborative embedding to its adapted semantic
  embedding against the other items of the batch, ``sim / tau`` (cosine by default).
- Next-item prediction (Eq. 4): softmax over the target and ``num_negatives`` uniformly sampled items (EAGER's DIN
  samples 60); accidental hits of the target among the negatives are masked.
- Joint loss (Eq. 5): ``L = next_weight * L_next + cka_weight * L_cka`` (UNGER Table 4: both 1.0).

Pure torch; ``forward(history, target) -> {"loss", "next_item", "cka"}`` like every genrec-dist model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaLN(nn.Module):
    """Adaptive LayerNorm conditioned on its own input: ``(1 + gamma(x)) * LN(x) + beta(x)`` (UNGER §3.3.1, Eq. 2).

    ``gamma``/``beta`` come from one zero-initialised linear map of ``x`` (DiT's adaLN-Zero init), so at init the
    layer is a plain affine-free LayerNorm and learns how much each input should rescale and shift itself."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.mod = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.mod(x).chunk(2, dim=-1)  # (..., D) each
        return (1 + gamma) * self.norm(x) + beta


class ModalityAdapter(nn.Module):
    """MAL (Eq. 2): semantic embeddings (..., D_s) -> the collaborative space (..., D) as ``AdaLN(W s + b)``."""

    def __init__(self, semantic_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(semantic_dim, dim)
        self.ada = AdaLN(dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.ada(self.proj(s))


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float, similarity: str = "cosine"
             ) -> torch.Tensor:
    """InfoNCE with in-batch negatives (Chen et al. 2020; UNGER Eq. 3): row i of ``anchor`` (B, D) against every row
    of ``positive`` (B, D), its own row the positive: ``mean_i -log softmax_j(sim(a_i, p_j) / tau)[i]``."""
    if similarity == "cosine":
        anchor, positive = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    logits = anchor @ positive.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(anchor.shape[0], device=anchor.device))


class DINStage1(nn.Module):
    """DIN + MAL trained with Eq. 5. ``semantic`` (N+1, D_s) float: row i = item i's text embedding (row 0 unused).

    ``cka_weight = 0`` trains DIN alone (the collaborative-only embeddings of Table 7 and the reference for §4.3)."""

    def __init__(self, num_items: int, semantic: torch.Tensor, dim: int = 96, attention_hidden: tuple = (80, 40),
                 num_negatives: int = 60, temperature: float = 0.1, similarity: str = "cosine",
                 next_weight: float = 1.0, cka_weight: float = 1.0):
        super().__init__()
        if semantic.shape[0] != num_items + 1:
            raise ValueError(f"semantic embeddings have {semantic.shape[0]} rows, need num_items + 1 = {num_items + 1}")
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.similarity = similarity
        self.next_weight = next_weight
        self.cka_weight = cka_weight
        self.item = nn.Embedding(num_items + 1, dim, padding_idx=0)  # the collaborative embeddings e_i
        nn.init.normal_(self.item.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()
        layers, width = [], 4 * dim
        for h in attention_hidden:  # DIN's local activation unit (DIN §4.3: 80-40 hidden units in its code)
            layers += [nn.Linear(width, h), nn.ReLU()]  # UNGER Table 4: ReLU
            width = h
        self.attention = nn.Sequential(*layers, nn.Linear(width, 1))
        self.user = nn.Linear(dim, dim)
        self.register_buffer("semantic", semantic.float(), persistent=False)  # (N+1, D_s), frozen (§3.3)
        self.adapter = ModalityAdapter(semantic.shape[1], dim)

    def user_for(self, history: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """History (B, T) item ids, candidates (B, C) -> candidate-specific user vectors (B, C, D)."""
        h = self.item(history)  # (B, T, D)
        c = self.item(cand)  # (B, C, D)
        # First layer of the unit on [h, c, h - c, h * c] split by blocks, so only the product term is built at
        # (B, C, T, D): W [h; c; h-c; h*c] = (W1 + W3) h + (W2 - W3) c + W4 (h * c). Same function, ~4x cheaper.
        first = self.attention[0]
        w1, w2, w3, w4 = first.weight.chunk(4, dim=1)  # (H, D) each
        pre = (F.linear(h, w1 + w3)[:, None] + F.linear(c, w2 - w3, first.bias)[:, :, None]
               + F.linear(h[:, None] * c[:, :, None], w4))  # (B, C, T, H)
        w = self.attention[1:](pre).squeeze(-1)  # (B, C, T)
        w = w * (history != 0)[:, None, :]
        return self.user(torch.einsum("bct,btd->bcd", w, h))  # (B, C, D)

    def scores(self, history: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Matching scores (B, C) of candidates ``cand`` (B, C) for each history."""
        return (self.user_for(history, cand) * self.item(cand)).sum(-1)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        b = target.shape[0]
        neg = torch.randint(1, self.num_items + 1, (b, self.num_negatives), device=target.device)  # (B, n)
        cand = torch.cat([target[:, None], neg], dim=1)  # (B, 1 + n): the target first
        logits = self.scores(history, cand).masked_fill(
            torch.cat([torch.zeros_like(target[:, None], dtype=torch.bool), neg == target[:, None]], 1), float("-inf"))
        next_item = F.cross_entropy(logits, torch.zeros_like(target))  # Eq. 4
        out = {"next_item": next_item.detach()}
        loss = self.next_weight * next_item
        if self.cka_weight:
            items = torch.unique(target)  # one row per item: a duplicate would be its own "negative"
            cka = info_nce(self.item(items), self.adapter(self.semantic[items]), self.temperature, self.similarity)
            out["cka"] = cka.detach()
            loss = loss + self.cka_weight * cka  # Eq. 5
        out["loss"] = loss
        return out

    @torch.no_grad()
    def embeddings(self, kind: str = "collab") -> torch.Tensor:
        """Item embeddings (N+1, D) after training: ``collab`` = e_i (integrated by the CKA pull towards the item's
        adapted semantics), ``adapted`` = MAL(s_i), ``mean`` = the mean of the two L2-normalised."""
        return integrate(self.item.weight.detach().clone(), self.adapter(self.semantic), kind)


def integrate(collab: torch.Tensor, adapted: torch.Tensor, kind: str) -> torch.Tensor:
    """One reading of the integrated embedding from a trained Stage I model's two item tables (N+1, D) each: the
    DIN item embeddings ``collab`` and the adapted semantics ``adapted`` (see :meth:`DINStage1.embeddings`)."""
    if kind == "collab":
        return collab
    if kind == "adapted":
        return adapted
    if kind == "mean":
        return (F.normalize(collab, dim=-1) + F.normalize(adapted, dim=-1)) / 2
    raise ValueError(f"unknown integrated embedding kind {kind!r} (collab, adapted, mean)")
