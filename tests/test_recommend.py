"""Batch recommendations (jobs/recommend.py) of tiny trained runs: one row per user, the model's own top-k with its
scores in every inference mode (CAR fast and slow, TIGER's beam), seen items excluded on request, nothing committed
by a failed run, and the same output from `ray job submit` on a real head as from a local run.

Two tiny models are trained once for the session (tests/conftest.py ``car_run``, ``tiger_run``) with the real training job (30 steps: the ranking only has to be
the model's, not a good one). Semantic IDs are the deterministic category codes of test_train_tiger.py."""

from __future__ import annotations

import os
import sys

import numpy as np
import polars as pl
import pytest
import torch

from _util import REPO, SHORT, run_job
from genrec_dist import storage
from genrec_dist.config import load_config
from genrec_dist.data.dataset import Dataset
from genrec_dist.evaluation.recommend import Recommender, RecommendInputError
from genrec_dist.runs.export import load_exported

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")


def _users(tiny_dataset) -> pl.DataFrame:
    """The dataset's users: ``user`` (source id) and ``history`` (the whole sequence, oldest first)."""
    return Dataset.open(tiny_dataset).sequences().select("user", pl.col("items").alias("history"))


def _padded(history, width: int) -> torch.Tensor:
    h = list(history)[-width:]
    return torch.tensor([[0] * (width - len(h)) + h])


def _read(path: str) -> pl.DataFrame:
    manifest = storage.require_manifest(path)
    return pl.concat([pl.read_parquet(os.path.join(path, f)) for f in manifest["files"]]).sort("user")


def _cfg(tiny_cfg, *overrides):
    return load_config(CONFIG, [f"workdir={tiny_cfg.workdir}", f"paths.dataset={tiny_cfg.dataset_dir}", *overrides],
                       default_section="recommend")


# ----- the callable class alone: the model's own top-k and scores, every inference mode ----------------------------

def test_recommender_is_the_models_own_topk_in_every_mode(car_run, tiger_run, tiny_dataset):
    users = _users(tiny_dataset).head(40)
    batch = {"user": users["user"].to_numpy(), "history": np.array([np.array(h) for h in users["history"]],
                                                                   dtype=object)}
    for run, inference, kwargs in ((car_run, {}, {"inference": "fast"}),
                                   (car_run, {"inference": "slow"}, {"inference": "slow"}),
                                   (tiger_run, {}, {"beam_width": 12})):
        rec = Recommender(run, k=10, inference=inference)
        out = rec(batch)
        model, _ = load_exported(run, None, inference)
        width = model.cfg.max_history
        assert out["items"].shape == out["scores"].shape == (40, 10)
        assert list(out["user"]) == users["user"].to_list()
        for row, history in enumerate(users["history"]):
            want = model.recommend(_padded(history, width), 10, **kwargs)[0].tolist()
            assert out["items"][row].tolist() == want, (run, inference, row)
        assert (np.diff(out["scores"], axis=1) <= 1e-6).all()  # best first
        if "inference" in kwargs:  # CAR: the item's own ranking score (log-prob, + slow_weight x SID path)
            h = _padded(users["history"][0], width)
            np.testing.assert_allclose(out["scores"][0], model.scores(h, kwargs["inference"])[0, out["items"][0]],
                                       rtol=1e-5, atol=1e-5)
        else:  # a beam's log-probability: negative, and finite for the items found
            assert (out["scores"] < 0).all() and np.isfinite(out["scores"]).all()

    # exclusion: none of the user's items; for CAR exactly the unexcluded ranking with the seen items taken out
    rec = Recommender(car_run, k=10, exclude_seen=True)
    full = Recommender(car_run, k=60)(batch)
    out = rec(batch)
    for row, history in enumerate(users["history"]):
        assert not set(out["items"][row].tolist()) & set(history)
        assert out["items"][row].tolist() == [i for i in full["items"][row].tolist() if i not in set(history)][:10]
    # a row the model cannot read names the user and the item
    bad = {"user": np.array(["a", "b"]), "history": np.array([np.array([1, 2]), np.array([3, 9999])], dtype=object),
           "path": np.array(["f.parquet", "f.parquet"])}
    with pytest.raises(RecommendInputError, match=r"f.parquet: user 'b': 'history' item 9999 is not an item id"):
        rec(bad)


