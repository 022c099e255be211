"""The DeepSpeed config dict, the launcher environment, checkpoint and run bookkeeping as plain values (no process
group), and the jobs' errors for a bad run."""

from __future__ import annotations

import json
import os
import re

import pytest

from _util import REPO
from genrec_dist.config import load_config
from genrec_dist.runs import checkpoint as ckpt
from genrec_dist.runs import rundir as runs
from genrec_dist.training.dist import world_from_env
from genrec_dist.training.ds_config import BatchSizeError, client_optimizer, deepspeed_config, micro_batch


def _train(*overrides):
    return load_config(None, list(overrides), default_section="train").train


@pytest.mark.parametrize("world,ga,expected", [(1, 1, 256), (2, 1, 128), (4, 2, 32), (8, 4, 8)])
def test_micro_batch_keeps_global_batch(world, ga, expected):
    tc = _train(f"grad_accum={ga}")
    assert micro_batch(tc, world) == expected
    d = deepspeed_config(tc, world, use_cuda=False, total_steps=10)
    assert d["train_batch_size"] == d["train_micro_batch_size_per_gpu"] * ga * world == 256


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(BatchSizeError, match="batch_size=100"):
        micro_batch(_train("batch_size=100"), 3)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_precision(stage):
    d = deepspeed_config(_train(f"zero_stage={stage}"), 2, use_cuda=False, total_steps=10)
    assert d["zero_optimization"]["stage"] == stage
    assert d["bf16"]["enabled"] is False  # fp32 on CPU
    assert deepspeed_config(_train(), 1, use_cuda=True, total_steps=10)["bf16"]["enabled"] is True
    json.dumps(d)  # DeepSpeed reads it as JSON


def test_bad_zero_stage():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(_train("zero_stage=4"), 1, use_cuda=False, total_steps=10)


def test_paper_defaults_and_schedules():
    d = deepspeed_config(_train(), 1, use_cuda=True, total_steps=5000)
    assert d["optimizer"]["type"] == "Adam" and d["optimizer"]["params"]["adam_w_mode"] is False
    assert d["optimizer"]["params"]["lr"] == 1e-3
    assert d["zero_force_ds_cpu_optimizer"] is False
    sched = d["scheduler"]
    assert sched["type"] == "WarmupLR"
    assert sched["params"]["warmup_min_lr"] == 1e-7 and sched["params"]["warmup_num_steps"] == 2000
    assert sched["params"]["warmup_type"] == "linear"
    d = deepspeed_config(_train("lr_schedule=warmup_decay", "optimizer=adamw", "grad_clip=0.5"), 1, True, 5000)
    assert d["scheduler"]["type"] == "WarmupDecayLR" and d["scheduler"]["params"]["total_num_steps"] == 5000
    assert d["optimizer"]["type"] == "AdamW" and d["gradient_clipping"] == 0.5


def test_cpu_uses_torch_adam_with_the_same_settings():
    import torch

    tc = _train("optimizer=adamw", "weight_decay=0.01")
    assert "optimizer" not in deepspeed_config(tc, 1, use_cuda=False, total_steps=10)
    opt = client_optimizer(tc, [torch.nn.Parameter(torch.zeros(2))], use_cuda=False)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01
    assert opt.defaults["fused"] is True  # no parameter-sized temporaries per step (docs/scale.md)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, -2.0, 0.0])
    client_optimizer(_train("lr=0.1", "weight_decay=0"), [w], False).step()  # first step: lr x sign(grad)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 1.1, 1.0]))
    assert isinstance(client_optimizer(_train(), [torch.nn.Parameter(torch.zeros(2))], False), torch.optim.Adam)
    assert client_optimizer(tc, [], use_cuda=True) is None


