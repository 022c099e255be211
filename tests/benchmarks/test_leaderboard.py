"""benchmarks/leaderboard.py at toy size: every model stops on its wall-clock budget, and the reported test metrics are
those of the export of its best validation step. Real jobs (prepare/train subprocesses), real DeepSpeed, real MLflow
(SQLite store under the workdir); semantic IDs are a deterministic assignment in the real format (category, rank in
category), so the test does not depend on the tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch

from _util import REPO, run_group
from genrec_dist.config import load_config
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.semantic_ids import write_semantic_ids
from genrec_dist.evaluation.split import evaluate_split
from genrec_dist.runs.export import load_exported
from training.test_train_tiger import _category_codes

BUDGET_MIN = 0.08  # 4.8 s of training per model
TINY = {
    "sasrec": ["model.sasrec.d_model=32", "model.sasrec.d_ff=32", "model.sasrec.n_layers=1"],
    "car": ["model.car.d_model=32", "model.car.n_heads=2", "model.car.n_layers=1", "model.car.d_ff=64"],
    "tiger": ["model.tiger.d_model=32", "model.tiger.n_heads=2", "model.tiger.head_dim=16", "model.tiger.d_ff=64",
              "model.tiger.encoder_layers=1", "model.tiger.decoder_layers=1", "evaluate.beam_width=10"],
}


@pytest.fixture(scope="module")
def board(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    sids = str(root / "sids")
    write_semantic_ids(sids, *_category_codes(pl.read_parquet(os.path.join(tiny_dataset, "items.parquet"))),
                       {"source": "test: category + rank in category"})
    out = str(root / "leaderboard.json")
    overrides = [f"workdir={root}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={sids}",
                 "train.batch_size=64", "train.lr=0.003", "train.warmup_steps=10"]
    cmd = [sys.executable, "-m", "benchmarks.leaderboard", "--config", "configs/synthetic.yaml",
           "--budget-min", str(BUDGET_MIN), "--valid-every-min", str(BUDGET_MIN / 4), "--threads", "1",
           "--models", "sasrec,car,tiger", "--sizes", "paper", "--out", out,
           *[a for m, ov in TINY.items() for a in (f"--{m}", *ov)], "--", *overrides]
    proc = run_group(cmd, 840, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    with open(out) as fh:
        return {**json.load(fh), "_path": out}, proc.stdout, overrides


def _cfg(overrides: list[str], model: str):
    """The config a row's run was trained and tested with (the evaluation beam width included)."""
    return load_config(os.path.join(REPO, "configs", "synthetic.yaml"), [*overrides, *TINY[model]])


def test_every_model_stops_on_its_budget(board):
    result, stdout, _ = board
    out = result.pop("_path")
    rows = result["rows"]
    assert set(rows) == {"sasrec", "car_fast", "car_slow", "tiger"}
    assert result["threads"] == 1
    for name, r in rows.items():
        with open(os.path.join(r["run_dir"], "metrics.json")) as fh:
            loop = json.load(fh)["loop"]
        assert loop["stopped_by"] == "budget", (name, loop)
        assert loop["budget_s"] == pytest.approx(BUDGET_MIN * 60)
        # the step that crossed the budget was the last: training time is past it, and not by much more than a step
        assert BUDGET_MIN * 60 <= loop["train_s"] < BUDGET_MIN * 60 + 5, (name, loop)
        assert r["steps"] == loop["steps"] > 0 and r["threads"] == 1
        assert r["samples_per_s"] > 0 and r["parameters"] > 0
        # validations at about every budget/4 of training, the last at the step that crossed the budget
        assert len(r["curve"]) >= 3, (name, r["curve"])
        with open(os.path.join(r["run_dir"], "history.json")) as fh:
            valid = [h for h in json.load(fh) if "valid/ndcg@10" in h]
        assert valid[-1]["step"] == loop["steps"]
    assert rows["sasrec"]["history_length"] == 50 and rows["car_fast"]["history_length"] == 20
    # one table row per model and the picture beside the JSON
    for label in ("SASRec", "CAR fast", "CAR slow", "TIGER", "most-popular"):
        assert f"| {label}" in stdout
    assert os.path.getsize(os.path.join(os.path.dirname(out), result["plot"])) > 1000


