"""CAR through the real training engine: 2 CPU ranks under the `deepspeed` launcher with ZeRO-2 on the tiny synthetic
catalog, then the run's test metrics (fast and slow inference) against most-popular.

Semantic IDs come from a deterministic assignment written in the real format (level 0 = the item's category,
level 1 = its rank inside the category // 3, so 3 items share each code and only CAR's uid tells them apart); the
test does not depend on the tokenizer. The launch helpers are test_train_runs.py's."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import polars as pl
import pytest

from _util import free_port, run_job
from genrec_dist.data.semantic_ids import write_semantic_ids
from genrec_dist.tracking import make_tracker
from genrec_dist.training.dist import SHM_COMM_OP
from test_train_runs import _base, _client, _deepspeed, _runs_named
from test_train_tiger import _category_codes

TINY_CAR = ["train.model=car", "model.car.d_model=32", "model.car.n_heads=2", "model.car.n_layers=1",
            "model.car.d_ff=64", "batch_size=64", "max_steps=80", "lr=0.003", "warmup_steps=10", "eval_every=40",
            "checkpoint_every=0", "log_every=10", "patience=0"]


def test_car_trains_on_two_zero2_ranks_and_beats_most_popular(tiny_cfg, tiny_dataset, tmp_path):
    items = pl.read_parquet(os.path.join(tiny_dataset, "items.parquet"))
    item_ids, codes, sizes = _category_codes(items)
    codes[:, 1] //= 3  # collisions on purpose: CAR keeps non-unique SIDs
    sizes[1] = int(codes[:, 1].max()) + 1
    assert len(np.unique(codes, axis=0)) < len(codes)
    sids_dir = str(tmp_path / "sids")
    write_semantic_ids(sids_dir, item_ids, codes, sizes, {"source": "test: category + rank in category // 3"})
    # DeepSpeed's CPU shared-memory all-reduce op is not built: an extensions folder holding the lock of a build
    # that died (every start would wait on it forever) does not stop the ranks, and no segment of the op (RAM under
    # /dev/shm) is made for this launch (genrec_dist/training/dist.py)
    extensions = tmp_path / "torch_extensions"
    (extensions / SHM_COMM_OP).mkdir(parents=True)
    (extensions / SHM_COMM_OP / "lock").touch()  # torch.utils.cpp_extension's lock of that op's build
    port = free_port()
    _deepspeed(["--num_gpus", "2", "--master_port", str(port), "jobs/train.py", *_base(tiny_cfg),
                f"paths.semantic_ids={sids_dir}", *TINY_CAR, "zero_stage=2", "run_name=car-zero2"],
               tmp_path / "car-zero2.log", env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    segments = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n] \
        if os.path.isdir("/dev/shm") else []
    assert segments == [], segments
    run_dir = os.path.join(tiny_cfg.workdir, "runs", "car-zero2")
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        m = json.load(fh)
    with open(os.path.join(run_dir, "history.json")) as fh:
        history = json.load(fh)
    (run,) = _runs_named(tiny_cfg, "car-zero2")  # one MLflow run for the 2-rank launch
    assert run.data.params["world_size"] == "2"
    assert json.loads(run.data.params["deepspeed_config"])["zero_optimization"]["stage"] == 2
    # (the tracker writes "@" as "_at_" in MLflow metric names)
    assert "test/slow/recall_at_10" in run.data.metrics and "train/think_loss" in run.data.metrics
    model, pop = m["model"], m["most_popular"]
    # 300 test users: a recall gap of 0.08 is > 2 standard errors (one run at these settings: +0.14)
    assert model["recall@10"] >= pop["recall@10"] + 0.08, (model, pop)
    assert model["ndcg@10"] >= 1.1 * pop["ndcg@10"], (model, pop)
    # fast and slow inference are both reported, and slow thinking also beats most-popular
    assert model["fast/recall@10"] == model["recall@10"]
    assert model["slow/recall@10"] >= pop["recall@10"] + 0.05, (model, pop)
    # the loss parts reach the engine's metrics, and the curve went down
    losses = [h for h in history if "train/loss" in h]
    assert {"train/act_loss", "train/think_loss"} <= set(losses[-1])
    assert losses[-1]["train/loss"] < losses[0]["train/loss"] - 0.3

    # slow inference's weight was chosen on the validation split, kept in the export and logged
    chosen = m["chosen_on_valid"]["slow_weight"]
    grid = [float(w) for w in tiny_cfg.model.car.slow_weight_grid]
    assert [float(v) for v in chosen["valid"]] == grid
    assert chosen["valid"][str(chosen["chosen"])] == max(chosen["valid"].values())
    with open(os.path.join(run_dir, "model", "model.json")) as fh:
        assert json.load(fh)["model_config"]["car"]["slow_weight"] == chosen["chosen"]
    assert run.data.metrics["valid/slow_weight_chosen"] == chosen["chosen"]

    # evaluate may change inference-time fields of the exported model, and nothing else of it
    from genrec_dist.evaluation.job import evaluate_run

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.car.slow_weight = 0.0  # slow with weight 0 ranks by the uid head alone: it must equal fast
    out = evaluate_run(cfg, run_dir, ["model.car.slow_weight=0.0"], tracking=make_tracker)
    assert out["inference_overrides"] == {"slow_weight": 0.0}
    assert out["model"]["slow/recall@10"] == out["model"]["fast/recall@10"] == model["fast/recall@10"]
    assert out["model"]["slow/ndcg@10"] == out["model"]["fast/ndcg@10"]
    assert "slow_weight=0.0" in out["table"]
    with pytest.raises(ValueError, match=r"model\.car\.n_layers=3: .* was trained with 1 and its weights fix it"):
        cfg3 = copy.deepcopy(tiny_cfg)
        cfg3.model.car.n_layers = 3
        evaluate_run(cfg3, run_dir, ["model.car.n_layers=3"], tracking=make_tracker)
    # the overrides the run was trained with may be given again (one override list for every job), and other
    # models' sections do not concern a CAR run
    cfg1 = copy.deepcopy(tiny_cfg)
    cfg1.model.car.n_layers = 1
    again = evaluate_run(cfg1, run_dir, ["model.car.n_layers=1", "model.tiger.beam_width=3"], tracking=make_tracker)
    assert again["inference_overrides"] == {} and again["model"]["fast/recall@10"] == model["fast/recall@10"]

    # the export carries the codes it was trained on (in MLflow too): with the tokenize output gone (or overwritten
    # by a later tokenize), the run is still evaluated with its own codes
    assert sorted(os.listdir(os.path.join(run_dir, "model", "semantic_ids"))) == [
        "manifest.json", "semantic_ids.parquet", "stats.json"]
    client = _client(tiny_cfg)
    assert "model/semantic_ids/semantic_ids.parquet" in {
        a.path for a in client.list_artifacts(run.info.run_id, "model/semantic_ids")}
    shutil.rmtree(sids_dir)
    # the job without --config evaluates with the run's own saved config: it logs to the training run's MLflow store
    # (the defaults would write a store under outputs/ of the working dir, here an empty temp dir), and its
    # validation reading of the exported slow weight is the one training chose it by
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = run_job("evaluate", "--run", run_dir, "split=valid", cwd=str(cwd))
    assert f"evaluate: config {os.path.join(run_dir, 'config.yaml')} + 1 override" in proc.stdout
    assert os.listdir(cwd) == []
    with open(os.path.join(run_dir, "eval-valid.json")) as fh:
        valid = json.load(fh)["model"]
    assert valid[f"slow/{chosen['metric']}"] == pytest.approx(chosen["valid"][str(chosen["chosen"])], abs=1e-9)
    (ev,) = [r for r in _runs_named(tiny_cfg, "car-zero2-evaluate") if "valid/slow/recall_at_10" in r.data.metrics]
    assert ev.data.tags["genrec.train_run_id"] == run.info.run_id
