"""The typed config: strict loading, overrides, every shipped YAML loads."""

from __future__ import annotations

import glob
import os

import pytest

from _util import REPO
from genrec_dist.config import Config, ConfigError, flatten, load_config, to_dict


def test_defaults_and_derived_paths():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.dataset_dir == "outputs/synthetic/dataset"
    assert cfg.semantic_ids_dir == "outputs/synthetic/sids/rkmeans"
    cfg = load_config(None, ["paths.dataset=s3://bucket/ds"])
    assert cfg.dataset_dir == "s3://bucket/ds"


def test_overrides_are_typed_and_bare_keys_go_to_the_job_section():
    cfg = load_config(None, ["prepare.k_core=3", "zero_stage=2", "seed=7", "tracking.enabled=false"],
                      default_section="train")
    assert cfg.prepare.k_core == 3
    assert cfg.train.zero_stage == 2
    assert cfg.seed == 7 and cfg.tracking.enabled is False
    cfg = load_config(None, ["model=sasrec"], default_section="train")  # the job's field before a section
    assert cfg.train.model == "sasrec"
    cfg = load_config(None, ["train.lr=1"])  # an int widens to a float field
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, words", [
    ("prepare.kcore=3", "prepare.kcore"),
    ("prepare.k_core=three", "prepare.k_core"),
    ("prepare.source=netflix", "prepare.source"),
    ("tracking.enabled=maybe", "tracking.enabled"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prepare:\n  k_core: 5\n  shards: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in str(err.value) and "prepare.shards" in str(err.value)
    f.write_text("prepare:\n  k_core: '5'\n")
    with pytest.raises(ConfigError, match="prepare.k_core"):
        load_config(f)
    f.write_text("prepare: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_base_file_is_merged_and_overridden(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\nprepare:\n  k_core: 3\n  num_shards: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nprepare:\n  num_shards: 5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.prepare.k_core, cfg.prepare.num_shards) == ("b", 3, 5)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    params = flatten(to_dict(cfg))
    assert params["name"] == cfg.name and "prepare.source" in params


def test_beauty_configs_read_the_codes_their_tokenize_command_writes():
    """Until Beauty's item text is in ../shared/data its codes are the shared index, imported: the header commands
    (tokenize, then train, same config) must meet in one directory without a paths override."""
    for name in ("beauty.yaml", "beauty/car.yaml"):
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert cfg.tokenize.method == "import" and cfg.semantic_ids_dir.endswith("sids/import")
        index = os.path.join(REPO, cfg.tokenize.index_path)  # relative to the repository root, as input_dir
        assert os.path.normpath(index).startswith(os.path.normpath(os.path.join(REPO, "..", "shared", "data")))
        assert os.path.normpath(os.path.join(REPO, cfg.prepare.input_dir)) == os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.normpath(index))))


def test_a_jobs_deciding_setting_is_also_a_flag():
    """The documented commands: ``jobs/train.py --config ... --model car``, ``jobs/tokenize.py ... --method unger``."""
    from genrec_dist.cli import job_parser, load_job_config

    config = os.path.join(REPO, "configs", "synthetic.yaml")
    args = job_parser("train", "t").parse_intermixed_args(["--config", config, "--model", "car", "lr=0.01"])
    cfg = load_job_config(args, "train", quiet=True)
    assert (cfg.train.model, cfg.train.lr) == ("car", 0.01) and args.overrides == ["lr=0.01", "train.model=car"]
    args = job_parser("tokenize", "t").parse_intermixed_args(["model=sasrec", "--method", "unger"])
    assert load_job_config(args, "tokenize", quiet=True).tokenize.method == "unger"
    args = job_parser("train", "t").parse_intermixed_args(["--model", "gpt5"])
    with pytest.raises(ConfigError, match="train.model"):
        load_job_config(args, "train", quiet=True)
    with pytest.raises(SystemExit):
        job_parser("prepare", "t").parse_intermixed_args(["--model", "car"])  # prepare has no such setting
