"""``jobs/serve.py``: a run's model on Ray Serve, started by the real job on the session's local Ray (the job deploys
with ``serve.blocking=false`` and exits, as on a cluster; the app stays up). Concurrent requests are batched and each
answer is the model's own top-k; bad requests get the pyfunc's 400s; a replica killed under load loses no answer to
a wrong one. The model is an untrained CAR export (ranking does not need training) whose export says ``slow`` with
``slow_weight=0.25``, so serving under the exported settings (not the config's defaults) is what is checked."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from _util import free_port, run_job, wait_http

N_ITEMS = 200


@pytest.fixture(scope="module")
def car_run(tmp_path_factory):
    """A run dir holding an untrained CAR export (inference slow, slow_weight 0.25, as if chosen on validation)."""
    from genrec_dist.data.semantic_ids import read_semantic_ids, write_semantic_ids
    from genrec_dist.models import ModelConfig, build_model
    from genrec_dist.runs.export import model_meta, semantic_id_files, write_model

    root = tmp_path_factory.mktemp("serve")
    codes = np.stack([np.arange(N_ITEMS) % 8, (np.arange(N_ITEMS) // 8) % 8], axis=1)  # 2 levels, some shared
    write_semantic_ids(str(root / "sids"), np.arange(1, N_ITEMS + 1), codes, [8, 8], {"source": "test"})
    cfg = ModelConfig()
    cfg.car.d_model, cfg.car.n_heads, cfg.car.n_layers, cfg.car.d_ff = 32, 2, 1, 64
    cfg.car.inference, cfg.car.slow_weight = "slow", 0.25
    torch.manual_seed(0)
    model = build_model("car", cfg, N_ITEMS, read_semantic_ids(str(root / "sids")))
    with torch.no_grad():  # spread the scores: an untrained model's are nearly flat (ties would decide the order)
        for p in model.parameters():
            p.mul_(4.0)
    run_dir = root / "runs" / "car-serve"
    write_model(str(run_dir / "model"), model.state_dict(), model_meta("car", cfg, N_ITEMS, None, 0, {}),
                sids_files=semantic_id_files(str(root / "sids")))
    (run_dir / "run.json").write_text(json.dumps({"run_name": "car-serve", "model": "car"}))
    return str(run_dir)


def _deploy(ray_local, run_dir: str, port: int, *overrides: str) -> None:
    """``jobs/serve.py`` against the session's Ray: deploys (or updates) the app and exits."""
    gcs = ray_local.get_runtime_context().gcs_address
    run_job("serve", "--run", run_dir, f"serve.ray_address={gcs}", f"serve.port={port}", "serve.blocking=false",
            "serve.cpus_per_replica=0.5", *overrides, timeout=300)


@pytest.fixture(scope="module")
def served(ray_local, car_run):
    """(base URL, run dir) of the app on the session's Ray; Serve is shut down after the module."""
    from ray import serve

    port = free_port()
    _deploy(ray_local, car_run, port, "serve.batch_wait_timeout_s=0.05", "serve.max_batch_size=32")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=60)
    try:
        yield url, car_run, port
    finally:
        serve.shutdown()


def _post(url: str, body, timeout: float = 60) -> tuple[int, dict]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"message": text}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _histories(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, 30))).tolist() for _ in range(n)]


class Reference:
    """The model's own ranking, one user at a time: the export loaded in this process."""

    def __init__(self, run_dir: str):
        from genrec_dist.runs.export import load_exported

        self.model, _ = load_exported(run_dir)
        assert (self.model.cfg.inference, self.model.cfg.slow_weight) == ("slow", 0.25)  # the exported settings

    def scores(self, history: list[int], inference: str = "slow") -> np.ndarray:
        from genrec_dist.serve_request import left_pad

        h = left_pad([np.asarray(history)], int(self.model.cfg.max_history))
        with torch.no_grad():
            return self.model.scores(h, inference)[0].numpy()

    def check(self, history: list[int], k: int, items: list[int], scores: list[float]) -> None:
        """``items`` are the model's top ``k`` for ``history`` (exactly, up to ties within 1e-5) with its scores."""
        s = self.scores(history)
        assert len(items) == k and len(set(items)) == k
        np.testing.assert_allclose(scores, s[items], rtol=0, atol=1e-5)
        assert all(a >= b - 1e-6 for a, b in zip(scores, scores[1:])), scores  # best first
        rest = np.delete(s, [0, *items])  # (item 0 is padding)
        assert rest.max() <= min(scores) + 1e-5  # nothing left out ranks above the last one given
        want = np.argsort(-s[1:], kind="stable")[:k] + 1
        assert items == want.tolist() or np.allclose(s[items], s[want], atol=1e-5)


