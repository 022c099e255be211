"""The one transformer toolkit every model is built from (TIGER, SASRec, CAR and its AR ablation, UNGER).

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
so the memory and its cached keys/values stay at the user batch size for the whole search. Self-attention does the
same for a *shared prefix* (:meth:`KVCache.share_prefix`: a decoder-only model's prefilled history): its keys/values
are kept once per user and every beam attends to them through the folded queries, while only the tokens decoded
after it are cached per beam, so a beam step copies and appends the new tokens only, never the prefix.
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
# length groups: a training batch without most of its padding
# ----------------------------------------------------------------------------------------------------------------

def by_length(history: torch.Tensor, group_rows: int, fn, per_position: bool = False) -> torch.Tensor:
    """``fn(rows, history[rows])`` over a left-padded ``history`` (B, T), run on groups of ``group_rows`` rows of
    similar length, each trimmed to its longest row: the same result as ``fn(all rows, history)`` without the padding.

    Real histories are short next to their cap (Beauty: a third of TIGER's 20-item histories is items, a seventh of
    SASRec's 50-item windows), and a padded position costs as much as a real one. Rows are sorted by length and cut
    into ceil(B / group_rows) runs of equal count; a run's leading all-padding columns go (every model's positions are
    right-aligned or counted from the first item, and padded keys are masked, so a real position's output does not
    change). Groups of a fixed number of rows, not a fixed number of groups: each group pays the layers' per-call
    cost once, so a rank with half the batch runs half the groups. ``fn`` returns one row per input row (B_g, ...)
    or, with ``per_position``, one per kept column (B_g, w, ...): padded columns then come back as zeros in the
    (B, T, ...) result. ``group_rows`` <= 0: ``fn`` on the whole batch, padding included. One host sync (the widths)."""
    b, t = history.shape
    if group_rows <= 0:
        return fn(None, history)
    lengths = (history != 0).sum(1)
    order = torch.argsort(lengths, stable=True)
    runs = order.tensor_split(-(-b // group_rows))
    widths = torch.stack([lengths[r[-1]] for r in runs]).clamp(min=1).tolist()  # sorted: a run's last is its longest
    outs = [fn(r, history[r, t - w:]) for r, w in zip(runs, widths)]
    if not per_position:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=order.device)
        return torch.cat(outs)[inverse]
    out = outs[0].new_zeros((b, t, *outs[0].shape[2:]))
    for r, w, o in zip(runs, widths, outs):
        out[r, t - w:] = o
    return out


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer keys/values for incremental decoding.

    ``layers[i]["self"]`` grows by one step per decode call, one row per query row; ``layers[i]["cross"]`` holds the
    projected encoder memory, computed once at the first call (static, at the user batch size);
    ``layers[i]["prefix"]`` (after :meth:`share_prefix`) holds self-attention keys (transposed, ``"kt"``) and values
    shared by groups of rows (static, at the user batch size, with an additive key mask ``"bias"``).
    :meth:`reorder` re-indexes the self entries after a beam step (``index`` (N,) = the row each new row continues;
    also expands B -> B*W); shared entries are never copied, since beams stay with their user.
    """

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, dict[str, torch.Tensor]]] = [{"self": {}, "cross": {}, "prefix": {}}
                                                                 for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Self-attention positions cached (shared prefix + own)."""
        first = self.layers[0] if self.layers else {"self": {}, "prefix": {}}
        return sum(int(first[part]["v"].shape[2]) for part in ("prefix", "self") if "v" in first[part])

    @property
    def nbytes(self) -> int:
        """Bytes of every cached tensor (keys, values, masks)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for part in layer.values()
                   for t in part.values())

    def share_prefix(self, key_valid: torch.Tensor | None = None) -> None:
        """Make the self-attention keys/values cached so far a prefix shared by all later rows of the same user.

        Call it after prefilling with one row per user; later calls may have ``G`` rows per user (user-major), which
        attend to the prefix through folded queries and cache only their own new positions. ``key_valid`` (B, Tp)
        marks the real prefix positions (None: all); a padded position is never attended to afterwards.
        """
        for layer in self.layers:
            if layer["prefix"]:
                raise ValueError("share_prefix called twice on one cache")
            k, v = layer["self"]["k"], layer["self"]["v"]  # (B, H, Tp, hd)
            # Keys stored transposed: the beam steps' (queries x prefix) matmul then reads them contiguously.
            layer["prefix"] = {"kt": k.transpose(-1, -2).contiguous(), "v": v}
            if key_valid is not None:  # additive: cheaper than a masked fill of the (B, H, G, Tp) scores
                bias = torch.zeros(key_valid.shape, dtype=k.dtype, device=k.device).masked_fill_(~key_valid, -torch.inf)
                layer["prefix"]["bias"] = bias[:, None, None, :]  # (B, 1, 1, Tp)
            layer["self"] = {}

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            for name in ("k", "v"):
                if name in layer["self"]:
                    layer["self"][name] = layer["self"][name].index_select(0, index)


# ----------------------------------------------------------------------------------------------------------------
# attention over keys shared by groups of query rows
# ----------------------------------------------------------------------------------------------------------------

