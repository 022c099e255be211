"""The training engine: data path, DeepSpeed config, per-worker training function, launchers.

The only package that imports ``deepspeed`` (and, in ``ray_launcher``, Ray Train)."""

from __future__ import annotations

from typing import Any, Callable


def run_training(cfg: Any, *, tracking: Callable) -> dict[str, Any] | None:
    """Train with the launcher the config names; the summary on rank 0 (or the Ray driver), None elsewhere.
    ``tracking(cfg, job, rank, **tags)`` is the job's tracker factory (``genrec_dist.tracking.make_tracker``); each
    rank calls it once the run is known (it must be picklable for Ray Train workers)."""
    if cfg.train.launcher == "ray":
        from genrec_dist.training.ray_launcher import run_ray

        return run_ray(cfg, tracking)
    import torch.distributed as tdist

    from genrec_dist.training.trainer import train_worker

    summary = train_worker(cfg, tracking)
    if tdist.is_initialized():  # ours (Ray Train ends its own): gloo's threads are not left to the interpreter's exit
        tdist.destroy_process_group()
    return summary
