"""The MLflow server goes away while a job runs: the job goes on and nothing it logged is lost.

Each test starts its own `mlflow server` (cluster/mlflow_server.sh, SQLite store) so it can stop it (SIGTERM to the
process group) and start it again on the same port and store:

- a real training run (jobs/train.py, one process, tiny SASRec, every step logged) keeps stepping while the server
  is down; after the restart every step's loss is on the server, the run is FINISHED and the spool is gone;
- a tracker whose server stays down through ``close()``: close gives up after ``flush_timeout_s``, the spool holds
  exactly what did not arrive, a warning says how to replay it, and `python -m genrec_dist.tracking replay`
  delivers it all once the server is back.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from _util import REPO, MlflowServer
from genrec_dist import spool
from genrec_dist.config import load_config
from genrec_dist.tracking import make_tracker

# ~20-40 s of tiny-SASRec steps on one thread; the restarted server takes the backlog mid-training or, when the
# steps are done first, while the job waits in close() (tracking.flush_timeout_s): either way nothing may be lost.
TRAIN_STEPS = 2000
UNREACHABLE, BACK = "is unreachable", "is reachable again"


def _until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``cond`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for: {what}")
        time.sleep(0.2)


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow-server")
    srv.root.mkdir()
    srv.start()
    yield srv
    if srv.proc is not None:
        srv.stop()


def _client(url: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=url)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ----- a real training run through an outage ------------------------------------------------------------------

def test_training_goes_on_while_the_server_is_down_and_every_step_arrives(server, tiny_cfg, tiny_dataset):
    name = "outage-train"
    run_dir = os.path.join(tiny_cfg.workdir, "runs", name)
    args = ["--config", os.path.join(REPO, "configs", "synthetic.yaml"), f"workdir={tiny_cfg.workdir}",
            "train.model=sasrec", "model.sasrec.d_model=32", "model.sasrec.d_ff=32", "model.sasrec.n_layers=1",
            "batch_size=32", f"max_steps={TRAIN_STEPS}", "warmup_steps=10", "log_every=1", "eval_every=0",
            "checkpoint_every=0", f"run_name={name}", f"tracking.uri={server.url}", "tracking.experiment=outage",
            "tracking.retry_max_s=1", "tracking.flush_timeout_s=300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def last_step() -> int:
        done = [ln for ln in list(lines) if ln.startswith("step ") and f"/{TRAIN_STEPS} " in ln]
        return int(done[-1].split()[1].split("/")[0]) if done else 0

    try:
        client = _client(server.url)
        _until(lambda: last_step() >= 5, 300, "five training steps", proc)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                                    f"attributes.run_name = '{name}'")
        run_id = run.info.run_id
        _until(lambda: len(_steps(client, run_id, "train/loss")) >= 5, 120, "five steps on the server", proc)

        server.stop()
        spool_path = os.path.join(run_dir, f"tracking_spool-{run_id}.jsonl")
        _until(lambda: os.path.exists(spool_path), 300, "a delivery failing into the spool", proc)
        first_kept = min(m[3] for it in spool.read(spool_path)[1].values() if it["op"] == "metrics"
                         for m in it["metrics"])
        _until(lambda: last_step() >= first_kept + 50, 300, "training stepping on with the server down", proc)
        server.start()
        assert proc.wait(timeout=600) == 0, "".join(lines)[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    out = "".join(lines)

    run = _client(server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    client = _client(server.url)
    assert _steps(client, run_id, "train/loss") == list(range(1, TRAIN_STEPS + 1))  # no gap, no duplicate
    assert _steps(client, run_id, "train/lr") == list(range(1, TRAIN_STEPS + 1))
    assert "test/ndcg_at_10" in run.data.metrics and run.data.params["world_size"] == "1"
    assert {os.path.basename(a.path) for a in client.list_artifacts(run_id, "reports")} >= {"curves.png"}
    assert glob.glob(os.path.join(run_dir, "tracking_spool*")) == []  # delivered: no spool, no staged files
    # one warning when the server went away (naming it and the spool), one when it came back
    down = [ln for ln in out.splitlines() if UNREACHABLE in ln]
    assert len(down) == 1 and server.url in down[0] and spool_path in down[0], down
    assert sum(BACK in ln for ln in out.splitlines()) == 1


# ----- the server stays down through close(); replay afterwards ---------------------------------------------------

def test_close_with_the_server_down_keeps_the_rest_in_the_spool_and_replay_delivers_it(server, tmp_path, caplog):
    cfg = load_config(None, [f"workdir={tmp_path}", f"tracking.uri={server.url}", "tracking.experiment=outage",
                             "tracking.flush_timeout_s=2", "tracking.retry_max_s=0.5", "tracking.request_timeout_s=5",
                             "tracking.system_metrics=[]"])  # exactly the items logged here
    run_dir = tmp_path / "runs" / "r1"
    tracker = make_tracker(cfg, "train", run_name="outage-close", spool_dir=str(run_dir))
    client = _client(server.url)
    for step in range(3):
        tracker.log({"loss": 1.0 / (step + 1)}, step)
    _until(lambda: _steps(client, tracker.run_id, "loss") == [0, 1, 2], 60, "the first steps on the server")

    server.stop()
    notes = tmp_path / "notes.md"
    notes.write_text("# written while the server was down\n")
    with caplog.at_level(logging.WARNING, logger="genrec_dist.tracking"):
        for step in range(3, 10):
            tracker.log({"loss": 1.0 / (step + 1), "recall@10": 0.01 * step}, step)
        tracker.log_params({"late_param": 7})
        tracker.log_artifact(str(notes), "reports")
        notes.unlink()  # the caller's file may go at once: the tracker keeps its own link
        closer = threading.Thread(target=tracker.close, args=("FINISHED",))
        closer.start()
        closer.join(timeout=120)  # flush_timeout_s=2: a hang guard, not a timing assertion
        assert not closer.is_alive(), "close() did not return with the server down"

    path = tracker.spool_path
    assert os.path.dirname(path) == str(run_dir)
    header, items, _ = spool.read(path)
    assert header["run_id"] == tracker.run_id and header["uri"] == server.url
    kept = sorted((k, step) for it in items.values() if it["op"] == "metrics" for k, _, _, step in it["metrics"])
    assert kept == sorted([("loss", s) for s in range(3, 10)] + [("recall_at_10", s) for s in range(3, 10)])
    assert [it["op"] for it in items.values()][-3:] == ["params", "artifact", "terminate"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(UNREACHABLE in w for w in warnings) == 1
    assert any(f"python -m genrec_dist.tracking replay {path}" in w and "14 metric values" in w for w in warnings)

    server.start()
    assert _steps(client, tracker.run_id, "loss") == [0, 1, 2]  # nothing arrived on its own after close
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    proc = subprocess.run([sys.executable, "-m", "genrec_dist.tracking", "replay", path], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(items)} items delivered to run {tracker.run_id}" in proc.stdout
    run = client.get_run(tracker.run_id)
    assert _steps(client, tracker.run_id, "loss") == list(range(10))
    assert _steps(client, tracker.run_id, "recall_at_10") == list(range(3, 10))
    assert run.data.params["late_param"] == "7" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "reports")] == ["reports/notes.md"]
    assert not os.path.exists(path) and not os.path.exists(spool.files_dir(path))


# ----- the spool file on its own ---------------------------------------------------------------------------------

def test_spool_keeps_order_forgets_acked_items_and_survives_a_line_cut_short(tmp_path):
    path = str(tmp_path / "tracking_spool-r.jsonl")
    s = spool.Spool(path, {"uri": "http://x", "run_id": "r"})
    s.append([{"op": "metrics", "metrics": [["loss", 1.0, 0, step]]} for step in range(4)])
    s.ack([0, 2])
    with open(path, "a") as fh:
        fh.write('{"seq": 4, "op": "metr')  # killed mid-write
    again = spool.Spool(path, {"uri": "http://x", "run_id": "r"})
    assert [it["metrics"][0][3] for it in again.pending()] == [1, 3]
    again.append([{"op": "terminate", "status": "FINISHED", "end_time": 0}])  # the cut line does not swallow it
    header, items, last = spool.read(path)
    assert header["run_id"] == "r" and list(items) == [1, 3, 4] and items[4]["op"] == "terminate" and last == 4
    again.ack([1, 3, 4])
    assert not os.path.exists(path)
