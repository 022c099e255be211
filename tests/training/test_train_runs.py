"""The real training engine at toy size, run the way users run it (jobs/train.py as a subprocess):

- one process, 2 CPU ranks under the `deepspeed` launcher (ZeRO-2), a simulated 2-node launch (two `deepspeed
  --no_ssh --node_rank 0/1` launchers on 127.0.0.1, ZeRO-3) and Ray Train workers all give the same loss curve for
  the same global batch (dropout 0, `data_split=global` so a global batch is the same examples at every world size);
  tolerance 1e-4 absolute per logged loss (fp32 reductions in a different order; seen: <= 2e-5);
- a realistic run beats most-popular by a wide margin, logs params/metrics/artifacts/tags to MLflow (one run per
  multi-rank launch), exports a model that loads with weights_only=True and evaluates to the same numbers;
- SIGKILL in the middle, then `--resume` from an s3:// checkpoint (moto), ends at the same metrics as a run that was
  never interrupted.

Runs are module fixtures so each launch happens once (the first DeepSpeed launch also builds its CPU ops).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _util import REPO, free_port, run_group, run_job

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TINY_SASREC = ["train.model=sasrec", "model.sasrec.d_model=32", "model.sasrec.d_ff=32", "model.sasrec.n_layers=1"]
# Loss-curve equivalence: no dropout, one global batch order, 10 steps, validation at 5 and 10.
# One example per prefix: each rank's loss is then a mean over the same number of examples, so the world sizes and
# launchers must agree to float noise. (A loss over every position of a window averages over each rank's own number
# of positions, so 2 ranks weigh positions slightly differently from one process: 1.3e-3 apart on this curve.)
EQ = TINY_SASREC + ["batch_size=32", "max_steps=10", "warmup_steps=4", "eval_every=5", "checkpoint_every=0",
                    "log_every=1", "data_split=global", "model.sasrec.dropout=0", "model.sasrec.all_positions=false"]
# A realistic short run: dropout on, shards read per rank, validation + checkpoints every 25 steps.
REAL = TINY_SASREC + ["batch_size=64", "max_steps=100", "lr=0.003", "warmup_steps=10", "eval_every=25",
                      "checkpoint_every=25", "log_every=5", "model.sasrec.dropout=0.2", "patience=0"]
LOSS_TOL = 1e-4


def _base(tiny_cfg) -> list[str]:
    return ["--config", CONFIG, f"workdir={tiny_cfg.workdir}"]


def _env() -> dict:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def _deepspeed(args: list[str], log_path, timeout: float = 600, env: dict | None = None) -> None:
    with open(log_path, "w") as log:
        proc = run_group([DEEPSPEED, *args], timeout, cwd=REPO, env={**_env(), **(env or {})}, stdout=log,
                         stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise AssertionError(f"deepspeed {' '.join(args[:6])} ... failed:\n{open(log_path).read()[-6000:]}")


def _run_dir(tiny_cfg, name: str) -> str:
    return os.path.join(tiny_cfg.workdir, "runs", name)


def _history(tiny_cfg, name: str) -> list[dict]:
    with open(os.path.join(_run_dir(tiny_cfg, name), "history.json")) as fh:
        return json.load(fh)


def _metrics(tiny_cfg, name: str) -> dict:
    with open(os.path.join(_run_dir(tiny_cfg, name), "metrics.json")) as fh:
        return json.load(fh)


def _losses(tiny_cfg, name: str) -> dict[int, float]:
    return {h["step"]: h["train/loss"] for h in _history(tiny_cfg, name) if "train/loss" in h}


def _client(tiny_cfg):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{os.path.join(os.path.abspath(tiny_cfg.workdir), 'mlflow.db')}")


def _runs_named(tiny_cfg, name: str):
    client = _client(tiny_cfg)
    exp = client.get_experiment_by_name(tiny_cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


# ----- runs (each launched once per module) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world1(tiny_cfg, tiny_dataset):
    run_job("train", *_base(tiny_cfg), *EQ, "run_name=eq-world1")
    return "eq-world1"


@pytest.fixture(scope="module")
def zero2_two_ranks(tiny_cfg, tiny_dataset, tmp_path_factory):
    log = tmp_path_factory.mktemp("ds") / "zero2.log"
    _deepspeed(["--num_gpus", "2", "--master_port", str(free_port()), "jobs/train.py", *_base(tiny_cfg), *EQ,
                "zero_stage=2", "run_name=eq-zero2"], log)
    return "eq-zero2"


@pytest.fixture(scope="module")
def zero3_two_nodes(tiny_cfg, tiny_dataset, tmp_path_factory):
    """Two launchers, as two nodes run them without ssh (cluster/README.md): each in a network namespace of its own
    with its own address (tests/_twonodes.py), the master at node 0's; on 127.0.0.1 where namespaces cannot be
    made (not root)."""
    from _twonodes import TwoNodes, Unavailable

    tmp = tmp_path_factory.mktemp("twonode")
    nodes = TwoNodes(tag=f"t{os.getpid() % 10000}")
    try:
        nodes.make_namespaces()
        where = [(nodes.head_ip, ["ip", "netns", "exec", nodes.head_ns]),
                 (nodes.worker_ip, ["ip", "netns", "exec", nodes.worker_ns])]
    except Unavailable:
        nodes, where = None, [("127.0.0.1", []), ("127.0.0.1", [])]
    hostfile = tmp / "hostfile"
    hostfile.write_text("".join(f"{ip if nodes else name} slots=1\n" for (ip, _), name in zip(where, ("a", "b"))))
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        log = open(tmp / f"node{node_rank}.log", "w")
        procs.append((subprocess.Popen(
            [*where[node_rank][1], DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
             "--master_addr", where[0][0], "--master_port", port, "jobs/train.py", *_base(tiny_cfg), *EQ,
             "zero_stage=3", "run_name=eq-zero3-2node"], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True), log))
    try:
        for proc, log in procs:
            rc = proc.wait(timeout=600)
            log.close()
            if rc != 0:
                raise AssertionError(f"node launcher failed:\n{open(log.name).read()[-6000:]}")
    finally:  # a node that is still up (the other failed, or the wait was interrupted) goes with its ranks
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if nodes is not None:
            nodes.close()
    return "eq-zero3-2node"


def _lose_worker_node(tiny_cfg, tmp, name: str, args: list[str], how: str) -> tuple[int, str, float]:
    """The curve's 2-rank run over two nodes (network namespaces with their own addresses, two ``deepspeed
    --no_ssh`` launchers, ZeRO 0) whose worker node goes once the first checkpoint (step 2) is complete: ``how`` is
    the signal its whole session gets (KILL: it dies and its sockets close; STOP: it hangs and says nothing, as a node
    whose link went down). Returns (head launcher's rc, its log, seconds from the loss to its exit)."""
    from _twonodes import TwoNodes, Unavailable

    nodes = TwoNodes(tag=f"{how[0].lower()}{os.getpid() % 10000}")
    try:
        nodes.make_namespaces()
    except Unavailable as exc:
        pytest.skip(str(exc))
    hostfile = tmp / "hostfile"
    hostfile.write_text(f"{nodes.head_ip} slots=1\n{nodes.worker_ip} slots=1\n")
    port, logs, procs = str(free_port()), [tmp / "node0.log", tmp / "node1.log"], []
    first = os.path.join(_run_dir(tiny_cfg, name), "checkpoints", "step-00000002", "COMPLETE")
    try:
        for node_rank, ns in enumerate((nodes.head_ns, nodes.worker_ns)):
            procs.append(subprocess.Popen(
                nodes.in_ns(ns, DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                            "--master_addr", nodes.head_ip, "--master_port", port, "jobs/train.py", *args,
                            f"run_name={name}"),
                cwd=REPO, env=_env(), stdout=open(logs[node_rank], "w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        deadline = time.time() + 400
        while not os.path.exists(first):
            assert time.time() < deadline and procs[0].poll() is None, open(logs[0]).read()[-4000:]
            time.sleep(0.05)
        subprocess.run(["pkill", f"-{how}", "-s", str(procs[1].pid)], check=False)  # the worker node's session
        lost_at = time.time()
        rc = procs[0].wait(timeout=300)
        waited = time.time() - lost_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
            proc.wait()
        nodes.close()
    return rc, open(logs[0]).read(), waited


@pytest.fixture(scope="module")
def node_lost(tiny_cfg, tiny_dataset, tmp_path_factory):
    """:func:`_lose_worker_node` (killed), then ``--resume`` on the node that is left, as one process. Returns (run
    name, head launcher's rc, its log, seconds from the loss to its exit, the checkpoint step it resumed from)."""
    name, args = "eq-node-lost", [*_base(tiny_cfg), *EQ, "checkpoint_every=2", "keep_checkpoints=10"]
    rc, log, waited = _lose_worker_node(tiny_cfg, tmp_path_factory.mktemp("nodeloss"), name, args, "KILL")
    ckpts = os.path.join(_run_dir(tiny_cfg, name), "checkpoints")
    resumed_from = max(int(d.split("-")[1]) for d in os.listdir(ckpts) if os.path.exists(f"{ckpts}/{d}/COMPLETE"))
    run_job("train", *args, "--resume", name)  # the node that is left, one process
    return name, rc, log, waited, resumed_from


@pytest.fixture(scope="module")
def real_run(tiny_cfg, tiny_dataset):
    proc = run_job("train", *_base(tiny_cfg), *REAL, "run_name=real-full")
    return "real-full", proc.stdout


# ----- loss curves across world sizes and launchers ----------------------------------------------------------

def _assert_same_curve(tiny_cfg, ref: str, other: str) -> None:
    a, b = _losses(tiny_cfg, ref), _losses(tiny_cfg, other)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert max(a.values()) - min(a.values()) > 0.01  # the curve moves, so agreement is not trivial
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= LOSS_TOL, f"{other} loss curve differs from {ref} by {worst}"


def test_zero2_two_ranks_matches_one_process(tiny_cfg, world1, zero2_two_ranks):
    _assert_same_curve(tiny_cfg, world1, zero2_two_ranks)


def test_zero3_two_nodes_matches_one_process(tiny_cfg, world1, zero3_two_nodes):
    _assert_same_curve(tiny_cfg, world1, zero3_two_nodes)
    # validation all-reduces every rank's users: the same numbers as one process scoring everyone
    v1 = [h["valid/ndcg@10"] for h in _history(tiny_cfg, world1) if "valid/ndcg@10" in h]
    v3 = [h["valid/ndcg@10"] for h in _history(tiny_cfg, zero3_two_nodes) if "valid/ndcg@10" in h]
    assert len(v1) == len(v3) == 2 and max(abs(x - y) for x, y in zip(v1, v3)) < 1e-3


def test_losing_a_node_names_the_rank_and_resume_on_the_rest_gives_the_same_run(tiny_cfg, world1, node_lost):

    name, rc, log, waited, resumed_from = node_lost
    assert rc != 0 and waited < 120, (rc, waited)  # at once: the worker's sockets close with it
    said = [line for line in log.splitlines() if "training lost rank 1 (" in line]
    assert said, log[-4000:]
    assert ".77.2, pid " in said[0] and f"--resume {name}" in said[0] and "complete checkpoint is step" in said[0]
    assert 2 <= resumed_from < 10
    # after the resume point the one process continues the 2-rank run's curve: the same as never interrupted
    a, b = _losses(tiny_cfg, world1), _losses(tiny_cfg, name)
    assert sorted(b) == list(range(1, 11))  # the resumed history keeps the steps before the checkpoint
    worst = max(abs(a[s] - b[s]) for s in a if s > resumed_from)
    assert worst <= LOSS_TOL, worst
    m1, m2 = _metrics(tiny_cfg, world1), _metrics(tiny_cfg, name)
    assert m2["best_step"] == m1["best_step"]
    assert m2["model"]["ndcg@10"] == pytest.approx(m1["model"]["ndcg@10"], abs=1e-3)


def test_a_node_that_hangs_is_named_after_the_collective_timeout(tiny_cfg, tiny_dataset, tmp_path):
    """A worker node that stops answering without closing anything (SIGSTOP: what a link going down looks like to
    the head) is named once ``train.collective_timeout_s`` has passed, not after torch's 30 minutes."""
    args = [*_base(tiny_cfg), *EQ, "checkpoint_every=2", "collective_timeout_s=8"]
    rc, log, waited = _lose_worker_node(tiny_cfg, tmp_path, "eq-node-hangs", args, "STOP")
    said = [line for line in log.splitlines() if "training lost rank 1 (" in line]
    assert rc != 0 and said, log[-4000:]
    assert 4 < waited < 90, waited  # the timeout, not an error the peer sent
    assert ".77.2, pid " in said[0] and "--resume eq-node-hangs" in said[0]


def test_multi_rank_launch_makes_one_mlflow_run(tiny_cfg, world1, zero2_two_ranks, zero3_two_nodes):
    (one,) = _runs_named(tiny_cfg, world1)
    for name in (zero2_two_ranks, zero3_two_nodes):
        found = _runs_named(tiny_cfg, name)
        assert len(found) == 1, f"{name}: {len(found)} MLflow runs (only rank 0 may log)"
        assert found[0].data.params["world_size"] == "2"
        # the whole model's size, also when ZeRO-3 keeps a slice of each parameter per rank
        assert found[0].data.params["num_parameters"] == one.data.params["num_parameters"] != "0"


def test_ray_train_launcher(tiny_cfg, world1):
    """`launcher=ray`: TorchTrainer workers run the same per-worker function (a fresh local Ray in the job)."""
    run_job("train", *_base(tiny_cfg), *EQ, "run_name=eq-ray", "launcher=ray", "ray_address=local",
            "num_workers=2", env={"RAY_USAGE_STATS_ENABLED": "0"})
    _assert_same_curve(tiny_cfg, world1, "eq-ray")
    assert len(_runs_named(tiny_cfg, "eq-ray")) == 1


# ----- a realistic run -------------------------------------------------------------------------------------

def test_beats_most_popular(tiny_cfg, real_run):
    m = _metrics(tiny_cfg, real_run[0])
    model, pop = m["model"], m["most_popular"]
    assert model["ndcg@10"] >= 1.2 * pop["ndcg@10"], (model, pop)
    assert model["recall@10"] >= pop["recall@10"] + 0.05, (model, pop)
    assert "| sasrec |" in real_run[1] and "| most-popular |" in real_run[1]  # the table is printed


def test_mlflow_run_has_params_metrics_artifacts_tags(tiny_cfg, tiny_dataset, real_run):
    (run,) = _runs_named(tiny_cfg, real_run[0])
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["train.lr"] == "0.003" and p["model.sasrec.d_model"] == "32" and p["world_size"] == "1"
    assert json.loads(p["deepspeed_config"])["zero_optimization"]["stage"] == 0
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "valid/ndcg_at_10",
                "valid/recall_at_10", "test/ndcg_at_10", "test_most_popular/ndcg_at_10"):
        assert key in m, key
    client = _client(tiny_cfg)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 21  # step 1 and every 5th step
    with open(os.path.join(tiny_dataset, "manifest.json"), "rb") as fh:
        assert t["genrec.dataset_manifest_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert len(t["mlflow.source.git.commit"]) >= 7
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.json", "model"} <= names
    assert {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "model")} >= {"model.pt",
                                                                                                 "model.json"}
    assert {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "reports")} == {
        "curves.png", "metrics.md", "examples.md"}
    examples = open(client.download_artifacts(run.info.run_id, "reports/examples.md")).read()
    assert examples.count("## user ") == 5 and examples.count("recommended:") == 5
    assert "| sasrec |" in open(client.download_artifacts(run.info.run_id, "reports/metrics.md")).read()


def test_export_loads_weights_only_and_evaluates_the_same(tiny_cfg, real_run):
    import torch

    run_dir = _run_dir(tiny_cfg, real_run[0])
    state = torch.load(os.path.join(run_dir, "model", "model.pt"), weights_only=True)
    assert "item_emb.weight" in state and state["item_emb.weight"].shape[1] == 32
    with open(os.path.join(run_dir, "run.json")) as fh:
        mlflow_id = json.load(fh)["mlflow_run_id"]
    # overrides on both sides of --run (argparse's intermixed parsing)
    proc = run_job("evaluate", "--config", CONFIG, f"workdir={tiny_cfg.workdir}", "--run", mlflow_id,
                   "evaluate.batch_size=77")
    assert "| sasrec |" in proc.stdout
    with open(os.path.join(run_dir, "eval-test.json")) as fh:
        again = json.load(fh)
    assert again["config"]["evaluate"]["batch_size"] == 77  # the override reached the evaluation's config
    trained = _metrics(tiny_cfg, real_run[0])
    for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert again["model"][k] == pytest.approx(trained["model"][k], abs=1e-9)


def test_sigkill_then_resume_ends_at_the_same_metrics(tiny_cfg, real_run, s3_bucket):
    """Kill -9 after the step-50 checkpoint reached S3, add a half-written newer checkpoint, resume."""
    import s3fs

    endpoint, bucket = s3_bucket
    args = [*_base(tiny_cfg), *REAL, "run_name=real-killed", f"train.checkpoint_dir={bucket}/ckpt",
            f"storage.endpoint_url={endpoint}"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "train.py"), *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    killed = False
    for line in proc.stdout:
        if line.startswith("checkpoint saved: step 50"):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    root = f"{bucket[len('s3://'):]}/ckpt/real-killed"
    assert fs.exists(f"{root}/step-00000050/COMPLETE")
    fs.pipe(f"{root}/step-00000075/trainer.json", b"{}")  # died while writing: no COMPLETE marker
    # the resume is checked against the config the run saved when it started (same settings here: it goes on)
    assert os.path.exists(os.path.join(_run_dir(tiny_cfg, "real-killed"), "config.yaml"))
    out = run_job("train", *args, "--resume", "real-killed").stdout
    assert f"resumed from {bucket}/ckpt/real-killed/step-00000050" in out
    assert "step 55/100" in out and "step 45/100" not in out
    resumed, full = _metrics(tiny_cfg, "real-killed"), _metrics(tiny_cfg, real_run[0])
    assert resumed["best_step"] == full["best_step"]
    for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert resumed["model"][k] == pytest.approx(full["model"][k], abs=1e-9), k
    # the resumed run continued the same MLflow run
    assert len(_runs_named(tiny_cfg, "real-killed")) == 1
    # its history (history.json, the curves) covers the whole run: the rows before the kill came back with the
    # checkpoint, the same as the uninterrupted run's
    killed, whole = _losses(tiny_cfg, "real-killed"), _losses(tiny_cfg, real_run[0])
    assert sorted(killed) == sorted(whole) and min(killed) == 1
    assert all(killed[s] == pytest.approx(whole[s], abs=1e-6) for s in killed if s <= 50)
