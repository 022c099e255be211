"""Tracking against a real MLflow server, checked through the UI in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from genrec_dist.config import load_config
from genrec_dist.tracking import NullTracker, make_tracker, ui_url


def test_null_tracker_off_rank_zero_and_when_disabled(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    assert isinstance(make_tracker(cfg, "train", rank=1), NullTracker)
    cfg.tracking.enabled = False
    assert isinstance(make_tracker(cfg, "train", rank=0), NullTracker)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(url: str, tmp_path, screenshot: str | None = None) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=20000",
             "--window-size=1400,900"]
    if screenshot:
        subprocess.run([_chromium(), *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    out = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return out.stdout


def test_run_reaches_server_and_shows_in_the_ui(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-logged")
    cfg = load_config(None, [f"workdir={tmp_path}", f"tracking.uri={mlflow_server}", "tracking.experiment=ui-test"])
    tracker = make_tracker(cfg, "train", run_name="ui-check-run")
    tracker.log_config(cfg)
    for step in range(3):
        tracker.log({"loss": 1.0 / (step + 1), "recall@10": 0.1 * step}, step=step)
    (tmp_path / "table.md").write_text("| metric | value |\n|---|---|\n| recall@10 | 0.2 |\n")
    tracker.log_artifact(str(tmp_path / "table.md"))
    tracker.close()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["recall_at_10"] == pytest.approx(0.2)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.tags["genrec.job"] == "train"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml", "table.md"]
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # secrets in the environment never reach params, tags or artifacts
    blob = repr(run.data.params) + repr(run.data.tags)
    blob += open(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))).read()
    assert "s3cr3t-value-never-logged" not in blob

    if _chromium() is None:
        pytest.skip("no chromium (Debian package 'chromium'; .ci/run installs it)")
    shot = os.environ.get("GENREC_TEST_ARTIFACTS", str(tmp_path))
    os.makedirs(shot, exist_ok=True)
    page = _render(f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}", tmp_path,
                   screenshot=os.path.join(shot, "mlflow_run_page.png"))
    assert "ui-check-run" in page
    assert "recall_at_10" in page
    # the experiment's "Model training" view (not the GenAI overview MLflow 3 opens by default) lists the run
    listing = _render(ui_url(mlflow_server, tracker.experiment_id), tmp_path)
    assert "Training runs" in listing and "ui-check-run" in listing
