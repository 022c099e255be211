"""The table scripts' MLflow grouping (benchmarks/_jobs.py): one parent run per table, each row's training run its
child (``mlflow.parentRunId``), a row read back adopted, the same table run again continuing its parent. Real
SQLite store; the rows are runs made by the tracker itself (training is covered elsewhere)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from _util import REPO


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.syspath_prepend(REPO)  # the benchmarks package is not installed: import it from the repo
    from benchmarks import _jobs

    return _jobs


def test_rows_are_children_of_one_table_run(tables, tmp_path):
    import mlflow

    from genrec_dist.config import load_config
    from genrec_dist.tracking import make_tracker

    cfg = load_config(None, [f"workdir={tmp_path}", "tracking.experiment=tables"])
    parent = tables.table_run(cfg, "car_ablation", "car-ablation (synthetic)", {"rows": "car,ar"})
    assert parent.run_id

    # a row trained now: its config carries the parent's id (train_once adds tracking.parent_run_id=...)
    row_cfg = load_config(None, [f"workdir={tmp_path}", "tracking.experiment=tables",
                                 f"tracking.parent_run_id={parent.run_id}"])
    new_row = make_tracker(row_cfg, "train", run_name="car-ablation-car")
    new_row.close()

    # a row trained before the table had a parent: read back, and adopted
    old = make_tracker(cfg, "train", run_name="car-ablation-ar")
    old.close()
    run_dir = tmp_path / "runs" / "car-ablation-ar"
    os.makedirs(run_dir)
    (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": old.run_id}))
    (run_dir / "metrics.json").write_text(json.dumps({"model": {"ndcg@10": 0.25}, "most_popular": {}}))
    res = tables.train_once([sys.executable, "jobs/train.py"], str(tmp_path / "runs"), "car-ablation-ar", parent)
    assert res["model"]["ndcg@10"] == 0.25
    tables.finish_table(parent, {"ar": res}, ["| row |", "| ar |"])

    client = mlflow.MlflowClient(parent.uri)
    for child in (new_row.run_id, old.run_id):
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent.run_id
    got = client.get_run(parent.run_id)
    assert got.data.params["rows"] == "car,ar" and got.data.metrics["ar/ndcg_at_10"] == 0.25
    assert got.info.status == "FINISHED"
    assert "| ar |" in open(client.download_artifacts(parent.run_id, "table.md", str(tmp_path))).read()

    # the same table again continues its parent instead of starting a second one
    again = tables.table_run(cfg, "car_ablation", "car-ablation (synthetic)", {"rows": "car,ar"})
    assert again.run_id == parent.run_id
    again.close()
    other = tables.table_run(cfg, "car_ablation", "car-ablation (beauty)", {"rows": "car"})
    assert other.run_id != parent.run_id
    other.close()
