"""Stages on a real two-node Ray cluster (two network namespaces, two addresses: tests/_twonodes.py), and the loss
of the worker node in the middle of a job.

One cluster for the module (a head and a worker cost ~15 s here). Jobs go in with ``ray job submit`` from the
head's namespace; the files they read and write are on the machine's one filesystem, which both nodes see, as a
cluster's shared storage. Skipped where network namespaces cannot be made (not root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from _twonodes import Unavailable, make_cluster
from _util import REPO, run_job
from genrec_dist import storage
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.semantic_ids import read_semantic_ids

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")
PY = sys.executable
TOKENIZE = ["levels=2", "codebook_size=8", "num_workers=2"]

# One task in each bundle of a STRICT_SPREAD placement group (one bundle per node), each printing its node's
# address: both nodes answer on a whole cluster.
WHERE = """
import json, ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init()
pg = ray.util.placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)
where = ray.remote(num_cpus=1)(lambda: ray.util.get_node_ip_address())
refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        .remote() for i in range(2)]
print("NODES", json.dumps(sorted(ray.get(refs, timeout=120))))
"""


@pytest.fixture(scope="module")
def nodes():
    try:
        cluster = make_cluster()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.close()


def _nodes_line(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("NODES "))
    return json.loads(line[len("NODES "):])


def _wait_for(probe, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not seen in {timeout:g} s")


def test_tasks_run_on_both_addresses(nodes):
    assert f"export RAY_ADDRESS={nodes.address}" in nodes.head_banner  # start_ray.sh printed the head's own address
    proc = nodes.submit("where", PY, "-c", WHERE, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _nodes_line(proc.stdout) == sorted([nodes.head_ip, nodes.worker_ip])


@pytest.fixture(scope="module")
def one_node_codes(tiny_dataset, tmp_path_factory):
    """The tokenize job on one machine (its own local Ray, one k-means worker): the codes to match."""
    root = tmp_path_factory.mktemp("tokenize-one-node")
    run_job("tokenize", "--config", CONFIG, f"workdir={root}", f"paths.dataset={tiny_dataset}",
            f"paths.semantic_ids={root}/sids", "levels=2", "codebook_size=8", "num_workers=1",
            env={"HF_HUB_OFFLINE": "1"})
    return read_semantic_ids(f"{root}/sids").codes


@pytest.fixture(scope="module")
def two_node_tokenize(nodes, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenize-two-nodes")
    proc = nodes.submit("tokenize-2n", PY, "jobs/tokenize.py", "--config", "configs/synthetic.yaml",
                        f"workdir={out}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={out}/sids",
                        *TOKENIZE, env_vars={"HF_HUB_OFFLINE": "1"})
    assert "tokenize-2n' succeeded" in nodes.job_status("tokenize-2n"), proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_tokenize_on_two_nodes_gives_the_one_node_codes(two_node_tokenize, one_node_codes, nodes):
    sids = f"{two_node_tokenize}/sids"
    np.testing.assert_array_equal(read_semantic_ids(sids).codes, one_node_codes)
    stats = json.loads(open(f"{sids}/stats.json").read())
    # the k-means shards were read on both nodes (each actor reads its own rows where it runs)
    readers = stats["readers"] if "readers" in stats else stats["kmeans"]["readers"]
    assert len({r["node"] for r in readers}) == 2


# Run in the head's namespace (the test's own has no route to the cluster's addresses): argv = S3 endpoint, MLflow URI,
# then what to do.
HEAD_CLIENT = """
import json, sys
import s3fs
from genrec_dist.config import StorageConfig
s3, mlflow_uri, what = sys.argv[1:4]
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
if what == "upload":  # a local folder -> s3 path
    fs.mkdir(sys.argv[5].split("/")[2])
    fs.put(sys.argv[4], sys.argv[5], recursive=True)
else:  # the codes, the stats and the MLflow runs of a tokenize output
    from genrec_dist.data.semantic_ids import read_semantic_ids
    import mlflow
    sids = sys.argv[4]
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("genrec-dist")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    print("OUT", json.dumps({"codes": read_semantic_ids(sids, StorageConfig(endpoint_url=s3)).codes.tolist(),
                             "stats": json.loads(fs.cat(sids + "/stats.json")),
                             "runs": [(r.info.run_name, r.info.status, r.data.tags.get("genrec.job")) for r in runs]}))
