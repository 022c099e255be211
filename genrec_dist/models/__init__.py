"""Models by short name (``train.model: tiger``): the registry, the one place that describes each model.

Every model is a plain ``nn.Module`` with ``forward(history, target) -> {"loss", ...}`` and
``recommend(history, k) -> (B, k)`` distinct item ids (the model contract, docs/models.md). :data:`MODELS` records
per model its config section, the class that builds it (imported only when a model is built, so reading a config
does not load torch), whether it reads semantic IDs and whether its loss reads every history position. Which
fields may change at inference is the ``INFERENCE`` metadata of its config class. The ``model:`` config section
(:class:`ModelConfig`) and the choices of ``train.model`` are made from this table, so a new model is its own
module, its config class, and one line here.
"""

from __future__ import annotations

import dataclasses
import inspect
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from genrec_dist.errors import ConfigError
from genrec_dist.models.config import CARConfig, SASRecConfig, TigerConfig, UngerConfig

if TYPE_CHECKING:  # torch loads only when a model is built: reading a config must stay cheap
    from torch import nn

SEMANTIC_IDS = "semantic IDs (run the tokenize job; train reads cfg.semantic_ids_dir)"
UNIFIED_CODES = "unified codes (run the tokenize job with tokenize.method=unger)"


@dataclass(frozen=True)
class ModelSpec:
    """What the engine knows about one model."""

    config: type  # its section, ``model.<name>``
    # "module:Class" built as Class(section, sids) when it reads codes, else Class(section, num_items); a callable
    # picks the class from the section (an ablation with its own class).
    cls: str | Callable[[Any], str]
    codes: str = ""  # the codes it reads, as an error names them when missing; "" = item ids only
    # Whether its loss reads every history position, given its section (position t predicts item t+1, so one window
    # of H items trains H transitions: ``train.examples: auto`` then uses windows, not every prefix).
    every_position: Callable[[Any], bool] = field(default=lambda section: False)

    @property
    def needs_semantic_ids(self) -> bool:
        return bool(self.codes)

    @property
    def inference_fields(self) -> tuple[str, ...]:
        """Fields of its section that change how a trained model ranks, not its weights (``INFERENCE`` metadata)."""
        return tuple(f.name for f in dataclasses.fields(self.config) if f.metadata.get("inference"))


MODELS: dict[str, ModelSpec] = {
    "tiger": ModelSpec(TigerConfig, "genrec_dist.models.tiger:Tiger", codes=SEMANTIC_IDS),
    "sasrec": ModelSpec(SASRecConfig, "genrec_dist.models.sasrec:SASRec",
                        every_position=lambda section: section.all_positions),
    "car": ModelSpec(CARConfig, lambda section: {"car": "genrec_dist.models.car:CAR",
                                                 "ar": "genrec_dist.models.car_ar:CARAR"}[section.mode],
                     codes=SEMANTIC_IDS,
                     every_position=lambda section: section.all_positions),
    "unger": ModelSpec(UngerConfig, "genrec_dist.models.unger:Unger", codes=UNIFIED_CODES),
}

ModelName = Literal[tuple(MODELS)]  # the choices of ``train.model``

ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(name, spec.config, field(default_factory=spec.config)) for name, spec in MODELS.items()],
    namespace={"__doc__": "The ``model:`` section: one sub-section per registered model (``model.car.alpha``)."},
)
ModelConfig.__module__ = __name__


def available_models() -> list[str]:
    return sorted(MODELS)


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
    return MODELS[name]


def model_class(name: str, section: Any) -> type:
    """The ``nn.Module`` class model ``name`` is built as, for its config section ``section``."""
    s = spec(name)
    path = s.cls(section) if callable(s.cls) else s.cls
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, cfg: Any, num_items: int, sids: Any = None) -> nn.Module:
    """Build model ``name`` from its ``cfg.<name>`` section (``cfg``: a :class:`ModelConfig`) for a catalog of
    ``num_items`` (ids 1..num_items).

    ``sids`` (:class:`genrec_dist.data.semantic_ids.SemanticIds`) is required by semantic-ID models and must cover
    exactly the same items.
    """
    s = spec(name)
    section = getattr(cfg, name)
    cls = model_class(name, section)
    if not s.needs_semantic_ids:
        return cls(section, num_items)
    if sids is None:
        raise ConfigError(f"model '{name}' needs {s.codes}")
    if int(sids.codes.shape[0]) != num_items + 1:
        raise ConfigError(f"semantic IDs cover {int(sids.codes.shape[0]) - 1} items, the dataset has {num_items}; "
                          f"tokenize the same dataset again")
    return cls(section, sids)


def needs_semantic_ids(name: str) -> bool:
    return spec(name).needs_semantic_ids


def trains_every_position(name: str, cfg: Any) -> bool:
    """Whether model ``name``'s loss (given ``cfg``, a :class:`ModelConfig`) reads every history position."""
    return spec(name).every_position(getattr(cfg, name))


def inference_fields(name: str) -> tuple[str, ...]:
    return spec(name).inference_fields


def recommend_kwargs(model: nn.Module, beam_width: int = 0, score_block: int | None = None) -> dict[str, Any]:
    """The one beam-width rule, read by every job that ranks (validation, evaluate, recommend): a job's
    ``beam_width`` > 0 replaces the width of a model whose ``recommend`` takes one (beam search: TIGER, UNGER,
    CAR-AR); 0 leaves the model its own configured ``model.<name>.beam_width`` (what serving uses too). ``block``
    for models that rank the catalog block-wise when ``score_block`` is set (0: one block)."""
    params = inspect.signature(model.recommend).parameters
    out: dict[str, Any] = {"beam_width": beam_width} if beam_width > 0 and "beam_width" in params else {}
    if "block" in params and score_block is not None:
        out["block"] = score_block if score_block > 0 else max(1, getattr(model, "num_items", 1))
    return out


def model_name(model: nn.Module) -> str:
    """The registry name of a built model (its ``model.<name>`` section), from the type of its config: CAR's AR
    ablation is ``car`` too."""
    found = [name for name, s in MODELS.items() if isinstance(getattr(model, "cfg", None), s.config)]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no registered model config (models: {available_models()})")
    return found[0]


__all__ = ["MODELS", "ModelConfig", "ModelName", "ModelSpec", "available_models", "build_model", "inference_fields",
           "model_class", "model_name", "needs_semantic_ids", "recommend_kwargs", "trains_every_position"]