def test_world_from_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    w = world_from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.master_addr, w.is_main) == (3, 8, 1, "10.0.0.1", False)
    lone: dict = {}
    w = world_from_env(lone)  # plain `python jobs/train.py`: rank 0 of 1, variables filled in for init
    assert (w.rank, w.world_size, w.is_main) == (0, 1, True)
    assert lone["MASTER_ADDR"] == "127.0.0.1" and int(lone["MASTER_PORT"]) > 0
    with pytest.raises(ValueError, match="not numeric"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_only_complete_checkpoints_count(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / ckpt.tag_of(step)).mkdir()
    (tmp_path / ckpt.tag_of(10) / ckpt.MARKER).write_text("{}")
    (tmp_path / ckpt.tag_of(20) / ckpt.MARKER).write_text("{}")
    # step 30 was being written when the run died: no marker, never "latest"
    assert ckpt.complete_steps(str(tmp_path)) == [10, 20]
    assert ckpt.latest_complete(str(tmp_path)) == 20
    assert ckpt.latest_complete(str(tmp_path / "missing")) is None


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_jobs_help_and_bad_run(tmp_path):
    from _util import run_job

    assert "--resume" in run_job("train", "--help").stdout
    assert "--run" in run_job("evaluate", "--help").stdout
    proc = run_job("evaluate", f"workdir={tmp_path}", "--run", "no-such-run", check=False)
    assert proc.returncode == 1 and "no-such-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "mlflow.db")  # looking a name up does not create a tracking store
    proc = run_job("train", f"workdir={tmp_path}", "--resume", check=False)
    assert proc.returncode == 1 and "no tiger run under" in proc.stderr and "Traceback" not in proc.stderr
    # a new run may not take the name of an existing one (its export, metrics and history would mix)
    taken = tmp_path / "runs" / "taken" / "run.json"
    taken.parent.mkdir(parents=True)
    taken.write_text('{"run_name": "taken", "model": "tiger"}')
    proc = run_job("train", f"workdir={tmp_path}", "run_name=taken", check=False)
    assert proc.returncode == 1 and "--resume taken" in proc.stderr and "Traceback" not in proc.stderr
    assert taken.read_text() == '{"run_name": "taken", "model": "tiger"}'
    # --resume with other settings than the run started with: refused, naming each field, before anything is written
    runs.write_run_config(load_config(None, [f"workdir={tmp_path}", "run_name=taken"], default_section="train"),
                          "taken")
    before = sorted(os.listdir(taken.parent))
    proc = run_job("train", f"workdir={tmp_path}", "--resume", "taken", "lr=0.0123", "seed=7",
                   "storage.max_attempts=5", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.lr:" in proc.stderr and "0.0123 now" in proc.stderr and "seed: 42 in the run, 7 now" in proc.stderr
    assert "max_attempts" not in proc.stderr  # how storage is reached does not define the run
    assert sorted(os.listdir(taken.parent)) == before
    # a saved config.yaml broken by a hand edit: a config error naming the file and line, not a YAML traceback
    saved = taken.parent / "config.yaml"
    saved.write_text(saved.read_text().replace("train:", "train: [", 1))
    broken = saved.read_text()
    edited = broken.splitlines().index("train: [") + 1
    for job, args in (("train", ("--resume", "taken")), ("evaluate", ("--run", "taken"))):
        proc = run_job(job, f"workdir={tmp_path}", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        where = re.search(rf"config error: {re.escape(str(saved))}, line (\d+), column \d+: not valid YAML", proc.stderr)
        assert where and edited <= int(where.group(1)) <= edited + 3, proc.stderr  # where the parser gave up
        assert sorted(os.listdir(taken.parent)) == before and saved.read_text() == broken


def test_run_config_differences_name_what_defines_a_run(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "run_name=a"], default_section="train")
    runs.write_run_config(cfg, "a")
    saved = runs.read_run_config(os.path.join(tmp_path, "runs", "a"))
    assert runs.config_differences(saved, cfg) == []
    assert saved["paths"]["semantic_ids"] == f"{tmp_path}/sids/rkmeans"  # saved resolved: a config train.py reads
    # the run's name, how storage and MLflow are reached, the tokenize job's own fields and where workdir lies (the
    # dataset and codes named explicitly at their old places) do not define the run
    moved = tmp_path / "moved"
    other = load_config(None, [f"workdir={moved}", f"paths.dataset={tmp_path}/dataset", "run_name=b", "resume=a",
                               f"paths.semantic_ids={tmp_path}/sids/rkmeans", "tracking.uri=http://x:5000",
                               "storage.region=eu-west-1", "tokenize.levels=3", "model.car.levels=2"],
                        default_section="train")
    assert runs.config_differences(saved, other) == ["model.car.levels: 0 in the run, 2 now"]
    # the codes the run reads do, also when only tokenize.method derives their place
    codes = load_config(None, [f"workdir={tmp_path}", "tokenize.method=unger"], default_section="train")
    assert runs.config_differences(saved, codes) == [
        f"paths.semantic_ids: '{tmp_path}/sids/rkmeans' in the run, '{tmp_path}/sids/unger' now"]
    # a config saved by an older or newer version compares on the fields both have
    saved["train"]["no_longer_a_field"] = 1
    del saved["train"]["patience"]
    assert runs.config_differences(saved, other) == ["model.car.levels: 0 in the run, 2 now"]
    assert runs.read_run_config(os.path.join(tmp_path, "runs", "never-saved")) is None


def test_resume_refuses_a_dataset_or_codes_changed_under_the_run(tmp_path, tiny_dataset):
    """Prepared or tokenized again at the same paths (overwrite=true), the config is the same but the data is not:
    a resumed run would continue checkpoints trained on the old data."""
    import shutil

    import numpy as np
    import polars as pl

    from genrec_dist.data.semantic_ids import write_semantic_ids

    dataset, sids = str(tmp_path / "dataset"), str(tmp_path / "sids")
    shutil.copytree(tiny_dataset, dataset)
    items = pl.read_parquet(os.path.join(dataset, "items.parquet"))
    item_ids = items["item_id"].to_numpy()
    codes = np.stack([item_ids % 7, item_ids % 5], axis=1)
    write_semantic_ids(sids, item_ids, codes, [7, 5], {"source": "test"})
    cfg = load_config(None, [f"workdir={tmp_path}", "run_name=a", f"paths.dataset={dataset}",
                             f"paths.semantic_ids={sids}"], default_section="train")
    runs.write_run_config(cfg, "a")
    inputs = runs.input_fingerprints(cfg, uses_codes=True)
    with open(os.path.join(tmp_path, "runs", "a", "run.json"), "w") as fh:
        json.dump({"run_name": "a", "model": "tiger", "inputs": inputs}, fh)
    run = runs.RunDir.resolve(_resuming(cfg, "a"))  # the same inputs: resumable
    assert runs.input_fingerprints(cfg, uses_codes=False) == {"dataset_manifest_sha256": inputs[
        "dataset_manifest_sha256"]}
    # the same codes written again (another file, same content) are the same codes
    write_semantic_ids(sids, item_ids[::-1], codes[::-1], [7, 5], {"source": "test"}, overwrite=True)
    run.check_resume(cfg)
    # tokenized again with other codes: refused, naming the codes' place
    write_semantic_ids(sids, item_ids, codes[:, ::-1] % 5, [5, 5], {"source": "test"}, overwrite=True)
    with pytest.raises(runs.RunConfigError, match=f"the semantic IDs at {re.escape(sids)} .* changed since the run"):
        run.check_resume(cfg)
    # prepared again (another manifest): refused, naming the dataset
    write_semantic_ids(sids, item_ids, codes, [7, 5], {"source": "test"}, overwrite=True)
    manifest = os.path.join(dataset, "manifest.json")
    with open(manifest) as fh:
        m = json.load(fh)
    with open(manifest, "w") as fh:
        json.dump({**m, "prepared_again": True}, fh)
    with pytest.raises(runs.RunConfigError, match=f"the dataset at {re.escape(dataset)} .* changed") as err:
        runs.RunDir.resolve(_resuming(cfg, "a"))
    assert "semantic IDs" not in str(err.value)


def _resuming(cfg, name):
    """``cfg`` as ``--resume name`` makes it."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.resume = name
    return cfg


def test_run_dir_reads_its_state_once_and_checks_resume_from_it(tmp_path, tiny_dataset):
    """RunDir.resolve reads the run's files once; the resume checks then answer from its fields (here with the
    files gone), and start() writes config.yaml (a new run) and run.json whole."""
    base = [f"workdir={tmp_path}", f"paths.dataset={tiny_dataset}", "model=sasrec"]
    cfg = load_config(None, [*base, "run_name=a"], default_section="train")
    new = runs.RunDir.resolve(cfg)
    assert (new.name, new.resuming, new.meta, new.saved_config, new.latest_step) == ("a", False, {}, None, None)
    assert new.path == os.path.join(tmp_path, "runs", "a") and new.checkpoints == os.path.join(new.path, "checkpoints")
    assert new.staging == new.checkpoints  # a local checkpoint root is written in place
    inputs = new.start(cfg, "mlflow-id")
    assert sorted(os.listdir(new.path)) == ["config.yaml", "run.json"]  # no temporary file left beside them
    assert inputs == runs.input_fingerprints(cfg, uses_codes=False)
    with pytest.raises(runs.RunExistsError, match="--resume a"):
        runs.RunDir.resolve(cfg)
    for step in (3, 7, 9):  # 9 is incomplete (no marker): not resumed from
        os.makedirs(os.path.join(new.checkpoints, ckpt.tag_of(step)))
        if step < 9:
            open(os.path.join(new.checkpoints, ckpt.tag_of(step), ckpt.MARKER), "w").close()

    latest = load_config(None, [*base, "resume=latest"], default_section="train")
    run = runs.RunDir.resolve(latest)
    assert (run.name, run.resuming, run.latest_step) == ("a", True, 7)
    assert run.meta["mlflow_run_id"] == "mlflow-id" and run.meta["inputs"] == inputs
    assert run.saved_config["train"]["model"] == "sasrec"
    import shutil

    shutil.rmtree(new.path)  # what the run dir held is in the object now
    run.check_resume(latest)
    other = load_config(None, [*base, "resume=a", "lr=0.0123"], default_section="train")
    with pytest.raises(runs.RunConfigError, match=rf"--resume a: run {re.escape(run.path)} started with other "
                                                  r"settings \(train.lr: 0.001 in the run, 0.0123 now\)"):
        run.check_resume(other)
    run.start(latest, "mlflow-id")  # a resumed run keeps its creation time and inputs, writes no config.yaml
    assert sorted(os.listdir(run.path)) == ["run.json"]
    assert runs.read_run(run.path) == {**run.meta, "mlflow_run_id": "mlflow-id"}


def test_table_read_back_checks_the_finished_runs_config(tmp_path, capsys, monkeypatch):
    """benchmarks/_jobs.train_once reads a finished run only when the row's command would train it as it was."""
    monkeypatch.syspath_prepend(REPO)
    from benchmarks._jobs import train_once

    never = ["/nonexistent/python"]  # a read-back must not launch anything: launching this would fail
    cmd = [*never, "jobs/train.py", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", "lr=0.002"]
    cfg = load_config(os.path.join(REPO, "configs", "synthetic.yaml"),
                      [f"workdir={tmp_path}", "lr=0.002", "run_name=row"], default_section="train")
    runs.write_run_config(cfg, "row")
    (tmp_path / "runs" / "row" / "metrics.json").write_text('{"model": {"recall@10": 0.5}}')
    assert train_once(cmd, str(tmp_path / "runs"), "row")["model"]["recall@10"] == 0.5
    with pytest.raises(SystemExit, match=r"train\.lr: 0\.002 in the run, 0\.003 now"):
        train_once([*cmd, "lr=0.003"], str(tmp_path / "runs"), "row")
    os.remove(tmp_path / "runs" / "row" / runs.CONFIG_FILE)  # a run from before runs saved their config
    assert train_once([*cmd, "lr=0.003"], str(tmp_path / "runs"), "row")["model"]["recall@10"] == 0.5
    assert "read back unchecked" in capsys.readouterr().out


def test_car_table_of_some_rows_writes_its_own_json(tmp_path):
    """benchmarks/car_ablation.py reads back a finished row and writes the table to --out, not over the whole table's
    default JSON (a subset of rows used to replace car_ablation_<dataset>.json)."""
    import subprocess
    import sys

    cfg = load_config(os.path.join(REPO, "configs", "synthetic.yaml"),
                      [f"workdir={tmp_path}", "model.car.levels=2", "run_name=sub-depth2"], default_section="train")
    runs.write_run_config(cfg, "sub-depth2")
    metrics = {k: 0.25 for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")}
    (tmp_path / "runs" / "sub-depth2" / "metrics.json").write_text(json.dumps(
        {"model": {**{f"fast/{k}": v for k, v in metrics.items()}, **{f"slow/{k}": v for k, v in metrics.items()}},
         "most_popular": metrics, "best_step": 7}))
    out = tmp_path / "depth2.json"
    default = os.path.join(REPO, "benchmarks", "results", f"car_ablation_{cfg.name}.json")
    existed = os.path.exists(default)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.car_ablation", "--config", "configs/synthetic.yaml",
                           "--rows", "depth2", "--prefix", "sub", "--out", str(out), f"workdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| CAR depth 2 fast | 7 | 0.2500" in proc.stdout
    table = json.loads(out.read_text())
    assert table["rows"] == ["depth2"] and table["results"]["depth2"]["best_step"] == 7
    assert os.path.exists(default) == existed
    # no temporary file left beside it (the table's MLflow parent run lives in the workdir's store)
    assert sorted(set(os.listdir(tmp_path)) - {"mlflow.db", "mlartifacts"}) == ["depth2.json", "runs"]


def test_new_run_names_differ_within_a_second():
    from genrec_dist.runs.rundir import new_run_name

    names = {new_run_name("car") for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("car-") for n in names)


def test_gloo_is_pinned_to_the_interface_that_reaches_the_master():
    """Multi-node gloo binds the interface this machine reaches MASTER_ADDR through (two namespaces: rank 1 timed
    out connecting to rank 0 at 127.0.0.1 without it); a user's own GLOO_SOCKET_IFNAME and one-machine runs are
    left alone."""
    from genrec_dist.training.dist import pin_gloo_interface, route_interface

    assert route_interface("127.0.0.1") is None
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}
    assert pin_gloo_interface(env) is None and "GLOO_SOCKET_IFNAME" not in env
    env = {"MASTER_ADDR": "10.0.0.1", "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "ib0"}
    assert pin_gloo_interface(env) is None and env["GLOO_SOCKET_IFNAME"] == "ib0"
    env = {"MASTER_ADDR": "10.0.0.1", "WORLD_SIZE": "1"}
    assert pin_gloo_interface(env) is None and "GLOO_SOCKET_IFNAME" not in env
