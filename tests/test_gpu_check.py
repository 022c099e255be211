"""scripts/gpu_check.sh, the one GPU check, in its toy --dry mode on the CPU (so it cannot rot before a GPU is lent):
every model trains and ranks, the paper-size slice runs on data exported from a prepared dataset and its codes, and
the JSON says which checks were skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl

from _util import REPO
from genrec_dist.data.semantic_ids import write_semantic_ids
from training.test_train_tiger import _category_codes


def test_dry_run_covers_every_check(tiny_dataset, tmp_path):
    sids = str(tmp_path / "sids")
    write_semantic_ids(sids, *_category_codes(pl.read_parquet(os.path.join(tiny_dataset, "items.parquet"))),
                       {"source": "test: category + rank in category"})
    data, out = str(tmp_path / "slice.npz"), str(tmp_path / "gpu_check.json")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", "scripts/gpu_check.sh", "--export", "configs/synthetic.yaml", "--data", data,
                    f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={sids}"], cwd=REPO, env=env, check=True,
                   timeout=300)
    assert os.path.getsize(data) < 64 * 2**20  # what may travel to the device with one call
    subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--data", data, "--out", out], cwd=REPO, env=env,
                   check=True, timeout=300)
    with open(out) as fh:
        result = json.load(fh)
    assert result["dry"] is True and result["env"]["matmul_tflops_float32"] > 0
    for name in ("sasrec", "car", "tiger", "unger"):
        assert result["train"][name]["samples_per_s"] > 0 and result["train"][name]["parameters"] > 0
        assert result["ranking"][name]["users_per_s"] > 0
    for name in ("sasrec", "car"):
        row = result["slice"][name]
        assert row["steps"] > 0 and 0.0 <= row["test_seen_filtered_ndcg@10"] <= 1.0
    assert "skipped" in result["nccl"] and "skipped" in result["zero"]  # no CUDA here: said, not faked
