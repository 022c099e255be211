"""A trained run as an MLflow model: logged and registered at the end of training, loaded with
``mlflow.pyfunc.load_model``, served by a real ``mlflow models serve`` process over HTTP; the run's dataset inputs
and system metrics. One tiny SASRec run (SQLite store, so the Model Registry exists) serves the whole module."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from _util import REPO, free_port, run_job, wait_http

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")
TINY_SASREC = ["train.model=sasrec", "model.sasrec.d_model=32", "model.sasrec.d_ff=32", "model.sasrec.n_layers=1",
               "batch_size=64", "max_steps=30", "lr=0.003", "warmup_steps=5", "eval_every=15", "checkpoint_every=0",
               "log_every=5", "tracking.system_metrics_interval_s=0.5"]
NAME = "genrec-synthetic-sasrec"


@pytest.fixture(scope="module")
def trained(tiny_cfg, tiny_dataset, tmp_path_factory):
    """(tracking uri, MLflow run, run dir, eval histories (N, H) of the test split)."""
    import mlflow

    from genrec_dist.data.dataset import Dataset
    from genrec_dist.data.examples import eval_examples

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    run_job("train", "--config", CONFIG, f"workdir={tiny_cfg.workdir}", f"paths.runs={root}/runs",
            f"tracking.uri={uri}", "tracking.experiment=serving", *TINY_SASREC, "run_name=sasrec-serve")
    run_dir = os.path.join(root, "runs", "sasrec-serve")
    with open(os.path.join(run_dir, "run.json")) as fh:
        run = mlflow.MlflowClient(uri).get_run(json.load(fh)["mlflow_run_id"])
    ds = Dataset.open(tiny_dataset)
    hist = eval_examples(ds.sequences(), ds.max_history, "test").history
    return uri, run, run_dir, hist


def _recommend(run_dir: str, hist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from genrec_dist.runs.export import load_exported

    model, _ = load_exported(run_dir)
    h = torch.from_numpy(hist)
    with torch.no_grad():
        ids = model.recommend(h, k)
        return ids.numpy(), model.scores(h).gather(1, ids).numpy()


def _records(hist: np.ndarray, users: list[str]) -> list[dict]:
    return [{"user": u, "history": [int(i) for i in h if i]} for u, h in zip(users, hist)]


def test_training_logs_and_registers_a_model_that_predicts_the_same_top_k(trained):
    import mlflow
    import pandas as pd

    uri, run, run_dir, hist = trained
    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert version.run_id == run.info.run_id and run.data.tags["genrec.registered_model"] == f"{NAME}/1"
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    finally:
        mlflow.set_tracking_uri(None)
    sig = pyfunc.metadata.signature
    assert sig.inputs.input_names() == ["user", "history"] and sig.params.to_dict()[0]["name"] == "k"
    assert pyfunc.metadata.saved_input_example_info is not None  # the input example is logged too

    users = [f"u{i}" for i in range(len(hist[:40]))]
    out = pyfunc.predict(pd.DataFrame(_records(hist[:40], users)), params={"k": 7})
    ids, scores = _recommend(run_dir, hist[:40], 7)
    assert list(out["user"]) == users
    assert np.array_equal(np.stack(out["items"].to_numpy()), ids)
    np.testing.assert_allclose(np.stack(out["scores"].to_numpy()), scores, rtol=1e-5, atol=1e-5)
    assert all(np.all(np.diff(s) <= 0) for s in out["scores"])  # best first


def test_pyfunc_refuses_bad_histories_with_invalid_parameter_errors(trained):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    uri, _, _, _ = trained
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    finally:
        mlflow.set_tracking_uri(None)
    for rows, params, expected in (([{"history": [1, 99999]}], None, "unknown item id 99999"),
                                   ([{"history": [0, 3]}], None, "unknown item id 0"),
                                   ([{"history": []}], None, "'history' is empty"),
                                   ([{"history": [1, 2]}], {"k": 0}, "'k' must be an integer in 1..120")):
        with pytest.raises(MlflowException) as err:
            pyfunc.predict(pd.DataFrame(rows), params=params)
        assert expected in err.value.message and err.value.get_http_status_code() == 400, err.value.message


def _no_nan(token: str) -> None:
    raise AssertionError(f"{token} in a JSON response")


def _post(url: str, body: dict | str) -> tuple[int, str]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_mlflow_models_serve_answers_http_with_the_same_items(trained, tmp_path):
    uri, _, run_dir, hist = trained
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m",
                             f"models:/{NAME}/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                             "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/ping", timeout=180, proc=proc)
        except Exception:
            raise AssertionError(open(tmp_path / "serve.log").read()[-4000:]) from None
        status, body = _post(url + "/invocations", {"dataframe_records": _records(hist[:2], ["alice", "bob"]),
                                                    "params": {"k": 5}})
        assert status == 200, body
        preds = json.loads(body, parse_constant=_no_nan)["predictions"]
        ids, _ = _recommend(run_dir, hist[:2], 5)
        assert [p["user"] for p in preds] == ["alice", "bob"]
        assert [p["items"] for p in preds] == ids.tolist()
        # a row without a user beside one with: still plain JSON (no NaN)
        rows = [{"history": _records(hist[:1], ["-"])[0]["history"]}, *_records(hist[1:2], ["bob"])]
        status, body = _post(url + "/invocations", {"dataframe_records": rows, "params": {"k": 5}})
        assert status == 200 and [p["user"] for p in json.loads(body, parse_constant=_no_nan)["predictions"]] == \
            ["", "bob"], body

        # malformed requests: a 4xx with a message that says what is wrong, no stack trace
        for request, expected in (
                ({"dataframe_records": [{"user": "x", "history": "abc"}]}, "history"),
                ({"dataframe_records": [{"user": "x", "history": [1, 2, 99999]}]}, "unknown item id 99999"),
                ({"dataframe_records": [{"user": "x", "history": [1, 2]}], "params": {"k": "many"}}, "k"),
                ("not json", "")):
            status, body = _post(url + "/invocations", request)
            assert 400 <= status < 500, (request, status, body)
            assert expected in body and "Traceback" not in body and "stack_trace" not in body, (request, body)
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_training_run_has_its_dataset_and_codes_free_inputs(trained, tiny_dataset):
    _, run, _, _ = trained
    with open(os.path.join(tiny_dataset, "manifest.json"), "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    (inp,) = run.inputs.dataset_inputs  # SASRec reads no semantic IDs: the dataset only
    ds = inp.dataset
    assert ds.name == "synthetic" and ds.digest == sha[:32] and ds.source_type == "local"
    assert json.loads(ds.source)["uri"] == tiny_dataset
    assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == ["user_id", "user", "items", "timestamps"]
    assert json.loads(ds.profile)["sha256"] == sha and json.loads(ds.profile)["users"] == 300
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_training_run_logs_system_metrics(trained):
    uri, run, _, _ = trained
    import mlflow

    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(history) >= 2 and all(m.value > 0 for m in history)  # sampled during the run, not once at the end


@pytest.mark.parametrize("name,params", [("car", {"inference": "slow"}), ("car", {"inference": "fast"}),
                                         ("tiger", {"beam_width": 12})])
def test_pyfunc_of_a_semantic_id_model_ranks_like_recommend(name, params, tmp_path):
    """CAR (fast and slow) and TIGER (beam search), untrained: the pyfunc's items are recommend's; CAR's scores are
    its log-probabilities, TIGER's its beam log-probs. No training: an export written
    directly, saved as an MLflow model and loaded from the folder."""
    import mlflow
    import pandas as pd

    from genrec_dist import serving
    from genrec_dist.data.semantic_ids import read_semantic_ids, write_semantic_ids
    from genrec_dist.runs.export import load_exported
    from genrec_dist.models import ModelConfig, build_model
    from genrec_dist.runs.export import model_meta, semantic_id_files, write_model

    n = 24
    codes = np.stack([np.arange(n) % 4, np.arange(n) // 4], axis=1)  # unique 2-level codes
    write_semantic_ids(str(tmp_path / "sids"), np.arange(1, n + 1), codes, [4, 6], {"source": "test"})
    cfg = ModelConfig()
    cfg.car.d_model, cfg.car.n_heads, cfg.car.n_layers, cfg.car.d_ff = 16, 2, 1, 32
    cfg.tiger.d_model, cfg.tiger.n_heads, cfg.tiger.head_dim, cfg.tiger.d_ff = 16, 2, 8, 32
    cfg.tiger.encoder_layers = cfg.tiger.decoder_layers = 1
    torch.manual_seed(0)
    model = build_model(name, cfg, n, read_semantic_ids(str(tmp_path / "sids")))
    write_model(str(tmp_path / "run" / "model"), model.state_dict(), model_meta(name, cfg, n, None, 0, {}),
                sids_files=semantic_id_files(str(tmp_path / "sids")))
    path = serving.save_model(str(tmp_path / "run" / "model"), str(tmp_path / "mlflow-model"), [[1, 2, 3]])

    pyfunc = mlflow.pyfunc.load_model(path)
    hist = [[3, 4, 5], [9], [1, 7, 2, 20, 21]]
    out = pyfunc.predict(pd.DataFrame({"history": hist}), params={"k": 5, **params})
    exported, _ = load_exported(str(tmp_path / "run"))
    h = serving.histories_tensor(hist, n, 20)
    with torch.no_grad():
        ids = exported.recommend(h, 5, **params)
    assert np.array_equal(np.stack(out["items"].to_numpy()), ids.numpy())
    got = np.stack(out["scores"].to_numpy())
    if name == "car":
        np.testing.assert_allclose(got, exported.scores(h, params["inference"]).gather(1, ids).numpy(), rtol=1e-5)
    else:  # the items' beam log-probs, best first
        with torch.no_grad():
            beam = exported.topk(h, 5, **params)[1].numpy()
        np.testing.assert_allclose(got, beam, rtol=1e-5)
        assert (got[:, :-1] >= got[:, 1:]).all() and (got < 0).all()
    with pytest.raises(Exception, match="must be one of fast, slow" if name == "car" else "at least 1"):
        pyfunc.predict(pd.DataFrame({"history": hist}),
                       params={"inference": "medium"} if name == "car" else {"beam_width": 0})
