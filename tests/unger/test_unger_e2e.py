"""UNGER end to end on the tiny synthetic catalog: Stage I (``tokenize.method=unger``, real Ray for embedding and
k-means, MLflow) -> unified codes + integrated embeddings -> Stage II, single-process (CPU speed) and on 2 DeepSpeed
ranks through ``jobs/train.py``, each beating most-popular; the ablation sources of Table 7.

Stage I runs once per module; the text embeddings of that run are reused by the ablation runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genrec_dist.config import load_config
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.semantic_ids import read_semantic_ids
from genrec_dist.evaluation.evaluate import MostPopular, evaluate_model
from genrec_dist.models import ModelConfig, build_model
from genrec_dist.tracking import make_tracker
from genrec_dist.data.examples import eval_examples, train_examples
from tokenization.embedding_store import read_embeddings
from tokenization.unger import REFERENCE_FILE, concat_embeddings, modality_share

from _util import REPO, free_port, run_group

CONFIG = os.path.join(REPO, "configs", "synthetic.yaml")
# Toy Stage I: 32-d DIN, 300 steps at lr 1e-2 (the paper's 1e-3 needs ~20k steps); 2 levels x 8 (+ de-dup).
STAGE1 = ["tokenize.method=unger", "tokenize.levels=2", "tokenize.codebook_size=8", "tokenize.num_workers=1",
          "tokenize.unger.dim=32", "tokenize.unger.steps=300", "tokenize.unger.batch_size=64", "tokenize.unger.lr=0.01",
          "tokenize.unger.num_negatives=20", "tokenize.unger.log_every=100"]
TINY_UNGER = {"d_model": 32, "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_width": 20}


def _cfg(root, dataset, sids, *overrides):
    return load_config(CONFIG, [f"workdir={root}", f"paths.dataset={dataset}", f"paths.semantic_ids={sids}",
                                *STAGE1, *overrides])


@pytest.fixture(scope="module")
def unified(tiny_dataset, tmp_path_factory, ray_local):
    from tokenization.pipeline import run_tokenize

    root = tmp_path_factory.mktemp("unger")
    cfg = _cfg(root, tiny_dataset, f"{root}/sids")
    logs: list[str] = []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_tokenize(cfg, log=logs.append, tracking=make_tracker)
    return cfg, summary, logs


def test_stage1_writes_unified_codes_integrated_embeddings_and_modality_shares(unified, tiny_dataset):
    cfg, summary, logs = unified
    ds = Dataset.open(tiny_dataset)
    sids = read_semantic_ids(cfg.semantic_ids_dir)
    assert sids.codebook_sizes[:2] == [8, 8] and sids.has_dedup_level
    assert len(np.unique(sids.codes[1:], axis=0)) == ds.num_items  # unique after de-dup
    assert sids.manifest["item_embeddings"] == "integrated_embeddings.npy"
    assert sids.manifest["unger_source"] == "unified"
    emb = sids.item_embeddings
    assert emb.shape == (ds.num_items + 1, 32) and np.all(emb[0] == 0) and np.isfinite(emb).all()
    st = summary["stats"]
    # CKA learned the alignment: far below the chance level log(#items in a batch) of an untrained pair of spaces.
    assert st["unger.stage1.cka"] < 0.5 * np.log(40)
    assert any("unger stage I step 300/300" in m for m in logs)
    # The shares (Table 6) are those of the embeddings the run saved, against the references it saved: recomputed
    # here from the files, for the unified embedding and for the concatenation of the same two references.
    _, text = read_embeddings(f"{cfg.semantic_ids_dir}/embeddings")  # Stage I's text embeddings, item-id order
    din = np.load(os.path.join(cfg.semantic_ids_dir, REFERENCE_FILE))[1:]  # the DIN-only model's item embeddings
    uc = cfg.tokenize.unger
    for fusion, final in (("modality_share", emb[1:]), ("modality_share_concat", concat_embeddings(text, din))):
        want = modality_share(final, text, din, uc.share_sample, cfg.seed)
        assert st[f"unger.{fusion}.share_semantic"] == pytest.approx(want["share_semantic"], rel=1e-5), fusion
        assert st[f"unger.{fusion}.kl_collab"] == pytest.approx(want["kl_collab"], rel=1e-5), fusion
    # The DIN-only reference scored against itself is all collaborative: the saved file is the reference used.
    assert modality_share(din, text, din, uc.share_sample, cfg.seed)["share_collab"] > 0.99
    assert st["unger.modality_share.share_semantic"] != pytest.approx(st["unger.modality_share_concat.share_semantic"])
    # the MLflow run of the tokenize job carries the Stage I numbers
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cfg.workdir}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["unger.modality_share.share_semantic"] == pytest.approx(
        st["unger.modality_share.share_semantic"])
    assert "unger.stage1.next_item" in run.data.metrics


def _train_and_eval(sids, ds, steps=600, ikd=1.0, seed=0):
    cfg = ModelConfig()
    for k, v in {**TINY_UNGER, "ikd_weight": ikd}.items():
        setattr(cfg.unger, k, v)
    torch.manual_seed(seed)
    model = build_model("unger", cfg, ds.num_items, sids)
    seqs = ds.sequences()
    h = cfg.unger.max_history  # the model's own history (20), not the longest the dataset keeps
    tr, te = train_examples(seqs, h), eval_examples(seqs, h, "test")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    first = last = None
    for step in range(steps):
        idx = rng.integers(0, len(tr), 64)
        out = model(torch.from_numpy(tr.history[idx]), torch.from_numpy(tr.target[idx]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or {k: float(v.detach()) for k, v in out.items()}
        last = {k: float(v.detach()) for k, v in out.items()}
    model.eval()
    batches = [(torch.from_numpy(te.history), torch.from_numpy(te.target))]
    got = evaluate_model(model, batches, [10, 20], torch.device("cpu"), beam_width=20)
    pop = MostPopular.fit((s[:-2] for s in seqs["items"].to_list() if len(s) >= 3), ds.num_items)
    return got, evaluate_model(pop, batches, [10, 20], torch.device("cpu")), first, last


def test_stage2_single_process_learns_ikd_and_beats_most_popular(unified, tiny_dataset):
    cfg, _, _ = unified
    torch.set_num_threads(1)
    got, pop, first, last = _train_and_eval(read_semantic_ids(cfg.semantic_ids_dir), Dataset.open(tiny_dataset))
    assert last["ikd"] < 0.5 * first["ikd"] and last["rec"] < first["rec"]
    assert got["recall@10"] > pop["recall@10"] and got["ndcg@10"] > pop["ndcg@10"], (got, pop)


def test_ablation_sources(unified, tiny_dataset, tmp_path):
    """Table 7 sources: semantic-only codes are the text embeddings themselves; concat is 2 x dim wide."""
    from tokenization.pipeline import run_tokenize

    cfg0, _, _ = unified
    ds = Dataset.open(tiny_dataset)
    emb_dir = f"{cfg0.semantic_ids_dir}/embeddings"
    _, text = read_embeddings(emb_dir)  # the text embeddings Stage I read
    sem = run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/sem", "tokenize.unger.source=semantic",
                            f"tokenize.embeddings_path={emb_dir}", "tracking.enabled=false"), log=lambda m: None,
                       tracking=make_tracker)
    s = read_semantic_ids(sem["path"])
    assert s.manifest["unger_source"] == "semantic" and np.allclose(s.item_embeddings[1:], text)
    cat = run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/cat", "tokenize.unger.source=concat",
                            "tokenize.unger.steps=30", f"tokenize.embeddings_path={emb_dir}",
                            "tracking.enabled=false"), log=lambda m: None, tracking=make_tracker)
    c = read_semantic_ids(cat["path"])
    assert c.item_embeddings.shape == (ds.num_items + 1, 64)
    assert np.allclose(np.linalg.norm(c.item_embeddings[1:, :32], axis=1), 1, atol=1e-4)
    assert 0 < cat["stats"]["unger.modality_share.share_semantic"] < 1


def test_collab_and_concat_reuse_the_unified_runs_din_reference(unified, tiny_dataset, tmp_path):
    """The DIN-only model unified trains for the modality share is the collab source: saved once, reused by the other
    sources through tokenize.unger.reference_path, and refused when trained with other settings."""
    from tokenization.pipeline import run_tokenize
    from tokenization.unger import REFERENCE_FILE

    cfg0, summary, _ = unified
    ref = summary["manifest"]["din_reference"]
    assert ref["file"] == REFERENCE_FILE and ref["settings"]["steps"] == 300 and ref["settings"]["dim"] == 32
    saved = np.load(f"{cfg0.semantic_ids_dir}/{REFERENCE_FILE}")
    emb_dir = f"{cfg0.semantic_ids_dir}/embeddings"
    common = (f"tokenize.embeddings_path={emb_dir}", f"tokenize.unger.reference_path={cfg0.semantic_ids_dir}",
              "tracking.enabled=false")
    logs: list[str] = []
    col = run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/col", "tokenize.unger.source=collab", *common),
                       log=logs.append, tracking=make_tracker)
    assert not any("stage I step" in m for m in logs), "the reference was trained again"
    c = read_semantic_ids(col["path"])
    assert np.array_equal(c.item_embeddings[1:], saved[1:]) and "din_reference" not in c.manifest
    with pytest.raises(ValueError, match=r"reference_path=.*steps: 300 there, 30 here"):
        run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/bad", "tokenize.unger.source=concat",
                          "tokenize.unger.steps=30", *common), log=lambda m: None, tracking=make_tracker)
    assert not os.path.exists(f"{tmp_path}/bad/manifest.json")
    with pytest.raises(ValueError, match="saved no DIN-only model"):
        run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/bad2", "tokenize.unger.source=collab",
                          f"tokenize.embeddings_path={emb_dir}", f"tokenize.unger.reference_path={col['path']}",
                          "tracking.enabled=false"), log=lambda m: None, tracking=make_tracker)


def test_unified_reads_its_stage1_model_back_for_another_integrated_reading(unified, tiny_dataset, tmp_path):
    """Every unified run saves its CKA-trained model's two item tables; tokenize.unger.stage1_path quantises another
    reading of the integrated embedding from them without training, and is refused for other settings."""
    from tokenization.pipeline import run_tokenize
    from tokenization.unger import STAGE1_FILES
    from tokenization.unger_stage1 import integrate

    cfg0, summary, _ = unified
    saved = {k: np.load(f"{cfg0.semantic_ids_dir}/{f}") for k, f in STAGE1_FILES.items()}
    assert summary["manifest"]["stage1_model"]["settings"]["cka_weight"] == 1.0
    first = read_semantic_ids(cfg0.semantic_ids_dir)
    mean = integrate(torch.from_numpy(saved["collab"]), torch.from_numpy(saved["adapted"]), "mean").numpy()
    assert first.manifest["unger_integrated"] == "mean"  # the default reading
    assert np.allclose(first.item_embeddings[1:], mean[1:])
    common = (f"tokenize.embeddings_path={cfg0.semantic_ids_dir}/embeddings", "tracking.enabled=false",
              f"tokenize.unger.stage1_path={cfg0.semantic_ids_dir}",
              f"tokenize.unger.reference_path={cfg0.semantic_ids_dir}")
    logs: list[str] = []
    out = run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/collab", "tokenize.unger.integrated=collab", *common),
                       log=logs.append, tracking=make_tracker)
    assert not any("stage I step" in m for m in logs), "Stage I was trained again"
    collab = read_semantic_ids(out["path"])
    assert collab.manifest["unger_integrated"] == "collab"
    assert np.array_equal(collab.item_embeddings[1:], saved["collab"][1:])
    assert not np.allclose(collab.item_embeddings[1:], first.item_embeddings[1:])
    assert 0 < out["stats"]["unger.modality_share.share_semantic"] < 1  # the DIN-only reference came along
    with pytest.raises(ValueError, match=r"stage1_path=.*cka_weight: 1.0 there, 0.5 here"):
        run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/bad", "tokenize.unger.cka_weight=0.5", *common),
                     log=lambda m: None, tracking=make_tracker)
    with pytest.raises(ValueError, match="only source=unified reads"):
        run_tokenize(_cfg(tmp_path, tiny_dataset, f"{tmp_path}/bad2", "tokenize.unger.source=collab", *common),
                     log=lambda m: None, tracking=make_tracker)
    assert not os.path.exists(f"{tmp_path}/bad/manifest.json") and not os.path.exists(f"{tmp_path}/bad2/manifest.json")


def test_stage2_on_two_deepspeed_ranks(unified, tiny_dataset, tmp_path):
    """jobs/train.py model=unger under the deepspeed launcher: 2 CPU ranks (gloo), ZeRO-2, the trainer's own
    validation, export and test evaluation. A short run (CPU budget): it must learn far above chance and log a
    falling IKD part; beating most-popular is asserted by the longer single-process run above."""
    cfg, _, _ = unified
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "jobs/train.py", "--config", CONFIG,
            f"workdir={tmp_path}", f"paths.dataset={tiny_dataset}", f"paths.semantic_ids={cfg.semantic_ids_dir}",
            "train.model=unger", *[f"model.unger.{k}={v}" for k, v in TINY_UNGER.items()], "zero_stage=2",
            "batch_size=64", "max_steps=120", "lr=0.005", "warmup_steps=10", "eval_every=60", "checkpoint_every=0",
            "log_every=20", "patience=0", "data_split=global", "run_name=unger-ds2", "evaluate.beam_width=20"]
    log = tmp_path / "ds.log"
    with open(log, "w") as fh:
        try:  # the launcher and both ranks go with it on a timeout
            rc = run_group([deepspeed, *args], 840, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            raise AssertionError(f"2-rank UNGER run timed out:\n{log.read_text()[-4000:]}") from None
    out = log.read_text()
    assert rc == 0, out[-6000:]
    assert "world 2" in out
    run_dir = tmp_path / "runs" / "unger-ds2"
    got = json.loads((run_dir / "metrics.json").read_text())["model"]
    ds = Dataset.open(tiny_dataset)
    assert got["recall@10"] > 2 * 10 / ds.num_items and got["ndcg@10"] > 0  # well above a random ranking
    hist = json.loads((run_dir / "history.json").read_text())
    ikd = [h["train/ikd"] for h in hist if "train/ikd" in h]
    assert len(ikd) >= 2 and ikd[-1] < ikd[0]  # the IKD loss part is logged and falls
    from genrec_dist.runs.export import load_exported

    model, meta = load_exported(str(run_dir))  # rebuilt from its saved config + the codes' integrated embeddings
    assert meta["model"] == "unger" and model.use_ikd and model.item_emb.shape == (ds.num_items + 1, 32)
