"""The ``model:`` section: hyper-parameters of each registered model (picked by ``train.model``).

One sub-section per model, so an ablation is a config field (``model.tiger.decoder_layers=2``), not a new file.
Defaults are the papers' where a paper gives a number (cited next to it). The section itself (``ModelConfig``, one
field per model) is made by the registry in :mod:`genrec_dist.models` from these classes.

A field marked ``INFERENCE`` changes how a trained model ranks, not its weights: ``jobs/evaluate.py`` may override it
for an exported model (``model.car.slow_weight=0.1``); every other field is fixed by the weights it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

INFERENCE = {"inference": True}


@dataclass
class TigerConfig:
    """TIGER (Rajput et al., NeurIPS 2023): encoder-decoder over semantic-ID tokens. Sizes from TIGER's
    implementation details (§4, T5-style). The paper's ~13M parameters include
    2000 hashed user tokens, left out here (the model contract carries no user ids): ~4.7M at Beauty size."""

    d_model: int = 128  # TIGER §4
    n_heads: int = 6  # TIGER §4: 6 heads x 64
    head_dim: int = 64  # TIGER §4 (inner attention width 384 > d_model, as in T5)
    d_ff: int = 1024  # TIGER §4: MLP 1024
    encoder_layers: int = 4  # TIGER §4: 4 + 4 layers (3/4/5 layers barely differ, TIGER's ablation)
    decoder_layers: int = 4
    dropout: float = 0.1  # TIGER §4
    max_history: int = 20  # items; TIGER §4 / UNGER §4.1.1 cut histories to 20
    # Training: a batch's rows run in groups of this many rows of similar history length, each trimmed to its longest
    # (blocks.by_length: the same loss, without computing most of the padding); 0 = one padded batch.
    length_group_rows: int = 32
    # Beam width of recommend(); evaluate may pass another. cornac: beam 50 ~ exact full ranking (<0.5% off);
    # XiaoLongtaoo/TIGER uses 30, UNGER up to 100 (UNGER Table 4).
    beam_width: int = field(default=50, metadata=INFERENCE)


@dataclass
class SASRecConfig:
    """SASRec (Kang & McAuley, ICDM 2018): causal self-attention over item ids."""

    d_model: int = 64  # SASRec implementation details: d=50; 64 keeps heads aligned (cornac's tuned run: 128)
    n_heads: int = 1  # SASRec: single head
    n_layers: int = 2  # SASRec: b=2 self-attention blocks
    d_ff: int = 64  # SASRec §III: the point-wise FFN's W1, W2 are d x d
    dropout: float = 0.5  # SASRec: 0.5 on the sparse Amazon sets (0.2 on MovieLens-1M)
    max_history: int = 50  # SASRec §IV-B: n=50 on Amazon (prepare.max_history keeps 50 for it)
    # Training: a batch's rows run in groups of this many rows of similar history length, each trimmed to its longest
    # (blocks.by_length: the same loss, without computing most of the padding); 0 = one padded batch.
    length_group_rows: int = 32
    # Full-softmax CE over the catalog is far stronger than the paper's BCE with one negative (numbers:
    # docs/results.md); 'sampled' (uniform negatives, accidental hits masked) is for
    # catalogs too large for a (B, num_items) logit matrix; 'auto' = softmax up to full_softmax_max_items, sampled
    # above.
    loss: Literal["auto", "softmax", "sampled"] = "auto"
    num_negatives: int = 256  # eSASRec (Tikhonovich et al., RecSys 2025, §4.1): 256 uniform negatives
    # Sampled softmax negatives: 'position' draws num_negatives for every trained position (eSASRec's benchmark, no
    # logQ correction); 'batch' shares one draw across the batch (cheaper, weaker: docs/results.md).
    negatives: Literal["position", "batch"] = "position"
    # Every position of a history predicts its next item in one causal pass (SASRec §III-E trains all positions;
    # train.examples auto then reads windows). False: only the last position (one example per prefix).
    all_positions: bool = True
    # Learned positions counted from the most recent item (from_end: SASRec's left-padded layout, the last item
    # always in the last slot) or from the first item of the history (from_start: a position's state is then the
    # same whether it is read inside a window or as the last item of its own prefix).
    positions: Literal["from_end", "from_start"] = "from_end"
    # The softmax's logits and their gradient are 2 x B x N float32 per rank: at B = 256 and N = 1M that is 2 GiB,
    # half of a 4 GB training rank; above it the logits alone would outgrow the model, so 'auto' samples.
    full_softmax_max_items: int = 1_000_000


@dataclass
class CARConfig:
    """CAR (arXiv 2506.23643): decoder-only over chunks [sid_1..sid_L, uid]; every choice the paper leaves open is
    documented in docs/design.md ("CAR"). The paper's GPT-2 size, alpha and L are not
    recoverable from its text: sizes match TIGER's d_model for a like-for-like comparison."""

    mode: Literal["car", "ar"] = "car"  # ar = the paper's "AR" ablation: token-level next-token LM + beam search
    d_model: int = 128  # = TIGER §4.1 (paper: GPT-2, size not stated)
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512  # GPT-2's 4 x d_model
    dropout: float = 0.1  # TIGER §4.1
    max_history: int = 20  # items; TIGER §4.1 / UNGER §4.1.1 (CAR's setup follows TIGER's protocol)
    # Training: a batch's rows run in groups of this many rows of similar history length, each trimmed to its longest
    # (blocks.by_length: the same loss, without computing most of the padding); 0 = one padded batch.
    length_group_rows: int = 32
    levels: int = 0  # SID levels read (0 = all); the paper's SID-depth study uses 1..4
    drop_dedup_level: bool = True  # CAR keeps non-unique SIDs, the uid disambiguates (CAR's semantic IDs)
    fusion: Literal["none", "sum", "mean"] = "mean"  # none = ablation "w/o F"
    alpha: float = 1.0  # loss = act + alpha * think; CAR's objective is L_think + L_act (docs/design.md); 0 = "w/o T"
    all_positions: bool = True  # every history chunk predicts the next one (T signals per example), not only the last
    tie_embeddings: bool = True  # heads share the input tables (GPT-2)
    # full softmax over items; sampled / in_batch from ~100k items (memory of M x N logits, docs/design.md);
    # auto = full up to full_softmax_max_items, sampled above.
    uid_loss: Literal["auto", "full", "sampled", "in_batch"] = "auto"
    num_negatives: int = 1024  # uniform negatives shared by the batch (uid_loss=sampled)
    # Every chunk trains, so the uid softmax has M = B x T = 256 x 20 = 5120 rows: its logits and their gradient are
    # 2 x 5120 x N float32, 4 GiB at N = 100k, a whole 4 GB rank; above it 'auto' samples.
    full_softmax_max_items: int = 100_000
    # fast: uid head; slow: + slow_weight x SID-path log-probs
    inference: Literal["fast", "slow"] = field(default="fast", metadata=INFERENCE)
    slow_weight: float = field(default=1.0, metadata=INFERENCE)  # 1 = the chunk's joint log-prob (CAR's factorisation)
    # The paper's exact slow rule is not recoverable (docs/design.md): at the end of training slow_weight is chosen
    # among these on the validation split (train.early_stop_metric) and kept in the export; [] keeps slow_weight.
    # The weights chosen in our runs: docs/results.md.
    slow_weight_grid: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0], metadata=INFERENCE)
    beam_width: int = field(default=50, metadata=INFERENCE)  # mode=ar only; same as TigerConfig.beam_width