"""
S3_PORT, MLFLOW_PORT = 5710, 5711


def _head_python(nodes, *args: str, env: dict, timeout: float = 300) -> str:
    proc = subprocess.run(nodes.in_ns(nodes.head_ns, PY, "-c", HEAD_CLIENT, *args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def head_services(nodes, tmp_path_factory):
    """The cluster's storage and tracking on the head node, as a user runs them: a moto S3 server and
    cluster/mlflow_server.sh in the head's namespace, bound to the head's address only (no loopback the worker could
    be fooled by). Returns (S3 endpoint, MLflow URI, the environment that reaches them)."""
    root = tmp_path_factory.mktemp("head-services")
    s3, uri = f"http://{nodes.head_ip}:{S3_PORT}", f"http://{nodes.head_ip}:{MLFLOW_PORT}"
    env = {**nodes.env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": REPO, "MLFLOW_ROOT": str(root / "mlflow"),
           "MLFLOW_HOST": nodes.head_ip, "MLFLOW_PORT": str(MLFLOW_PORT), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    procs = [subprocess.Popen(nodes.in_ns(nodes.head_ns, *cmd), cwd=REPO, env=env, start_new_session=True,
                              stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT)
             for name, cmd in (("moto", [PY, "-m", "moto.server", "-H", nodes.head_ip, "-p", str(S3_PORT)]),
                               ("mlflow", ["bash", os.path.join(REPO, "cluster", "mlflow_server.sh")]))]
    try:
        for url in (s3, uri + "/health"):
            probe = f"import urllib.request as u; u.urlopen('{url}', timeout=2)"
            _wait_for(lambda: subprocess.run(nodes.in_ns(nodes.head_ns, PY, "-c", probe), capture_output=True
                                             ).returncode == 0, 180, f"{url} in the head's namespace")
        yield s3, uri, env
    finally:
        for proc in procs:
            subprocess.run(["pkill", "-TERM", "-s", str(proc.pid)], check=False)
            proc.wait(timeout=60)


def test_tokenize_on_two_nodes_with_s3_and_mlflow_on_the_head(nodes, head_services, tiny_dataset, one_node_codes):
    """Every path on S3 and tracking on an MLflow server, both served from the head's address: the worker node's
    k-means actor reads and writes through them too, and the codes are the one-node job's."""
    s3, uri, env = head_services
    _head_python(nodes, s3, uri, "upload", str(tiny_dataset), "s3://cluster/dataset", env=env)
    creds = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    proc = nodes.submit("tokenize-s3", PY, "jobs/tokenize.py", "--config", "configs/synthetic.yaml",
                        "workdir=s3://cluster/work", "paths.dataset=s3://cluster/dataset",
                        "paths.semantic_ids=s3://cluster/sids", f"storage.endpoint_url={s3}", f"tracking.uri={uri}",
                        *TOKENIZE, env_vars={"HF_HUB_OFFLINE": "1", **creds})
    assert "tokenize-s3' succeeded" in nodes.job_status("tokenize-s3"), proc.stdout[-4000:] + proc.stderr[-4000:]
    out = _head_python(nodes, s3, uri, "read", "s3://cluster/sids", env=env)
    got = json.loads(next(ln for ln in out.splitlines() if ln.startswith("OUT "))[4:])
    np.testing.assert_array_equal(np.asarray(got["codes"]), one_node_codes)
    readers = got["stats"]["readers"] if "readers" in got["stats"] else got["stats"]["kmeans"]["readers"]
    assert len({r["node"] for r in readers}) == 2  # the worker node's actor read its shard from the head's S3
    assert [status for _, status, _ in got["runs"]] == ["FINISHED"], got["runs"]  # logged to the head's server


