"""Session fixtures for the real engines at toy size: one S3 server (moto, a real HTTP endpoint on 127.0.0.1),
one local Ray runtime, one tiny synthetic dataset. Fixtures that only one test file needs live in that file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import REPO, free_port, wait_http  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Toy models run faster on one thread: intra-op threads on a 2-core box mostly wait on each other."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process on a free loopback port; credentials are dummies set for the session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_http(url, timeout=60, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's S3 server; returns (endpoint_url, 's3://<bucket>')."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(name)
    return s3_server, f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray runtime for the session (2 CPUs, no dashboard). Its workers take the environment of
    ``ray.init``, so the session's S3 credentials (``s3_server``) are set first: a Ray test that writes to S3 must
    not depend on whether an earlier test happened to start the S3 server before Ray."""
    import ray

    # Ray Serve's controller (tests/test_serve.py) gives its HTTP proxy 5 s to answer a readiness check, three times,
    # then kills it: on a 2-core machine under load (a training run beside the suite) that failed every serve test.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """A config for a tiny synthetic pipeline under a session temp dir (tracking to a local SQLite store)."""
    from genrec_dist.config import load_config

    root = tmp_path_factory.mktemp("tiny")
    return load_config(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.yaml"),
        [f"workdir={root}", "prepare.synthetic.num_items=120", "prepare.synthetic.num_users=300",
         "prepare.synthetic.num_categories=6", "prepare.num_shards=2"],
    )


@pytest.fixture(scope="session")
def tiny_dataset(tiny_cfg):
    """The tiny synthetic dataset, prepared once per session; returns its path."""
    from genrec_dist.data.prepare import run_prepare

    run_prepare(tiny_cfg)
    return tiny_cfg.dataset_dir


@pytest.fixture(scope="session")
def sids(tiny_cfg, tiny_dataset, tmp_path_factory):
    """Deterministic semantic IDs of the tiny dataset (category + rank in category; test_train_tiger.py)."""
    import polars as pl

    from genrec_dist.data.semantic_ids import write_semantic_ids
    from training.test_train_tiger import _category_codes

    items = pl.read_parquet(os.path.join(tiny_dataset, "items.parquet"))
    item_ids, codes, sizes = _category_codes(items)
    path = str(tmp_path_factory.mktemp("rec-sids") / "sids")
    write_semantic_ids(path, item_ids, codes, sizes, {"source": "test: category + rank in category"})
    return path


def _train_tiny(tiny_cfg, sids, name, args) -> str:
    from _util import SHORT, run_job

    run_job("train", "--config", os.path.join(REPO, "configs", "synthetic.yaml"), f"workdir={tiny_cfg.workdir}",
            f"paths.semantic_ids={sids}", *args, *SHORT, f"run_name={name}")
    return os.path.join(tiny_cfg.workdir, "runs", name)


@pytest.fixture(scope="session")
def car_run(tiny_cfg, sids):
    """A tiny CAR run of the real training job, trained once for the session (recommend, serving, the cluster)."""
    from _util import TINY_CAR

    return _train_tiny(tiny_cfg, sids, "rec-car", TINY_CAR)


@pytest.fixture(scope="session")
def tiger_run(tiny_cfg, sids):
    from _util import TINY_TIGER

    return _train_tiny(tiny_cfg, sids, "rec-tiger", TINY_TIGER)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (cluster/mlflow_server.sh: SQLite store, served artifacts) on a free loopback port."""
    from _util import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run on the device machine only; here they are reported as skipped, not silently dropped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class RayHead:
    """A real Ray head started by ``cluster/start_ray.sh head`` (token auth, job API on loopback), shared by the tests
    that submit jobs to it with ``ray job submit --working-dir``."""

    # What a job's --working-dir upload leaves out (big or generated folders of the repo).
    EXCLUDES = ["outputs/", ".venv/", "venv/", ".git/", "benchmarks/results/", "mlflow-server/", ".hypothesis/",
                ".pytest_cache/", "**/__pycache__/", "test-artifacts/"]

    def __init__(self):
        import tempfile
        import uuid

        self.ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths live under it
        dash = free_port()
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {**os.environ, "RAY_BIN": self.ray_bin, "GENREC_RAY_TEMP_DIR": self.temp_dir,
                    "GENREC_RAY_PORT": str(free_port()), "GENREC_RAY_DASHBOARD_PORT": str(dash),
                    "GENREC_RAY_DASHBOARD_HOST": "127.0.0.1",
                    # Token auth as a real cluster runs it: the head, the CLI and the job driver share one token.
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex,
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

    def start(self) -> None:
        subprocess.run(["bash", os.path.join(REPO, "cluster", "start_ray.sh"), "head", "--num-cpus=2",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                       env=self.env, check=True, timeout=180)

    def stop(self) -> None:
        import shutil

        subprocess.run(["bash", os.path.join(REPO, "cluster", "stop_ray.sh")], env=self.env, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(self, submission_id: str, *command: str, env_vars: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo> -- <command>``; the result of the blocking submit."""
        import json

        runtime_env = {"excludes": self.EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
        return subprocess.run([self.ray_bin, "job", "submit", "--address", self.address, "--submission-id",
                               submission_id, "--working-dir", REPO, "--runtime-env-json", json.dumps(runtime_env),
                               "--", *command], env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self, submission_id: str) -> str:
        """What ``ray job status`` prints, e.g. "Job 'x' succeeded"."""
        return subprocess.run([self.ray_bin, "job", "status", "--address", self.address, submission_id],
                              env=self.env, capture_output=True, text=True, timeout=60).stdout



@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head (``cluster/start_ray.sh``) for the session's ``ray job submit`` tests, stopped with
    ``cluster/stop_ray.sh`` at the end (a head costs ~30 s to start here)."""
    head = RayHead()
    head.start()
    try:
        yield head
    finally:
        head.stop()
