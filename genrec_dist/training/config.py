"""The ``train:`` and ``evaluate:`` sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    model: Literal["tiger", "sasrec", "car", "unger"] = "tiger"
    launcher: Literal["local", "deepspeed", "ray"] = "local"
    zero_stage: int = 0
    # Papers: lr 1e-3, batch 256, 2000 warmup steps (TIGER §4; UNGER Table 4).
    lr: float = 1e-3
    batch_size: int = 256
    warmup_steps: int = 2000
    max_steps: int = 1000


@dataclass
class EvaluateConfig:
    ks: list[int] = None  # type: ignore[assignment]
    beam_width: int = 20

    def __post_init__(self) -> None:
        if self.ks is None:
            self.ks = [5, 10, 20]