def test_reported_metrics_are_the_best_validation_export(board):
    result, _, overrides = board
    for name in ("sasrec", "car_fast", "tiger"):
        cfg = _cfg(overrides, name.split("_")[0])
        dataset = Dataset.open(cfg.dataset_dir)
        r = result["rows"][name]
        with open(os.path.join(r["run_dir"], "history.json")) as fh:
            valid = [h for h in json.load(fh) if "valid/ndcg@10" in h]
        best = max(valid, key=lambda h: h["valid/ndcg@10"])  # the first of ties, as the trainer keeps it
        assert r["best_step"] == r["export_step"] == best["step"], name
        assert r["best_valid_ndcg@10"] == pytest.approx(best["valid/ndcg@10"])
        model, _ = load_exported(r["run_dir"])
        again = evaluate_split(model, dataset, cfg, "test", torch.device("cpu"))["model"]
        prefix = "fast/" if name == "car_fast" else ""
        for k, v in r["test"].items():
            assert again[prefix + k] == pytest.approx(v, abs=1e-9), (name, k)
            if name == "car_fast":
                assert result["rows"]["car_slow"]["test"][k] == pytest.approx(again[f"slow/{k}"], abs=1e-9)
    # CAR's rule for the SASRec comparison is the one with the higher validation score, from the run's own records
    with open(os.path.join(result["rows"]["car_fast"]["run_dir"], "metrics.json")) as fh:
        metrics = json.load(fh)
    slow = metrics["chosen_on_valid"]["slow_weight"]
    valid = {"fast": metrics["best_valid"], "slow": slow["valid"][str(slow["chosen"])]}
    car = result["car_vs_sasrec"]
    assert car["valid"] == pytest.approx(valid)
    assert car["rule"] == ("slow" if valid["slow"] > valid["fast"] else "fast")
    assert car["test_ndcg@10"] == result["rows"][f"car_{car['rule']}"]["test"]["ndcg@10"]
    assert car["ratio"] == pytest.approx(car["test_ndcg@10"] / result["rows"]["sasrec"]["test"]["ndcg@10"])


