"""Session fixtures for the real engines at toy size: one S3 server (moto, a real HTTP endpoint on 127.0.0.1),
one local Ray runtime, one tiny synthetic dataset. Fixtures that only one test file needs live in that file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import free_port, wait_http  # noqa: E402

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
def ray_local():
    """One local Ray runtime for the session (2 CPUs, no dashboard)."""
    import ray

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
