"""Every model reads its own history length: the dataset keeps what the models need (prepare.max_history), and a
model asking for more than that is a config error naming both settings, not a silently shorter history."""

from __future__ import annotations

import pytest

from _util import run_job
from genrec_dist.config import ConfigError, load_config, model_history
from genrec_dist.data.dataset import Dataset
from genrec_dist.data.examples import eval_examples


def test_default_dataset_keeps_sasrec_paper_history():
    cfg = load_config(None)
    assert cfg.prepare.max_history == 50 == cfg.model.sasrec.max_history
    assert cfg.model.car.max_history == cfg.model.tiger.max_history == cfg.model.unger.max_history == 20


def test_each_model_gets_its_own_history(tiny_cfg, tiny_dataset):
    ds = Dataset.open(tiny_dataset)
    assert ds.max_history == 50  # the synthetic config keeps prepare's default
    seqs = ds.sequences()
    longest = int(seqs["items"].list.len().max())
    assert longest > 22, "the tiny dataset needs a user with more than 20 training items for this test"
    for model, want in (("sasrec", 50), ("car", 20), ("tiger", 20), ("unger", 20)):
        h = model_history(model, getattr(tiny_cfg.model, model).max_history, ds)
        assert h == want
        ex = eval_examples(seqs, h, "test")
        assert ex.history.shape[1] == want
    # stored sequences are whole: the longest user's test history holds min(len - 1, 50) real items
    ex = eval_examples(seqs, 50, "test")
    assert int((ex.history != 0).sum(1).max()) == min(longest - 1, 50)


def test_model_asking_for_more_than_the_dataset_keeps(tiny_cfg, tiny_dataset):
    ds = Dataset.open(tiny_dataset)
    cfg = load_config(None, ["model.sasrec.max_history=64"])
    with pytest.raises(ConfigError) as err:
        model_history("sasrec", cfg.model.sasrec.max_history, ds)
    msg = str(err.value)
    assert "model.sasrec.max_history=64" in msg and "prepare.max_history=50" in msg and tiny_dataset in msg


def test_train_job_refuses_a_short_dataset(tmp_path):
    """The real job: a dataset prepared with 20-item histories and SASRec at its default 50 exits with a config
    error (code 2) naming both values, before any step is trained."""
    cfg = ["--config", "configs/synthetic.yaml", f"workdir={tmp_path}", "prepare.synthetic.num_items=60",
           "prepare.synthetic.num_users=80", "prepare.num_shards=1", "tracking.enabled=false"]
    run_job("prepare", *cfg, "prepare.max_history=20")
    proc = run_job("train", *cfg, "train.model=sasrec", "train.max_steps=2", check=False, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.sasrec.max_history=50" in last and "prepare.max_history=20" in last
    assert f"{tmp_path}/dataset" in last
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/model"))
