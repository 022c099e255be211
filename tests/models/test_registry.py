"""The model registry (genrec_dist/models/__init__.py) covers every registered model: each builds from its own
config section, trains one step and recommends distinct items; the config's ``model:`` section, the choices of
``train.model``, and the inference-time fields all come from it."""

import dataclasses
import typing

import numpy as np
import pytest
import torch

from genrec_dist.config import Config, ConfigError, load_config
from genrec_dist.models import MODELS, ModelConfig, build_model, inference_fields, trains_every_position
from genrec_dist.train_config import TrainConfig

from toys import make_sids, successor_batch

N = 20
# A tiny size per registered model: a model added to the registry without one here fails test_every_model_is_sized.
SMALL = {
    "sasrec": dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_history=6),
    "tiger": dict(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1, max_history=6,
                  beam_width=8),
    "car": dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_history=6),
    "unger": dict(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1, max_history=6,
                  beam_width=8),
}


def _sids():
    codes = np.array([[i % 3, (i // 3) % 4, i // 12] for i in range(N)])  # unique over 3 levels
    sids = make_sids(codes, [3, 4, 2])
    # UNGER's IKD reads the integrated item embeddings its tokenizer saves next to the codes (row 0: padding)
    sids.item_embeddings = np.random.default_rng(0).normal(size=(N + 1, 8)).astype(np.float32)
    return sids


def _another(config: type, name: str, value: typing.Any) -> typing.Any:
    """A value of field ``name`` of ``config`` other than ``value``."""
    choices = typing.get_args(typing.get_type_hints(config)[name])
    if choices:  # a Literal
        return next(c for c in choices if c != value)
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else [0.5]
    return value + 1 if isinstance(value, int) else value / 2


def test_every_model_is_sized():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_trains_and_recommends(name, gen):
    spec = MODELS[name]
    section = spec.config(**SMALL[name])
    cfg = ModelConfig(**{name: section})
    sids = _sids() if spec.needs_semantic_ids else None
    torch.manual_seed(0)
    model = build_model(name, cfg, N, sids)
    history, target = successor_batch(N, 8, 6, gen)
    loss = model(history, target)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    top = model.eval().recommend(history, 5)
    assert top.shape == (8, 5)
    for row in top.tolist():
        real = [i for i in row if i != 0]
        assert len(set(real)) == len(real) and all(1 <= i <= N for i in real)
    for f in spec.inference_fields:  # they change how a trained model ranks, never which weights it has
        changed = dataclasses.replace(section, **{f: _another(spec.config, f, getattr(section, f))})
        torch.manual_seed(0)
        other = build_model(name, ModelConfig(**{name: changed}), N, sids).state_dict()
        assert other.keys() == model.state_dict().keys(), f
        assert all(torch.equal(other[k], v) for k, v in model.state_dict().items()), f
    if spec.needs_semantic_ids:
        with pytest.raises(ConfigError, match=f"model '{name}' needs"):
            build_model(name, cfg, N, None)


def test_config_sections_and_choices_come_from_the_registry():
    assert [f.name for f in dataclasses.fields(ModelConfig)] == list(MODELS)
    assert typing.get_args(typing.get_type_hints(TrainConfig)["model"]) == tuple(MODELS)
    assert isinstance(Config().model.car, MODELS["car"].config)
    with pytest.raises(ConfigError, match=r"'train.model' must be one of \['tiger', 'sasrec', 'car', 'unger'\]"):
        load_config(None, ["train.model=nope"])


def test_inference_fields_and_every_position_rule():
    assert inference_fields("sasrec") == ()
    assert inference_fields("tiger") == ("beam_width",) and inference_fields("unger") == ("beam_width",)
    assert set(inference_fields("car")) == {"inference", "slow_weight", "slow_weight_grid", "beam_width"}
    cfg = ModelConfig()
    assert trains_every_position("car", cfg) and trains_every_position("sasrec", cfg)
    assert not trains_every_position("tiger", cfg) and not trains_every_position("unger", cfg)
    cfg.car.all_positions = cfg.sasrec.all_positions = False
    assert not trains_every_position("car", cfg) and not trains_every_position("sasrec", cfg)