def test_concurrent_requests_are_batched_and_each_answer_is_the_models_top_k(served):
    url, run_dir, _ = served
    ref = Reference(run_dir)
    hists = _histories(64, seed=1)
    ks = [5 if i % 2 else 7 for i in range(len(hists))]  # two k's in one burst: ranked in separate model calls
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda a: _post(url, {"dataframe_records": [{"user": f"u{a[0]}", "history": a[1]}],
                                                      "params": {"k": a[2]}}),
                                [(i, h, k) for i, (h, k) in enumerate(zip(hists, ks))]))
    for i, ((status, body), h, k) in enumerate(zip(answers, hists, ks)):
        assert status == 200, body
        (pred,) = body["predictions"]
        assert pred["user"] == f"u{i}"
        ref.check(h, k, pred["items"], pred["scores"])
    stats = _get(url + "/ready")
    assert stats["ready"] and stats["model"] == "car" and stats["num_items"] == N_ITEMS
    assert stats["largest_batch"] > 1 and stats["batches"] < stats["requests"], stats  # batched, not one by one
    # the exported mode is what is served: fast ranks differently for some of these users
    assert any(np.argsort(-ref.scores(h, "fast")[1:])[:5].tolist() != np.argsort(-ref.scores(h)[1:])[:5].tolist()
               for h in hists)


def test_request_forms_and_bad_requests_get_the_pyfuncs_answers(served):
    url, run_dir, _ = served
    ref = Reference(run_dir)
    hists = _histories(3, seed=2)
    # several users in one request, one without a user, and the dataframe_split form
    status, body = _post(url, {"dataframe_records": [{"user": "a", "history": hists[0]}, {"history": hists[1]},
                                                     {"user": "c", "history": hists[2]}], "params": {"k": 4}})
    assert status == 200 and [p["user"] for p in body["predictions"]] == ["a", "", "c"], body
    for p, h in zip(body["predictions"], hists):
        ref.check(h, 4, p["items"], p["scores"])
    status, split = _post(url, {"dataframe_split": {"columns": ["history"], "data": [[h] for h in hists]},
                                "params": {"k": 4}})
    assert status == 200 and [p["items"] for p in split["predictions"]] == [p["items"] for p in body["predictions"]]
    assert "user" not in split["predictions"][0]
    status, body = _post(url, {"dataframe_records": [{"history": hists[0]}], "params": {"inference": "fast", "k": 3}})
    assert status == 200 and body["predictions"][0]["items"] == (np.argsort(-ref.scores(hists[0], "fast")[1:],
                                                                            kind="stable")[:3] + 1).tolist()
    for request, expected in (
            ({"dataframe_records": [{"user": "x", "history": "abc"}]}, "row 0: 'history' must be a list of item ids"),
            ({"dataframe_records": [{"history": [1, 2, 99999]}]}, "row 0: unknown item id 99999 (this model's "
                                                                  f"catalog is 1..{N_ITEMS})"),
            ({"dataframe_records": [{"history": [1]}, {"history": []}]}, "row 1: 'history' is empty"),
            ({"dataframe_records": [{"history": [1, 2]}], "params": {"k": 0}}, f"'k' must be an integer in 1..{N_ITEMS}"),
            ({"dataframe_records": [{"history": [1, 2]}], "params": {"k": "many"}}, "'k' must be an integer"),
            ({"dataframe_records": [{"history": [1]}], "params": {"inference": "medium"}},
             "'inference' must be one of fast, slow"),
            ({"dataframe_records": [{"history": [1]}], "params": {"beam_width": 5}}, "unknown param 'beam_width'"),
            ({"dataframe_records": [{"items": [1]}]}, "needs a 'history' column"),
            ({"instances": [[1, 2]]}, "exactly one of dataframe_records, dataframe_split"),
            ("{not json", "not JSON")):
        status, body = _post(url, request)
        assert status == 400 and expected in body["message"], (request, status, body)
        assert body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST") and "Traceback" not in body["message"]
    with urllib.request.urlopen(url + "/ping", timeout=10) as resp:
        assert resp.status == 200