def test_one_mlflow_parent_run_with_a_child_per_row(board):
    import mlflow

    result, _, overrides = board
    cfg = _cfg(overrides, "sasrec")
    client = mlflow.MlflowClient(f"sqlite:///{os.path.join(os.path.abspath(cfg.workdir), 'mlflow.db')}")
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.data.params["budget_min"] == str(BUDGET_MIN)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["CAR fast", "CAR slow",
                                                         "SASRec (full softmax, every position)", "TIGER"]
    for c in children:
        row = next(r for n, r in result["rows"].items() if c.data.tags["genrec.train_run"] == r["run_name"])
        assert c.data.params["steps"] == str(row["steps"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.png", "leaderboard.md", "leaderboard.json"} <= names


def test_both_protocols_are_reported_for_the_same_export(board):
    """Budget mode validates on the full catalog (the papers' protocol) and tests each export under the seen-item
    filter as well: the filtered numbers are jobs/evaluate.py's on that export, and removing seen items never lowers
    a recall (the target is new for most users)."""
    result, stdout, _ = board
    assert result["mode"] == "budget" and result["protocol"] == "full"
    assert "## full protocol" in stdout and "## seen-filtered protocol" in stdout
    for name, r in result["rows"].items():
        assert r["test_protocols"]["full"] == r["test"]
        with open(os.path.join(r["run_dir"], "eval-test-seen-filtered.json")) as fh:
            again = json.load(fh)
        assert again["config"]["evaluate"]["filter_seen"] is True
        prefix = {"car_fast": "fast/", "car_slow": "slow/"}.get(name, "")
        assert r["test_protocols"]["seen-filtered"] == {k: again["model"][prefix + k] for k in r["test"]}
    assert set(result["car_vs_sasrec_protocols"]) == {"full", "seen-filtered"}


@pytest.fixture(scope="module")
def converged(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("converged")
    out = str(root / "leaderboard.json")
    overrides = [f"workdir={root}", f"paths.dataset={tiny_dataset}", "train.batch_size=64", "train.lr=0.003",
                 "train.warmup_steps=10"]
    cmd = [sys.executable, "-m", "benchmarks.leaderboard", "--config", "configs/synthetic.yaml", "--mode",
           "converged", "--cap-min", "1.5", "--patience", "2", "--threads", "1", "--models", "sasrec", "--sizes",
           "paper", "--out", out, "--sasrec", *TINY["sasrec"], "--", *overrides]
    proc = run_group(cmd, 600, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    with open(out) as fh:
        return json.load(fh)


def test_converged_mode_validates_every_epoch_and_stops_on_patience_or_its_cap(converged):
    assert converged["mode"] == "converged" and converged["protocol"] == "seen-filtered"
    r = converged["rows"]["sasrec"]
    with open(os.path.join(r["run_dir"], "metrics.json")) as fh:
        metrics = json.load(fh)
    loop = metrics["loop"]
    with open(os.path.join(r["run_dir"], "history.json")) as fh:
        valid = [h["step"] for h in json.load(fh) if "valid/ndcg@10" in h]
    spe = loop["steps_per_epoch"]
    assert r["steps_per_epoch"] == spe and all(s % spe == 0 for s in valid[:-1])  # once an epoch
    assert loop["stopped_by"] in ("patience", "budget") and loop["budget_s"] == pytest.approx(90)
    if loop["stopped_by"] == "patience":  # the best validation is two epochs before the end
        assert valid.index(metrics["best_step"]) == len(valid) - 3
    assert r["test_protocols"]["seen-filtered"] == r["test"] and "full" in r["test_protocols"]


def test_seed_means_average_each_model_over_seeds_and_ratio_each_seed():
    """``--seeds``: a row holds the mean test metrics over seeds, CAR's rule is chosen on the mean validation, and
    CAR over SASRec is reported as the ratio of the means and seed by seed."""
    from benchmarks.leaderboard import KEYS, car_vs_sasrec, seed_means

    def row(ndcg: float, valid: float | None = None) -> dict:
        metrics = {k: ndcg for k in KEYS}
        return {"test": metrics, "test_protocols": {"seen-filtered": metrics, "full": {k: ndcg / 2 for k in KEYS}},
                "valid_metric": valid, "best_valid_ndcg@10": valid or ndcg, "run_name": "r", "steps": 1,
                "stopped_by": "patience", "train_minutes": 1.0, "curve": []}

    sets = [{"sasrec": row(0.10), "car_fast": row(0.10, 0.2), "car_slow": row(0.12, 0.1)},   # seed 1
            {"sasrec": row(0.08), "car_fast": row(0.10, 0.2), "car_slow": row(0.08, 0.4)}]   # seed 2
    rows, _ = seed_means(sets, [{}, {}], [1, 2])
    assert rows["sasrec"]["test"]["ndcg@10"] == pytest.approx(0.09)
    assert rows["car_slow"]["valid_metric"] == pytest.approx(0.25)  # > fast's 0.2: slow is chosen
    assert [s["seed"] for s in rows["car_slow"]["per_seed"]] == [1, 2]
    car = car_vs_sasrec(rows, "seen-filtered")
    assert car["rule"] == "slow" and car["ratio"] == pytest.approx(0.10 / 0.09)
    assert car["ratio_per_seed"] == pytest.approx([1.2, 1.0])
    one, _ = seed_means(sets[:1], [{}], [None])  # one seed: the rows as they are
    assert one["sasrec"]["test"]["ndcg@10"] == 0.10 and "per_seed" not in one["sasrec"]
