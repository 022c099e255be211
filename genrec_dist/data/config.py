"""The ``prepare:`` section: where raw interactions and item text come from and how they are cleaned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SyntheticConfig:
    """Sizes of the deterministic synthetic catalog (see ``genrec_dist/data/synthetic.py`` for its structure)."""

    num_items: int = 600
    num_users: int = 1500
    num_categories: int = 12
    min_length: int = 6
    max_length: int = 30
    # Probability that the next item stays in the user's current category (otherwise the user drifts).
    stay_prob: float = 0.8
    # Probability that a step is a globally popular item, regardless of category (popularity noise).
    popular_prob: float = 0.1
    # When a user drifts: probability of moving to the *next* category on the ring (learnable), else a random one.
    next_category_prob: float = 0.7
    # Probability that a within-category step takes the successor of the previous item in its product line.
    successor_prob: float = 0.3
    # Users are generated (and held) this many at a time; a catalog of at most one chunk is drawn as one block.
    users_per_chunk: int = 50_000


@dataclass
class PrepareConfig:
    """``source`` picks the reader; the other fields apply to every source."""

    source: Literal["synthetic", "amazon2014", "lcrec", "parquet", "csv"] = "synthetic"
    # amazon2014: folder with reviews_<Category>_5.json.gz (or reviews_<Category>.json.gz) and meta_<Category>.json.gz
    # lcrec:      folder with <Name>.inter.json[.gz] and <Name>.item.json[.gz]
    # parquet/csv: folder with interactions.<ext> and items.<ext> (names below)
    # Local (relative to the working directory: run jobs from the repository root) or s3://.
    input_dir: str = ""
    name: str = ""  # Category (amazon2014) or Name (lcrec)
    # amazon2014: "5core" reads reviews_<Category>_5.json.gz; "full" reads reviews_<Category>.json.gz and k-cores it.
    reviews: Literal["5core", "full"] = "5core"
    interactions_file: str = "interactions"
    items_file: str = "items"
    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    # Iterative k-core: drop users and items with fewer than k interactions until none is left (papers: 5-core).
    k_core: int = 5
    # Item text: a Python format template over the item's fields; a missing field renders as empty.
    # Sentence-T5 in TIGER/UNGER/CAR embeds title, brand, categories (and description, UNGER §4.1.3).
    text_template: str = "{title}. Brand: {brand}. Categories: {categories}. {description}"
    max_text_chars: int = 2000
    # Leave-one-out split: last item test, second to last valid (TIGER §4.1; UNGER §4.1.1; CAR's setup follows TIGER).
    max_history: int = 20
    num_shards: int = 4
    overwrite: bool = False
    # Peak memory of prepare follows this (MiB), not the input's size: it sets the rows read per batch and the
    # number of hash buckets the cleaning works through one at a time (docs/scale.md). Tables of distinct users
    # and items stay whole (they scale with the catalog, not the interactions).
    memory_budget_mb: int = 1024
    # Where the buckets are spilled (a local folder; empty: the system's temporary folder).
    spill_dir: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
