"""The one transformer toolkit every model is built from (TIGER, SASRec, and later CAR and UNGER).

Pre-norm layers (nanoGPT / T5 style), ``F.scaled_dot_product_attention`` underneath, boolean masks (True =
may attend). One layer class covers the three uses:

- encoder layer:          ``TransformerLayer(cross_attention=False)`` with a padding mask;
- causal decoder-only:    the same layer with a causal (+ padding) mask and an optional :class:`KVCache`;
- encoder-decoder:        ``TransformerLayer(cross_attention=True)`` reading an encoder ``memory``.

Stacks take *embeddings*, not token ids, so a model can add its own inputs (CAR's act/think fusion, UNGER's extra
IKD token appended to the decoder input) and read any position's hidden state.

Parameters are only ever read inside their own module's ``forward`` (no ``other.weight`` in a parent's code), so
DeepSpeed ZeRO-3, which gathers a module's shards around its calls, works for training *and* for ``recommend``
outside the engine's forward (tests/models/test_zero3_access.py simulates that partitioning).

Beam search support: a decoder query batch may be a multiple ``G`` of the memory batch (``G`` beams per user, rows
user-major). Cross-attention then folds the beams into the query axis instead of copying the memory ``G`` times,
so the memory and its cached keys/values stay at the user batch size for the whole search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------

def causal_mask(t: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True on and below the diagonal."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def attention_mask(key_valid: torch.Tensor | None, causal: int | None = None) -> torch.Tensor | None:
    """Boolean attention mask from a key padding mask ``key_valid`` (B, Tk) and/or causality over ``causal`` steps.

    Returns (B, 1, Tq, Tk) (or (1, 1, T, T) when only causal; None when neither). A query row with no key left
    (a fully padded history, or a padded position under a causal mask) gets every key instead: softmax over an empty
    row is NaN, and such rows are padding whose outputs no real position ever reads (real queries only attend real
    keys), so this keeps everything finite without changing any real output.
    """
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]  # (B, 1, 1, Tk)
    if causal is not None:
        c = causal_mask(causal, key_valid.device if key_valid is not None else None)[None, None]  # (1, 1, T, T)
        mask = c if mask is None else mask & c
    if mask is None:
        return None
    return mask | ~mask.any(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer keys/values for incremental decoding.

    ``layers[i]["self"]`` grows by one step per decode call; ``layers[i]["cross"]`` holds the projected encoder
    memory, computed once at the first call (static, at the user batch size). :meth:`reorder` re-indexes the self
    entries after a beam step (``index`` (N,) = the row each new row continues; also expands B -> B*W).
    """

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, dict[str, torch.Tensor]]] = [{"self": {}, "cross": {}} for _ in range(num_layers)]

    @property
    def length(self) -> int:
        first = self.layers[0]["self"] if self.layers else {}
        return int(first["k"].shape[2]) if "k" in first else 0

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            for name in ("k", "v"):
                if name in layer["self"]:
                    layer["self"][name] = layer["self"][name].index_select(0, index)


# ----------------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention when ``source`` is None, else cross-attention over ``source``.

    ``head_dim`` may differ from ``d_model / n_heads`` (TIGER/T5: 6 heads x 64 on d_model 128).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        inner = n_heads * self.head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.kv = nn.Linear(d_model, 2 * inner, bias=bias)
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: dict[str, torch.Tensor] | None = None, static: bool = False) -> torch.Tensor:
        """x (B, Tq, D); source (Bs, Ts, D) with B a multiple of Bs; mask bool broadcastable to (Bs or B, 1, Tq, Tk).

        ``cache``: a dict this call reads and fills. Self-attention appends the new keys/values; ``static`` (cross-
        attention) projects ``source`` once and reuses it (``source`` may then be None on later calls).
        """
        q = self._split(self.q(x))  # (B, H, Tq, hd)
        if static and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            kv = self.kv(x if source is None else source)
            k, v = (self._split(t) for t in kv.chunk(2, dim=-1))  # (Bs, H, Tk, hd) each
            if cache is not None:
                if not static and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        b, h, tq, hd = q.shape
        groups = b // k.shape[0]
        if groups > 1:  # beams of one user share its keys: fold the beams into the query axis
            q = q.view(k.shape[0], groups, h, tq, hd).transpose(1, 2).reshape(k.shape[0], h, groups * tq, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        if groups > 1:
            y = y.view(k.shape[0], h, groups, tq, hd).transpose(1, 2).reshape(b, h, tq, hd)
        return self.out(y.transpose(1, 2).reshape(b, tq, h * hd))  # (B, Tq, D)


class FeedForward(nn.Module):
    """Position-wise MLP d -> d_ff -> d."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[activation]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.act(self.fc(x))))


class TransformerLayer(nn.Module):
    """Pre-norm layer: self-attention, optional cross-attention over ``memory``, feed-forward; residual around each."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, head_dim: int | None = None,
                 cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, head_dim, dropout)
        self.cross_attention = cross_attention
        if cross_attention:
            self.norm2 = nn.LayerNorm(d_model)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm1(x), mask=mask, cache=cache["self"] if cache else None))
        if self.cross_attention:
            x = x + self.drop(self.cross_attn(self.norm2(x), source=memory, mask=memory_mask,
                                              cache=cache["cross"] if cache else None, static=True))
        return x + self.drop(self.ff(self.norm3(x)))  # (B, T, D)


class TransformerStack(nn.Module):
    """``n_layers`` :class:`TransformerLayer` s and a final LayerNorm (the encoder, the decoder, or a causal stack)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 head_dim: int | None = None, cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, d_ff, dropout, head_dim, cross_attention) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False):
        """x (B, T, D) embeddings -> (B, T, D) normed output; with ``return_hidden`` also every layer's output.

        With a ``cache`` (incremental decoding), ``x`` holds only the new positions and ``mask`` covers them
        against all cached + new keys (None for one new step: it may see everything before it).
        """
        hidden = []
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, memory, memory_mask, cache.layers[i] if cache is not None else None)
            if return_hidden:
                hidden.append(x)
        out = self.norm(x)
        return (out, hidden) if return_hidden else out


class PositionalEmbedding(nn.Module):
    """Learned absolute positions. ``forward(t, offset)`` -> (t, D) for positions offset .. offset+t-1."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))

    def forward(self, t: int, offset: int = 0) -> torch.Tensor:
        if offset < 0 or offset + t > self.max_len:
            raise ValueError(f"positions {offset}..{offset + t - 1} exceed the {self.max_len} learned positions")
        return self.weight[offset: offset + t]


class TiedEmbedding(nn.Embedding):
    """An embedding table that also serves as the output layer (scores = hidden @ table.T).

    Both uses go through ``forward`` so that ZeRO-3, which gathers a module's partitioned parameters only around
    that module's own calls, has the table in place: ``emb(ids)`` looks up, ``emb.scores(h)`` scores. Reading
    ``emb.weight`` directly from another module's code would see an empty shard there.
    """

    def forward(self, x: torch.Tensor, scores: bool = False) -> torch.Tensor:
        if scores:
            return F.linear(x, self.weight)  # (..., num_embeddings)
        return super().forward(x)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self(h, scores=True)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 / nanoGPT initialisation: normal(0, 0.02) weights, zero biases; padding rows stay zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, PositionalEmbedding):
            nn.init.normal_(m.weight, std=std)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "KVCache", "MultiHeadAttention", "FeedForward", "TransformerLayer", "TransformerStack", "PositionalEmbedding",
    "TiedEmbedding",
    "attention_mask", "causal_mask", "init_weights", "num_parameters",
]
