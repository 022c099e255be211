"""``TrainConfig`` -> the DeepSpeed config dict: the one place ZeRO words appear.

- ZeRO stage 0-3 (``zero_optimization.stage``); bf16 on GPU, fp32 on CPU (gloo has no bf16 all-reduce path we want
  to rely on, and CPU bf16 matmuls are slow).
- Global batch = micro batch x grad accumulation x world size (``train_batch_size``); the micro batch is derived
  from the global one (:func:`micro_batch`), so the same config optimises the same way at any world size.
- Adam (L2 weight decay, ``adam_w_mode`` off) or AdamW. On GPU DeepSpeed builds its FusedAdam from this dict; with
  no CPU offload we keep it instead of forcing DeepSpeedCPUAdam (``zero_force_ds_cpu_optimizer: false``). On CPU the
  same Adam comes from ``torch.optim`` (:func:`client_optimizer`, a ZeRO-supported optimizer) in its fused CPU form:
  the step's default loop makes three parameter-sized temporaries (the L2 term, sqrt, the denominator), 830 MB per
  step for a 1.1M-item table at d 64, which the fused kernel does not (docs/scale.md). DeepSpeed's CPU FusedAdam is
  a C++ extension compiled at every cold start (about a minute on 2 cores), for no gain over torch's.
- Linear warm-up from ``warmup_min_lr`` to ``lr`` over ``warmup_steps`` (UNGER Table 4: 2000 steps from 1e-7 to
  1e-3), then constant (``WarmupLR``) or a linear decay to 0 at the last step (``WarmupDecayLR``).
"""

from __future__ import annotations

from typing import Any

from genrec_dist.errors import ConfigError, GenrecError
from genrec_dist.train_config import TrainConfig


class BatchSizeError(GenrecError, ValueError):
    """A global batch that does not split into whole micro batches over the world."""


def micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """Per-rank micro batch: ``batch_size / (grad_accum * world_size)``, which must be a whole number."""
    denom = cfg.grad_accum * world_size
    if cfg.grad_accum < 1 or cfg.batch_size < denom or cfg.batch_size % denom:
        raise BatchSizeError(
            f"train.batch_size={cfg.batch_size} (global) must be a multiple of train.grad_accum={cfg.grad_accum} "
            f"x world size {world_size} = {denom}"
        )
    return cfg.batch_size // denom


def client_optimizer(cfg: TrainConfig, params, use_cuda: bool):
    """The optimizer to hand ``deepspeed.initialize`` on CPU (None on GPU: DeepSpeed builds it from the config)."""
    if use_cuda:
        return None
    import torch

    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=1e-8, weight_decay=cfg.weight_decay, fused=True)


def deepspeed_config(cfg: TrainConfig, world_size: int, use_cuda: bool, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` at ``world_size`` ranks; ``total_steps`` sizes the decay schedule."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    warmup = {
        "warmup_min_lr": cfg.warmup_min_lr,
        "warmup_max_lr": cfg.lr,
        "warmup_num_steps": max(1, cfg.warmup_steps),
        "warmup_type": "linear",
    }
    if cfg.lr_schedule == "warmup":
        scheduler = {"type": "WarmupLR", "params": warmup}
    else:
        scheduler = {"type": "WarmupDecayLR",
                     "params": {**warmup, "total_num_steps": max(total_steps, cfg.warmup_steps + 1)}}
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Partition every parameter however small: by default DeepSpeed keeps tensors under 1e5 elements whole
        # on every rank, which on toy models would leave ZeRO-3 with nothing to partition.
        zero["stage3_param_persistence_threshold"] = 0
    out = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg, world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW" if cfg.optimizer == "adamw" else "Adam",
            "params": {"lr": cfg.lr, "betas": [0.9, cfg.adam_beta2], "eps": 1e-8, "weight_decay": cfg.weight_decay,
                       "adam_w_mode": cfg.optimizer == "adamw"},
        },
        "zero_force_ds_cpu_optimizer": False,
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_cuda)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,          # we log ourselves (rank 0, MLflow)
        "wall_clock_breakdown": False,
    }
    if not use_cuda:
        del out["optimizer"]  # client_optimizer() supplies the same Adam from torch.optim
    return out