def _replica_actors(ray) -> list[tuple[str, str]]:
    """(name, namespace) of the app's live replica actors."""
    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and "GenRecServer" in a["name"])


def test_a_replica_killed_under_load_loses_no_answer_to_a_wrong_one(served, ray_local):
    url, run_dir, port = served
    ray = ray_local
    _deploy(ray, run_dir, port, "serve.num_replicas=2", "serve.batch_wait_timeout_s=0.005")  # the app, updated
    deadline = time.monotonic() + 90
    while len(_replica_actors(ray)) != 2 or len({_get(url + "/ready")["pid"] for _ in range(12)}) != 2:
        assert time.monotonic() < deadline, _replica_actors(ray)
        time.sleep(0.5)
    ref = Reference(run_dir)
    hists = _histories(40, seed=3)
    results: list[tuple[float, int, dict, int]] = []  # (sent at, status, body, history index)
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        i = seed
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status, body = _post(url, {"dataframe_records": [{"history": hists[i % len(hists)]}],
                                           "params": {"k": 5}}, timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                status, body = 599, {"message": repr(exc)}
            with lock:
                results.append((sent, status, body, i % len(hists)))
            i += 4

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = _replica_actors(ray)[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(*victim), no_restart=True)
    # the controller replaces it; the load goes on until two replicas answer again, then a few seconds more
    deadline = time.monotonic() + 90
    while victim in _replica_actors(ray) or len(_replica_actors(ray)) != 2:
        assert time.monotonic() < deadline, _replica_actors(ray)
        time.sleep(0.5)
    recovered_at = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    ok = [(t, b, i) for t, s, b, i in results if s == 200]
    failed = [(t - killed_at, s, b) for t, s, b, _ in results if s != 200]
    print(f"{len(ok)} answered, {len(failed)} failed (seconds after the kill, status): "
          f"{[(round(t, 2), s) for t, s, _ in failed]}; replaced in {recovered_at - killed_at:.1f} s")
    for _, body, i in ok:  # no request is answered wrongly
        (pred,) = body["predictions"]
        ref.check(hists[i], 5, pred["items"], pred["scores"])
    assert sum(t < killed_at for t, _, _ in ok) > 10 and sum(t > recovered_at for t, _, _ in ok) > 10
    # what failed was in flight when the replica died (a 5xx, never a 4xx or a wrong list): nothing sent later
    assert all(s >= 500 for _, s, _ in failed), failed
    late = [f for f in failed if f[0] > 1.0]
    assert not late, late


def test_a_registered_model_is_served_from_the_registry_beside_it(served, ray_local, tmp_path):
    """``--run models:/<name>/<version>``: each replica downloads the MLflow model (the export inside it) from the
    tracking store; a second application beside the first, under its own route prefix."""
    import mlflow
    from ray import serve

    from genrec_dist import serving

    url, run_dir, port = served
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    folder = serving.save_model(os.path.join(run_dir, "model"), str(tmp_path / "mlflow-model"), [[1, 2, 3]])
    run = client.create_run(client.create_experiment("serve-registry", artifact_location=f"file://{tmp_path}/art"))
    client.log_artifacts(run.info.run_id, folder, "model")
    client.create_registered_model("genrec-test-car")
    client.create_model_version("genrec-test-car", f"runs:/{run.info.run_id}/model", run.info.run_id)
    proc = run_job("serve", "--run", "models:/genrec-test-car/9", f"tracking.uri={uri}", check=False, timeout=120)
    assert proc.returncode == 1 and "models:/genrec-test-car/9" in proc.stderr and "Traceback" not in proc.stderr
    _deploy(ray_local, "models:/genrec-test-car/1", port, f"tracking.uri={uri}", "serve.app_name=registry",
            "serve.route_prefix=/registry")
    try:
        hists = _histories(6, seed=4)
        body = {"dataframe_records": [{"history": h} for h in hists], "params": {"k": 6}}
        status, got = _post(url + "/registry", body)
        assert status == 200, got
        assert _get(url + "/registry/ready")["source"].startswith("models:/genrec-test-car/1")
        assert got == _post(url, body)[1]  # the run dir's app answers the same
    finally:
        serve.delete("registry")