def fold(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n*G, H, T, d) rows user-major -> (n, H, G*T, d): the G rows of one user side by side on the T axis."""
    b, h, t, d = x.shape
    return x.view(n, b // n, h, t, d).transpose(1, 2).reshape(n, h, (b // n) * t, d)


def unfold(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`fold`: (n, H, G*T, d) -> (b, H, T, d) with G = b / n."""
    n, h, gt, d = x.shape
    g = b // n
    return x.view(n, h, g, gt // g, d).transpose(1, 2).reshape(b, h, gt // g, d)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     pkt: torch.Tensor, pv: torch.Tensor, prefix_bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of ``q`` (B, H, Tq, hd) over [a prefix shared by groups of rows | the rows' own keys].

    Prefix keys transposed ``pkt`` (Bs, H, hd, Tp) and values ``pv`` (Bs, H, Tp, hd) with B a multiple of Bs (rows
    user-major), ``prefix_bias`` 0 / -inf broadcastable to (Bs, 1, 1, Tp); own keys/values ``k``/``v``
    (B, H, Ts, hd), bool ``mask`` broadcastable to (B, 1, Tq, Ts). Equals one softmax over the concatenated keys
    (the prefix repeated per row) without materialising the repeat: the prefix scores are taken with the rows'
    queries folded into the query axis, and the two parts share one max and one normaliser. Every query must see
    at least one own key (itself), so the max is finite even when the whole prefix is padding.
    """
    b, bs = q.shape[0], pkt.shape[0]
    q = q * q.shape[-1] ** -0.5
    sp = fold(q, bs) @ pkt  # (Bs, H, G*Tq, Tp)
    if prefix_bias is not None:
        sp.add_(prefix_bias)
    so = q @ k.transpose(-1, -2)  # (B, H, Tq, Ts)
    if mask is not None:
        so.masked_fill_(~mask, float("-inf"))
    top = torch.maximum(unfold(sp.amax(-1, keepdim=True), b), so.amax(-1, keepdim=True))  # (B, H, Tq, 1)
    # In place: the prefix scores are the one large tensor of a beam step.
    ep, eo = sp.sub_(fold(top, bs)).exp_(), so.sub_(top).exp_()
    num = unfold(ep @ pv, b) + eo @ v  # (B, H, Tq, hd)
    return num / (unfold(ep.sum(-1, keepdim=True), b) + eo.sum(-1, keepdim=True))


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
                cache: dict[str, torch.Tensor] | None = None, static: bool = False,
                prefix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, Tq, D); source (Bs, Ts, D) with B a multiple of Bs; mask bool broadcastable to (Bs or B, 1, Tq, Tk).

        ``cache``: a dict this call reads and fills. Self-attention appends the new keys/values; ``static`` (cross-
        attention) projects ``source`` once and reuses it (``source`` may then be None on later calls).
        ``prefix``: shared self-attention keys/values (:meth:`KVCache.share_prefix`) attended before the row's
        own; ``mask`` then covers only the own (cached + new) keys. Inference only (no attention dropout).
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
        if prefix:
            y = prefix_attention(q, k, v, mask, prefix["kt"], prefix["v"], prefix.get("bias"))
        elif k.shape[0] < b:  # beams of one user share its keys: fold the beams into the query axis
            y = unfold(F.scaled_dot_product_attention(fold(q, k.shape[0]), k, v, attn_mask=mask,
                                                      dropout_p=self.dropout if self.training else 0.0), b)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
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
        x = x + self.drop(self.self_attn(self.norm1(x), mask=mask, cache=cache["self"] if cache else None,
                                         prefix=cache.get("prefix") if cache else None))
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
        against all cached + new keys (None for one new step: it may see everything before it); after
        :meth:`KVCache.share_prefix`, against the keys cached since (the prefix's own mask covers the prefix).
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

    def forward(self, t: int, offset: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        """``index`` (any shape) of positions -> (..., D) rows; else the (t, D) rows offset .. offset+t-1."""
        if index is not None:
            return F.embedding(index, self.weight)
        if offset < 0 or offset + t > self.max_len:
            raise ValueError(f"positions {offset}..{offset + t - 1} exceed the {self.max_len} learned positions")
        return self.weight[offset: offset + t]


class TokenTable(nn.Embedding):
    """An embedding table whose rows also score hidden states (scores = hidden @ table.T): a tied model's one
    input and output table, or an untied output head (CAR's ``sid_head`` / ``uid_head``).

    Both uses go through ``forward`` so that ZeRO-3, which gathers a module's partitioned parameters only around
    that module's own calls, has the table in place: ``emb(ids)`` looks up, ``emb.scores(h)`` scores. Reading
    ``emb.weight`` directly from another module's code would see an empty shard there.
    """

    def forward(self, x: torch.Tensor, scores: bool = False, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        if scores:
            return F.linear(x, self.weight[lo:hi])  # (..., hi - lo) rows lo..hi-1 (all by default)
        return super().forward(x)

    def scores(self, h: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Scores against rows ``lo .. hi-1`` of the table (block-wise ranking never builds all N columns)."""
        return self(h, scores=True, lo=lo, hi=hi)


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
    "TokenTable",
    "attention_mask", "causal_mask", "fold", "init_weights", "num_parameters", "prefix_attention", "unfold",
]
