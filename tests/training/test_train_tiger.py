"""TIGER through the training engine on the tiny synthetic catalog beats most-popular.

Semantic IDs are built here from a simple deterministic assignment (level 0 = the item's category, level 1 = its
rank inside the category, so codes are unique), written with the real semantic-ID format, so this test does not
depend on the tokenizer."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl

from _util import REPO, run_job
from genrec_dist.data.semantic_ids import write_semantic_ids

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")
TINY_TIGER = ["train.model=tiger", "model.tiger.d_model=32", "model.tiger.n_heads=2", "model.tiger.head_dim=16",
              "model.tiger.d_ff=64", "model.tiger.encoder_layers=1", "model.tiger.decoder_layers=1",
              "batch_size=64", "max_steps=100", "lr=0.003", "warmup_steps=10", "eval_every=50",
              "checkpoint_every=0", "log_every=10", "evaluate.beam_width=20"]


def _category_codes(items: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, list[int]]:
    cats = items["categories"].to_list()
    cat_id = {c: i for i, c in enumerate(sorted(set(cats)))}
    level0 = np.array([cat_id[c] for c in cats])
    level1 = np.zeros(len(cats), dtype=np.int64)
    for c in set(level0):
        idx = np.flatnonzero(level0 == c)
        level1[idx] = np.arange(len(idx))
    codes = np.stack([level0, level1], axis=1)
    return items["item_id"].to_numpy(), codes, [len(cat_id), int(level1.max()) + 1]


def test_tiger_beats_most_popular(tiny_cfg, tiny_dataset, tmp_path):
    items = pl.read_parquet(os.path.join(tiny_dataset, "items.parquet"))
    item_ids, codes, sizes = _category_codes(items)
    sids_dir = str(tmp_path / "sids")
    write_semantic_ids(sids_dir, item_ids, codes, sizes, {"source": "test: category + rank in category"})
    run_job("train", "--config", CONFIG, f"workdir={tiny_cfg.workdir}", f"paths.semantic_ids={sids_dir}",
            *TINY_TIGER, "run_name=tiger-tiny")
    with open(os.path.join(tiny_cfg.workdir, "runs", "tiger-tiny", "metrics.json")) as fh:
        m = json.load(fh)
    model, pop = m["model"], m["most_popular"]
    assert model["ndcg@10"] >= 1.2 * pop["ndcg@10"], (model, pop)
    assert model["recall@10"] >= pop["recall@10"] + 0.05, (model, pop)
