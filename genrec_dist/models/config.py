"""The ``model:`` section: hyper-parameters of each registered model (picked by ``train.model``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shared transformer sizes; model-specific sub-sections are added by each model."""

    d_model: int = 128
    n_heads: int = 4
    dropout: float = 0.1