# ----- the job ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job_output(car_run, tmp_path_factory):
    """`python jobs/recommend.py --run <run dir>` from another working dir (the run's own saved config)."""
    cwd = tmp_path_factory.mktemp("rec-cwd")
    proc = run_job("recommend", "--run", car_run, "k=10", "num_workers=2", "batch_size=64", cwd=str(cwd))
    return os.path.join(car_run, "recommendations"), proc


def test_job_one_row_per_user_the_models_topk_and_mlflow(job_output, car_run, tiny_cfg, tiny_dataset):
    path, proc = job_output
    assert "users/s" in proc.stdout and "recommendations: " + path in proc.stdout
    out = _read(path)
    users = _users(tiny_dataset).sort("user")
    assert out["user"].to_list() == users["user"].to_list()  # one row per user, each once
    assert out.schema["items"] == pl.List(pl.Int64) and out.schema["scores"] == pl.List(pl.Float32)
    model, _ = load_exported(car_run)
    for row in (0, 123):
        want = model.recommend(_padded(users["history"][row], model.cfg.max_history), 10)[0].tolist()
        assert out["items"][row].to_list() == want
    manifest = storage.require_manifest(path)
    assert manifest["users"] == len(users) and manifest["model"] == "car"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{os.path.join(tiny_cfg.workdir, 'mlflow.db')}")
    exp = client.get_experiment_by_name("genrec-dist")
    # this job's run: the session's CAR run is recommended from by other tests too (runs of the same name)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`genrec.recommend_output` = '{path}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "rec-car-recommend"
    assert run.data.metrics["users"] == len(users) and run.data.metrics["users_per_s"] > 0
    assert run.data.params["recommend.k"] == "10"
    # an existing output is not replaced without overwrite=true, before any work (one line, no traceback)
    again = run_job("recommend", "--run", car_run, check=False)
    assert again.returncode == 1 and "already exists (pass overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr


def test_users_table_slow_beam_exclusion_and_failed_write(car_run, tiger_run, tiny_cfg, tiny_dataset, tmp_path,
                                                         ray_local):
    """In process on the session's Ray: a Parquet users table (two files), CAR slow with exclusion, TIGER's beam,
    and a table with a bad row in its second file: the error names the file and user; nothing is committed."""
    from genrec_dist.ray_recommend import run_recommend
    from genrec_dist.tracking import NullTracker

    def _no_tracker(*args, **kwargs):  # the job's tracker factory, tracking off
        return NullTracker()

    users = _users(tiny_dataset).head(50).with_columns(pl.col("user").str.to_uppercase())
    table = tmp_path / "users"
    table.mkdir()
    users.head(30).write_parquet(table / "a.parquet")
    users.tail(20).write_parquet(table / "b.parquet")
    out_dir = tmp_path / "out"
    cfg = _cfg(tiny_cfg, f"users={table}", f"output={out_dir}/slow", "k=5", "exclude_seen=true", "num_workers=1",
               "model.car.inference=slow", "batch_size=16")
    summary = run_recommend(cfg, car_run, ["model.car.inference=slow"], tracking=_no_tracker, log=lambda m: None)
    got = _read(summary["output"])
    assert summary["users"] == 50 and got["user"].to_list() == sorted(users["user"].to_list())
    model, _ = load_exported(car_run, None, {"inference": "slow"})
    for user, history, items in zip(*[got.join(users, on="user")[c] for c in ("user", "history", "items")]):
        assert not set(items) & set(history), user
        full = model.recommend(_padded(history, model.cfg.max_history), 60)[0].tolist()
        assert list(items) == [i for i in full if i not in set(history)][:5]
    assert storage.require_manifest(summary["output"])["inference_overrides"] == {"inference": "slow"}

    cfg = _cfg(tiny_cfg, f"output={out_dir}/tiger", "k=5", "num_workers=1", "beam_width=12")
    got = _read(run_recommend(cfg, tiger_run, [], tracking=_no_tracker, log=lambda m: None)["output"])
    model, _ = load_exported(tiger_run)
    row = got.join(_users(tiny_dataset), on="user").row(7, named=True)
    assert row["items"] == model.recommend(_padded(row["history"], model.cfg.max_history), 5, beam_width=12)[0].tolist()

    bad = users.tail(20).with_columns(pl.when(pl.col("user") == users["user"][40]).then(pl.lit([1, 5000]))
                                      .otherwise(pl.col("history")).alias("history"))
    bad.write_parquet(table / "b.parquet")
    cfg = _cfg(tiny_cfg, f"users={table}", f"output={out_dir}/bad", "k=5", "num_workers=1", "batch_size=8")
    with pytest.raises(RecommendInputError, match=rf"b.parquet: user '{users['user'][40]}': 'history' item 5000 is"):
        run_recommend(cfg, car_run, [], tracking=_no_tracker, log=lambda m: None)
    assert sorted(os.listdir(out_dir)) == ["slow", "tiger"]  # no "bad", no staging area left behind
    # a table without a history column is named as such
    users.select("user").write_parquet(table / "b.parquet")
    os.remove(table / "a.parquet")
    with pytest.raises(RecommendInputError, match=r"no column 'history'"):
        run_recommend(cfg, car_run, [], tracking=_no_tracker, log=lambda m: None)


