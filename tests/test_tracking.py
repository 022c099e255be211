"""Tracking against a real MLflow server: README's demo (scripts/demo.sh: prepare -> tokenize -> train -> evaluate)
runs at toy size against it, and the four runs, their metrics and report files are checked through the REST API and
through the MLflow UI rendered by headless Chromium (screenshots kept under $GENREC_TEST_ARTIFACTS)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import shutil
import subprocess
import sys

import numpy as np
import pytest

from genrec_dist.config import load_config
from genrec_dist.data.dataset import MANIFEST_TAG
from genrec_dist.tracking import NullTracker, make_tracker, ui_url

from _util import REPO, run_job

SECRET = "s3cr3t-value-never-logged"
# tiny_cfg's dataset; a 2-level codebook of 8; a 1+1-layer TIGER trained 20 steps (validation at 10 and 20).
TOY = ["prepare.synthetic.num_items=120", "prepare.synthetic.num_users=300", "prepare.synthetic.num_categories=6",
       "prepare.num_shards=2", "tokenize.levels=2", "tokenize.codebook_size=8", "tokenize.num_workers=1",
       "model.tiger.d_model=32", "model.tiger.d_ff=64", "model.tiger.n_heads=2", "model.tiger.encoder_layers=1",
       "model.tiger.decoder_layers=1", "model.tiger.beam_width=5", "evaluate.beam_width=5", "train.batch_size=64",
       "train.max_steps=20", "train.warmup_steps=5", "train.eval_every=10", "train.log_every=5",
       "train.checkpoint_every=0"]
JOBS = ("prepare", "tokenize", "train", "evaluate")


def test_null_tracker_off_rank_zero_and_when_disabled(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    assert isinstance(make_tracker(cfg, "train", rank=1), NullTracker)
    cfg.tracking.enabled = False
    assert isinstance(make_tracker(cfg, "train", rank=0), NullTracker)


@pytest.fixture(scope="module")
def demo(mlflow_server, tiny_dataset, tmp_path_factory):
    """scripts/demo.sh run once against the server; returns (client, experiment id, {job: run}, demo stdout)."""
    import mlflow
    from tokenization.embedding_store import embedding_shards

    from genrec_dist.data.dataset import Dataset

    root = tmp_path_factory.mktemp("demo")
    # tokenize is the real job (Ray k-means, semantic-ID commit, MLflow run) but reuses stand-in embeddings of the
    # same catalog (demo's prepare makes tiny_dataset again: same config and seed) instead of loading a sentence
    # encoder and embedding 120 texts (~25 s here; tests/tokenization/test_tokenize_job.py covers that part).
    n = Dataset.open(tiny_dataset).num_items
    emb = np.random.default_rng(0).normal(size=(n, 32)).astype(np.float32)
    for name, data in embedding_shards(np.arange(1, n + 1), emb).items():
        os.makedirs(os.path.dirname(root / "emb" / name), exist_ok=True)
        (root / "emb" / name).write_bytes(data)
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "demo.sh"), f"workdir={root / 'work'}",
         f"tracking.uri={mlflow_server}", "tracking.experiment=demo-ui", *TOY,
         f"tokenize.embeddings_path={root / 'emb' / 'embeddings'}"],
        env={**os.environ, "PYTHON": sys.executable, "AWS_SECRET_ACCESS_KEY": SECRET},
        capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/demo.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("demo-ui")
    found = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["genrec.job"] for r in found) == sorted(JOBS)  # one run per stage, no more
    return client, exp, {r.data.tags["genrec.job"]: r for r in found}, proc.stdout


def test_demo_pipeline_reaches_the_server(demo, tmp_path):
    client, exp, runs, stdout = demo
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    pipelines = {r.data.tags["genrec.pipeline"] for r in runs.values()}
    assert len(pipelines) == 1 and pipelines != {""}  # the tag that links the four runs
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    train = runs["train"]
    assert train.data.params["train.max_steps"] == "20" and train.data.params["train.model"] == "tiger"
    assert 0 <= train.data.metrics["valid/ndcg_at_10"] <= 1
    assert runs["tokenize"].data.metrics["embedding.dim"] == 32  # the reused embeddings, not a fresh encoder
    assert {"reports/curves.png", "reports/metrics.md"} <= {a.path for a in client.list_artifacts(
        train.info.run_id, "reports")}
    assert "| most-popular |" in stdout  # the demo ends with the evaluation table
    # every stage's run names the one dataset the same way (path and manifest sha256), so they can be matched by tag
    (path,) = {r.data.tags["genrec.dataset_path"] for r in runs.values()}
    with open(os.path.join(path, "manifest.json"), "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    assert {r.data.tags.get(MANIFEST_TAG) for r in runs.values()} == {sha}
    # ... and logs it as an MLflow dataset input (the UI's Dataset column): same name, source and digest everywhere
    contexts = {}
    for job, run in runs.items():
        (ds,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "synthetic"]
        assert (ds.dataset.digest, json.loads(ds.dataset.source)["uri"]) == (sha[:32], path), job
        contexts[job] = {t.key: t.value for t in ds.tags}["mlflow.data.context"]
    assert contexts == {"prepare": "output", "tokenize": "tokenization", "train": "training",
                        "evaluate": "evaluation"}
    # training also read the codes tokenize wrote: a second input, digest = the codes' sha256 in run.json
    (codes,) = [i.dataset for i in train.inputs.dataset_inputs if i.dataset.name != "synthetic"]
    run_json = json.load(open(client.download_artifacts(train.info.run_id, "run.json", str(tmp_path))))
    assert codes.name == "synthetic-sids-rkmeans" and codes.digest == run_json["inputs"]["semantic_ids_sha256"][:32]
    # system metrics on the training run only (tracking.system_metrics defaults to [train])
    assert "system/cpu_utilization_percentage" in train.data.metrics
    assert not any(k.startswith("system/") for k in runs["evaluate"].data.metrics)
    # the trained model is logged and registered under the dataset's and model's name
    (version,) = client.search_model_versions("name='genrec-synthetic-tiger'")
    assert version.run_id == train.info.run_id
    # secrets in the environment never reach params, tags or the logged config of any stage
    for run in runs.values():
        blob = repr(run.data.params) + repr(run.data.tags)
        blob += open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read()
        assert SECRET not in blob, run.info.run_name


def test_prepare_and_tokenize_end_in_one_line_when_the_server_is_down_and_write_nothing(tmp_path, tiny_dataset):
    """The MLflow run starts before the work: an unreachable server ends the job with its address, no traceback, and
    no dataset or codes half-made."""
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = [f"tracking.uri=http://127.0.0.1:{port}", "tracking.request_timeout_s=2", "tracking.retry_max_s=1"]
    config = os.path.join(REPO, "configs", "synthetic.yaml")
    for job, args in (("prepare", [f"workdir={tmp_path}"]),
                      ("tokenize", [f"workdir={tmp_path}", f"paths.dataset={tiny_dataset}"])):
        proc = run_job(job, "--config", config, *args, *down, check=False, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"127.0.0.1:{port}" in proc.stderr and "cannot be reached" in proc.stderr, proc.stderr
        assert not os.path.exists(tmp_path / "dataset") and not os.path.exists(tmp_path / "sids"), job


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(url: str, tmp_path, screenshot: str, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it (one Chromium start does both). Charts draw
    only with a longer ``budget_ms`` of virtual time (their frames come one by one)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", f"--virtual-time-budget={budget_ms}",
             "--run-all-compositor-stages-before-draw",
             "--window-size=1400,1600", f"--screenshot={screenshot}", "--dump-dom"]
    out = subprocess.run([_chromium(), *flags, url], capture_output=True, text=True, timeout=120)
    assert os.path.exists(screenshot) and os.path.getsize(screenshot) > 10_000, f"{screenshot}: no page drawn"
    return out.stdout


def test_demo_pipeline_shows_in_the_ui(demo, mlflow_server, tmp_path):
    if _chromium() is None:
        pytest.skip("no chromium (Debian package 'chromium'; .ci/run installs it)")
    client, exp, runs, _ = demo
    shots = os.environ.get("GENREC_TEST_ARTIFACTS", str(tmp_path))
    os.makedirs(shots, exist_ok=True)
    train = runs["train"].info

    # The experiment is tagged as a model-training one (MLflow 3's mlflow.experimentKind), and its link opens the
    # "Model training" view on the runs list, not the GenAI view MLflow 3 opens by default (an Overview of traces
    # with "No data", Judges, Prompts, Sessions).
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    listing = _render(ui_url(mlflow_server, exp.experiment_id), tmp_path,
                      screenshot=os.path.join(shots, "mlflow_demo_runs.png"))
    assert "Model registry" in listing and "Run Name" in listing  # the Model training sidebar, the runs table
    for genai in ("Judges", "Sessions", "Prompts", "No data"):
        assert genai not in listing, genai
    for job in JOBS:
        assert runs[job].info.run_name in listing, job
    # the Dataset column names the dataset (name and digest) instead of "-"
    digest = runs["train"].inputs.dataset_inputs[0].dataset.digest
    assert f"synthetic ({digest})" in listing, "dataset not in the runs list"

    # The training run's page shows its name and its validation metrics.
    page = _render(ui_url(mlflow_server, exp.experiment_id, train.run_id), tmp_path,
                   screenshot=os.path.join(shots, "mlflow_demo_train_run.png"))
    assert train.run_name in page
    assert "valid/recall_at_10" in page and "valid/ndcg_at_10" in page

    # The run's System metrics tab draws MLflow's system metrics charts
    system = _render(ui_url(mlflow_server, exp.experiment_id, train.run_id, "system-metrics"), tmp_path,
                     screenshot=os.path.join(shots, "mlflow_demo_train_system_metrics.png"), budget_ms=60000)
    assert "System metrics" in system
    # a chart's legend names its metric once it is drawn ("<run name> (system/<metric>)")
    assert f"{train.run_name} (system/cpu_utilization_percentage)" in system
    assert f"{train.run_name} (system/system_memory_usage_megabytes)" in system

    # The artifacts tab with reports/metrics.md open: the report files are listed and the table is rendered.
    table = open(client.download_artifacts(train.run_id, "reports/metrics.md", str(tmp_path))).read()
    tiger_r10 = re.search(r"^\| tiger \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", table, re.M).group(1)  # the R@10 column
    artifacts = _render(ui_url(mlflow_server, exp.experiment_id, train.run_id, "artifacts/reports/metrics.md"),
                        tmp_path, screenshot=os.path.join(shots, "mlflow_demo_train_artifacts.png"))
    for name in ("config.yaml", "reports", "curves.png", "metrics.md", "examples.md"):
        assert name in artifacts, name
    assert "most-popular" in artifacts and tiger_r10 in artifacts