@dataclass
class UngerConfig(TigerConfig):
    """UNGER Stage II (genrec_dist/models/unger.py): TIGER's encoder-decoder over unified codes + the IKD token.
    Sizes: UNGER §4.1.3 / Table 4."""

    d_model: int = 96  # UNGER Table 4: embedding dimension 96 (§4.5.3: best width)
    n_heads: int = 6  # UNGER Table 4
    head_dim: int = 16  # d_model / n_heads
    d_ff: int = 256  # UNGER Table 4: hidden size 256
    encoder_layers: int = 1  # UNGER §4.1.3
    decoder_layers: int = 4  # UNGER §4.1.3
    dropout: float = 0.0  # UNGER Table 4
    beam_width: int = field(default=100, metadata=INFERENCE)  # UNGER Table 4
    ikd_weight: float = 1.0  # Eq. 12 (UNGER Table 4: 1.0); 0 = the "CKA only" ablation (Table 8)
    ikd_temperature: float = 0.1  # Eq. 11 tau; not given by UNGER (docs/design.md)
    ikd_similarity: Literal["cosine", "dot"] = "cosine"
    # Negatives of Eq. 11: 0 = every other item of the catalog ("global contrastive objective over the item
    # corpus", §3.4.3); n > 0 = n uniform random items shared by the batch (for very large catalogs).
    ikd_negatives: int = 0

