"""UNGER Stage II (§3.4): TIGER's encoder-decoder over unified codes plus intra-modality knowledge distillation (IKD).

Everything TIGER does is inherited (:class:`~genrec_dist.models.tiger.Tiger`: token layout, encoder, decoder, level
heads, constrained beam search with KV cache); this file holds only what is UNGER's own:

- the IKD token (§3.4.3): a learned embedding appended to the *end* of the decoder input, after the full target
  code, so the decoder input is ``[BOS, c_0, ..., c_{L-1}, IKD]`` (L + 2 positions). Causal self-attention keeps
  positions 0..L-1 (the generation loss, Eq. 10) exactly as in TIGER, and the IKD position reads every unicode
  before it ("allowing gradients to propagate through each preceding unicode");
- Eq. 11: its final hidden state, projected to the Stage I width, is contrasted with the target item's integrated
  embedding (Stage I, frozen) against the other items' -- every other item of the catalog by default (softmax over
  the corpus, "a global contrastive learning objective over the item corpus"), or ``ikd_negatives`` uniform
  random items (accidental hits masked);
- Eq. 12: ``loss = L_rec + ikd_weight * L_IKD`` (UNGER Table 4: weight 1.0).

The integrated embeddings arrive with the semantic-ID directory (``sids.item_embeddings``, written by
``tokenize.method=unger``). Inference never uses them: ``recommend`` is TIGER's beam search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec_dist.errors import ConfigError
from genrec_dist.models.blocks import PositionalEmbedding
from genrec_dist.models.config import UngerConfig
from genrec_dist.models.tiger import Tiger


class Unger(Tiger):
    """``forward(history (B, T), target (B,)) -> {"loss", "rec", "ikd", "ce_level_<l>"}``; ``recommend`` as TIGER."""

    def __init__(self, cfg: UngerConfig, sids):
        super().__init__(cfg, sids)
        d, n_levels = cfg.d_model, self.num_levels
        emb = getattr(sids, "item_embeddings", None)
        if cfg.ikd_weight and emb is None:
            raise ConfigError("model 'unger' with model.unger.ikd_weight > 0 needs the integrated embeddings saved by "
                             "tokenize.method=unger next to the codes (or set model.unger.ikd_weight=0)")
        self.use_ikd = bool(cfg.ikd_weight)
        self.dec_pos = PositionalEmbedding(n_levels + 2, d)  # BOS, c_0 .. c_{L-1}, IKD
        nn.init.normal_(self.dec_pos.weight, std=0.02)
        if self.use_ikd:
            emb_t = torch.as_tensor(emb, dtype=torch.float32)  # (N+1, D_e)
            if emb_t.shape[0] != self.num_items + 1:
                raise ValueError(f"integrated embeddings have {emb_t.shape[0]} rows, need {self.num_items + 1}")
            self.register_buffer("item_emb", emb_t, persistent=False)  # frozen Stage I targets
            self.ikd_token = nn.Parameter(torch.randn(d) * 0.02)
            self.ikd_head = nn.Linear(d, emb_t.shape[1])  # decoder width -> Stage I width
            nn.init.normal_(self.ikd_head.weight, std=0.02)
            nn.init.zeros_(self.ikd_head.bias)

    # ----- Eq. 11 -----
    def ikd_loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """InfoNCE of projected IKD states ``z`` (B, D_e) against the integrated embeddings: the target's row is the
        positive, every other item (or ``ikd_negatives`` sampled ones) a negative."""
        cfg = self.cfg
        z, e = z.float(), self.item_emb.float()  # float32 logits when the model runs in bf16 (DeepSpeed on GPU)
        if cfg.ikd_similarity == "cosine":
            z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
        if cfg.ikd_negatives <= 0:
            logits = z @ e[1:].T / cfg.ikd_temperature  # (B, N): column j = item j + 1
            return F.cross_entropy(logits, target - 1)
        neg = torch.randint(1, self.num_items + 1, (cfg.ikd_negatives,), device=z.device)  # (n,) shared
        pos = (z * e[target]).sum(-1, keepdim=True)  # (B, 1)
        logits = torch.cat([pos, z @ e[neg].T], dim=1) / cfg.ikd_temperature  # (B, 1 + n)
        hit = torch.cat([torch.zeros_like(target[:, None], dtype=torch.bool), neg[None] == target[:, None]], 1)
        return F.cross_entropy(logits.masked_fill(hit, float("-inf")), torch.zeros_like(target))

    # ----- training -----
    def forward(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.use_ikd:  # the "CKA only" ablation: TIGER's objective over unified codes
            out = super().forward(history, target)
            out["rec"] = out["loss"].detach()
            return out
        n_levels = self.num_levels
        target_codes = self.codes[target]  # (B, L)
        bos = torch.full_like(target[:, None], self.bos)
        dec_in = torch.cat([bos, self.item_tokens[target]], dim=1)  # (B, L+1): BOS, c_0..c_{L-1}

        def inputs(rows: torch.Tensor | None) -> torch.Tensor:  # (rows, L+2, D): the codes' tokens, then IKD's
            x = self.embed_decoder(dec_in if rows is None else dec_in[rows])
            ikd = self.drop(self.ikd_token + self.dec_pos(1, n_levels + 1))  # (1, D)
            return torch.cat([x, ikd[None].expand(x.shape[0], -1, -1)], dim=1)

        h = self.decode_batch(history, inputs)  # (B, L+2, D), causal
        out: dict[str, torch.Tensor] = {}
        ces = []
        for level in range(n_levels):
            ce = F.cross_entropy(self.level_logits(h[:, level], level).float(), target_codes[:, level])
            ces.append(ce)
            out[f"ce_level_{level}"] = ce.detach()
        rec = torch.stack(ces).mean()  # Eq. 10
        ikd_loss = self.ikd_loss(self.ikd_head(h[:, n_levels + 1]), target)  # Eq. 11
        out["rec"], out["ikd"] = rec.detach(), ikd_loss.detach()
        out["loss"] = rec + self.cfg.ikd_weight * ikd_loss  # Eq. 12
        return out
