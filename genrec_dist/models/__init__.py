"""Models by short name (``train.model: tiger``): :func:`build_model` is the only constructor the engine calls.

Every model is a plain ``nn.Module`` with ``forward(history, target) -> {"loss", ...}`` and
``recommend(history, k) -> (B, k)`` distinct item ids (the model contract, docs/models.md). Builders import their
module lazily so that reading the config (which imports :mod:`genrec_dist.models.config`) does not load every model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch loads only when a model is built: reading a config must stay cheap
    from torch import nn

from genrec_dist.models.config import ModelConfig

Builder = Callable[[ModelConfig, int, Any], "nn.Module"]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register("car") def _build(cfg, num_items, sids): ...``."""

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, cfg: ModelConfig, num_items: int, sids: Any = None) -> nn.Module:
    """Build model ``name`` from its ``cfg.<name>`` section for a catalog of ``num_items`` (ids 1..num_items).

    ``sids`` (:class:`genrec_dist.data.semantic_ids.SemanticIds`) is required by semantic-ID models and must cover
    exactly the same items.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
    if sids is not None and int(sids.codes.shape[0]) != num_items + 1:
        raise ValueError(f"semantic IDs cover {int(sids.codes.shape[0]) - 1} items, the dataset has {num_items}; "
                         f"tokenize the same dataset again")
    return _REGISTRY[name](cfg, num_items, sids)


def trains_every_position(name: str, cfg: ModelConfig) -> bool:
    """Whether model ``name``'s loss reads every history position (position t predicts item t+1), so one window of
    H items trains H transitions (``train.examples: auto`` then uses windows, not every prefix)."""
    return name == "car" and cfg.car.all_positions


def _require_sids(name: str, sids: Any, what: str) -> None:
    if sids is None:
        raise ValueError(f"model '{name}' needs {what}")


@register("sasrec")
def _build_sasrec(cfg: ModelConfig, num_items: int, sids: Any) -> nn.Module:
    from genrec_dist.models.sasrec import SASRec

    return SASRec(cfg.sasrec, num_items)


@register("tiger")
def _build_tiger(cfg: ModelConfig, num_items: int, sids: Any) -> nn.Module:
    from genrec_dist.models.tiger import Tiger

    _require_sids("tiger", sids, "semantic IDs (run the tokenize job; train reads cfg.semantic_ids_dir)")
    return Tiger(cfg.tiger, sids)


@register("car")
def _build_car(cfg: ModelConfig, num_items: int, sids: Any) -> nn.Module:
    from genrec_dist.models.car import CAR

    _require_sids("car", sids, "semantic IDs (run the tokenize job; train reads cfg.semantic_ids_dir)")
    return CAR(cfg.car, sids)


@register("unger")
def _build_unger(cfg: ModelConfig, num_items: int, sids: Any) -> nn.Module:
    from genrec_dist.models.unger import Unger

    _require_sids("unger", sids, "unified codes (run the tokenize job with tokenize.method=unger)")
    return Unger(cfg.unger, sids)


__all__ = ["build_model", "register", "available_models"]