def test_tokenize_survives_losing_the_worker_node(nodes, two_node_tokenize, one_node_codes, tiny_dataset,
                                                  tmp_path):
    """The worker node dies as soon as its k-means actor starts: the actor is replaced on the head, replays its
    shard's changes, and the job completes with the same codes; nothing half-written is left."""
    out = tmp_path / "work"
    emb = f"{two_node_tokenize}/sids/embeddings"  # the k-means alone (the embeddings of the run above)
    try:
        proc = nodes.submit("tokenize-lost", PY, "jobs/tokenize.py", "--config", "configs/synthetic.yaml",
                            f"workdir={out}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={out}/sids",
                            f"tokenize.embeddings_path={emb}", *TOKENIZE, wait=False,
                            env_vars={"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        _wait_for(lambda: nodes.worker_processes("ray::FileShard"), 240, "a k-means actor on the worker node")
        nodes.lose_worker()
        status = nodes.wait_job("tokenize-lost", timeout=300)
        logs = nodes.job_logs("tokenize-lost")
        assert "succeeded" in status, logs[-5000:]
        assert "its worker was lost" in logs
        stats = json.loads(open(f"{out}/sids/stats.json").read())
        assert sum(stats["workers_replaced"].values()) >= 1
        np.testing.assert_array_equal(read_semantic_ids(f"{out}/sids").codes, one_node_codes)
        assert not [p for p in os.listdir(out) if ".staging-" in p]  # no half-written codes folder beside it
    finally:
        nodes.revive()


def test_recommend_survives_losing_the_worker_node(nodes, car_run, tiny_dataset, tmp_path):
    """Recommendations with one actor on each node; the worker node dies while they run. The output is complete:
    every user once, each with the model's own top-k (the local job's rows)."""
    local = tmp_path / "local"
    run_job("recommend", "--run", car_run, "k=10", f"output={local}", "num_workers=1")
    out = tmp_path / "two-nodes"
    try:
        proc = nodes.submit("recommend-lost", PY, "jobs/recommend.py", "--run", car_run, "k=10", f"output={out}",
                            "num_workers=2", "batch_size=16", wait=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _wait_for(lambda: nodes.worker_processes("ray::MapWorker"), 240,
                  "a recommend actor on the worker node")
        nodes.lose_worker()
        status = nodes.wait_job("recommend-lost", timeout=400)
        assert "succeeded" in status, nodes.job_logs("recommend-lost")[-5000:]
    finally:
        nodes.revive()

    def rows(path) -> pl.DataFrame:
        manifest = storage.require_manifest(str(path))
        names = sorted(os.listdir(path))
        assert sorted(manifest["files"] + ["manifest.json"]) == names  # no file the manifest does not list
        return pl.concat([pl.read_parquet(os.path.join(path, f)) for f in manifest["files"]]).sort("user")

    got, want = rows(out), rows(local)
    users = Dataset.open(tiny_dataset).sequences()["user"]
    assert got.height == users.len() and got["user"].n_unique() == got.height  # every user, once
    assert got["user"].to_list() == want["user"].to_list()
    assert got["items"].to_list() == want["items"].to_list()


# Loss-curve equivalence across world sizes (tests/training/test_train_runs.py EQ): one global batch order, no dropout.
EQ = ["train.model=sasrec", "model.sasrec.d_model=32", "model.sasrec.d_ff=32", "model.sasrec.n_layers=1",
      "batch_size=32", "max_steps=10", "warmup_steps=4", "eval_every=5", "checkpoint_every=0", "log_every=1",
      "data_split=global", "model.sasrec.dropout=0", "model.sasrec.all_positions=false"]


def test_ray_train_across_the_two_nodes_matches_one_process(nodes, tiny_cfg, tiny_dataset):
    """``launcher=ray`` with 4 workers (the two nodes' 4 CPUs: both nodes take part), the same loss curve as one
    process. Ray Train makes the process group itself: without gloo pinned to each node's address, the worker
    node's ranks timed out connecting to 127.0.0.1."""
    base = ["--config", CONFIG, f"workdir={tiny_cfg.workdir}", *EQ]
    run_job("train", *base, "run_name=twonode-world1")
    proc = nodes.submit("train-ray", PY, "jobs/train.py", *base, "run_name=twonode-ray4", "launcher=ray",
                        "num_workers=4", timeout=600)
    assert "train-ray' succeeded" in nodes.job_status("train-ray"), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"ip={nodes.worker_ip}" in proc.stdout + proc.stderr  # Ray Train workers ran on the worker node

    def losses(name: str) -> dict:
        with open(os.path.join(tiny_cfg.workdir, "runs", name, "history.json")) as fh:
            return {h["step"]: h["train/loss"] for h in json.load(fh) if "train/loss" in h}

    one, four = losses("twonode-world1"), losses("twonode-ray4")
    assert sorted(one) == sorted(four) == list(range(1, 11))
    assert max(abs(one[k] - four[k]) for k in one) < 1e-4


def test_a_worker_bound_to_loopback_is_not_a_second_node(nodes):
    """The check above is real: a worker that binds its services to 127.0.0.1 (in its own namespace) registers
    with the head but cannot be reached from it, and a job that needs both nodes does not complete."""
    nodes.lose_worker()
    try:
        nodes.start_worker(node_ip="127.0.0.1", wait=False)
        proc = nodes.submit("where-loopback", PY, "-c", WHERE, wait=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        try:
            status = nodes.wait_job("where-loopback", timeout=60)
        except TimeoutError:
            status = "still running"
        answered = [] if "succeeded" not in status else _nodes_line(nodes.job_logs("where-loopback"))
        assert answered != sorted([nodes.head_ip, nodes.worker_ip]), status
    finally:
        nodes.lose_worker()
        nodes.revive()
