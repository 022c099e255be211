"""``jobs/prepare.py`` run as a user runs it: help, a real run, a bad override and bad input (one-line errors)."""

from __future__ import annotations

import json
import os

from genrec_dist.data.dataset import Dataset

from _util import run_job

TINY = ["prepare.synthetic.num_items=60", "prepare.synthetic.num_users=80", "prepare.num_shards=2"]


def test_help():
    proc = run_job("prepare", "--help")
    assert "--config" in proc.stdout and "overrides" in proc.stdout


def test_run_prints_the_summary_table(tmp_path):
    proc = run_job("prepare", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", *TINY)
    ds = Dataset.open(str(tmp_path / "dataset"))
    # one line says where the config came from; the whole resolved config is not printed (MLflow and the manifest
    # keep it)
    assert "prepare: config configs/synthetic.yaml + " in proc.stdout and "k_core:" not in proc.stdout
    table = dict(line.split("  ", 1) for line in proc.stdout.splitlines()
                 if line[:1].isalpha() and "  " in line and ":" not in line.split("  ", 1)[0])
    assert table["users"].strip() == f"{ds.num_users:,}" and table["items"].strip() == f"{ds.num_items:,}"
    assert "seq length min/p50/p90/max" in proc.stdout
    assert ds.manifest["config"]["prepare"]["synthetic"]["num_users"] == 80
    # bare keys belong to the job's own section: k_core=4 means prepare.k_core=4
    run_job("prepare", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", *TINY, "k_core=4",
            "overwrite=true")
    assert Dataset.open(str(tmp_path / "dataset")).manifest["stats"]["k_core"]["k"] == 4


def test_bad_override_is_a_one_line_error(tmp_path):
    proc = run_job("prepare", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", "prepare.k_core=many",
                   check=False)
    assert proc.returncode == 2
    assert "prepare.k_core" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_job("prepare", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", "prepare.kcore=5",
                   check=False)
    assert proc.returncode == 2 and "unknown key 'prepare.kcore'" in proc.stderr
    assert not os.path.exists(tmp_path / "dataset")


def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "X.inter.json").write_text(json.dumps({"0": [1, 2, 3]}, indent=1)[:-3] + "]]\n")
    proc = run_job("prepare", "--config", "configs/synthetic.yaml", f"workdir={tmp_path}", "prepare.source=lcrec",
                   f"prepare.input_dir={raw}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # one error line, the last (MLflow may log its store's creation before it: the run starts before the work)
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert errors == proc.stderr.strip().splitlines()[-1:], proc.stderr
    assert errors[0].startswith(f"error: {raw}/X.inter.json:") and "not valid JSON" in errors[0]
    assert not os.path.exists(tmp_path / "dataset")
    import mlflow  # the job's MLflow run says it failed

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("genrec-dist").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["genrec.job"] == "prepare"