def test_ray_job_submit_to_a_real_head_equals_the_local_run(job_output, car_run, tmp_path, ray_head):
    """`cluster/start_ray.sh head` -> `ray job submit --working-dir` -> SUCCEEDED, the same rows as the local run."""
    out = str(tmp_path / "cluster-recs")
    proc = ray_head.submit("recommend-test", sys.executable, "jobs/recommend.py", "--run", car_run, "k=10",
                           "num_workers=2", "batch_size=64", f"output={out}")
    assert "recommend-test' succeeded" in ray_head.status("recommend-test"), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "on Ray (" in proc.stdout and "(local)" not in proc.stdout  # it joined the head, no Ray of its own
    local, cluster = _read(job_output[0]), _read(out)
    assert cluster["user"].to_list() == local["user"].to_list()
    assert cluster["items"].to_list() == local["items"].to_list()
    np.testing.assert_allclose(np.array(cluster["scores"].to_list()), np.array(local["scores"].to_list()),
                               rtol=1e-5, atol=1e-5)


def test_help_runs():
    proc = run_job("recommend", "--help")
    assert "usage: jobs/recommend.py" in proc.stdout and proc.stdout.count("usage:") == 1


def test_a_run_trained_with_relative_paths_is_used_through_ray_job_submit(tiny_dataset, tmp_path, ray_head):
    """The README demo's way: a run trained from its own folder with a relative workdir. Recommend and evaluate then
    use it through ``ray job submit --working-dir`` (the driver runs in a temporary copy of the repo, elsewhere) with
    absolute overrides: the run records absolute locations, and the overrides win over what it recorded."""
    import shutil

    shutil.copytree(tiny_dataset, tmp_path / "outputs" / "rel" / "dataset")
    run_job("train", "--config", CONFIG, "workdir=outputs/rel", "train.model=sasrec", "model.sasrec.d_model=16",
            "model.sasrec.d_ff=16", "model.sasrec.n_layers=1", *SHORT, "max_steps=10", "run_name=rel",
            cwd=str(tmp_path))
    root = str(tmp_path / "outputs" / "rel")
    run_dir = os.path.join(root, "runs", "rel")
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        saved = fh.read()
    assert f"dataset: {root}/dataset" in saved and f"workdir: {root}" in saved  # recorded absolute
    abs_paths = [f"workdir={root}", f"paths.dataset={root}/dataset", f"paths.runs={root}/runs"]
    proc = ray_head.submit("relative-recommend", sys.executable, "jobs/recommend.py", "--run", run_dir, *abs_paths,
                           f"output={tmp_path}/recs", "num_workers=1", "k=5")
    assert "relative-recommend' succeeded" in ray_head.status("relative-recommend"), proc.stdout[-3000:] + \
        proc.stderr[-3000:]
    assert _read(str(tmp_path / "recs")).height == Dataset.open(tiny_dataset).num_users
    proc = ray_head.submit("relative-evaluate", sys.executable, "jobs/evaluate.py", "--run", run_dir, *abs_paths)
    assert "relative-evaluate' succeeded" in ray_head.status("relative-evaluate"), proc.stdout[-3000:] + \
        proc.stderr[-3000:]
    assert "| sasrec |" in proc.stdout and os.path.exists(os.path.join(run_dir, "eval-test.json"))
    # a relative --run names a folder of the job's temporary copy: refused, naming it
    proc = ray_head.submit("relative-run", sys.executable, "jobs/evaluate.py", "--run", "outputs/rel/runs/rel")
    assert proc.returncode != 0 and "not a run dir" in (proc.stdout + proc.stderr)
