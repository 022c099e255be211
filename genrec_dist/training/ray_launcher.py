"""``train.launcher=ray``: run :func:`train_worker` in Ray Train ``TorchTrainer`` workers.

Ray Train starts ``train.num_workers`` workers (one GPU each when the cluster has GPUs), sets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in each and initialises the torch process group (gloo on CPU,
NCCL on GPU); DeepSpeed then initialises inside each worker from that group. The driver resolves the run first
(:class:`~genrec_dist.runs.rundir.RunDir`: named, read and checked once; the workers start from it) so it can read
the run's ``metrics.json`` when the workers are done. Under ``ray job submit`` the driver connects to
the cluster it was submitted to (``RAY_ADDRESS``); otherwise ``train.ray_address`` or a new local Ray.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

from genrec_dist import storage
from genrec_dist.runs.rundir import RunDir, read_run


def _pin_gloo_to_node_address() -> None:
    """In a Ray Train worker, before its process group exists: gloo binds the interface that holds this node's Ray
    address (``dist.pin_gloo_interface``'s reason: across two network namespaces, Ray Train's workers timed out
    connecting to rank 0 at 127.0.0.1)."""
    import ray

    from genrec_dist.training.dist import route_interface

    name = route_interface(ray.util.get_node_ip_address())
    if name and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def _torch_config(use_gpu: bool) -> Any:
    """Ray Train's torch setup, with every worker's gloo pinned to its node's address first (CPU runs)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _PinnedBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(_pin_gloo_to_node_address)
            super().on_start(worker_group, backend_config)

    class _PinnedConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _PinnedBackend

    return TorchConfig(backend="nccl") if use_gpu else _PinnedConfig(backend="gloo")


def _worker_loop(config: dict) -> None:
    import ray.train

    from genrec_dist.training.trainer import train_worker

    summary = train_worker(config["cfg"], config["tracking"], config["run"])
    # Every worker reports (a Ray Train sync point); rank 0's carries the summary's scalar test metrics.
    metrics = {}
    if summary:
        metrics = {f"test/{k}": float(v) for k, v in summary["model"].items()}
    ray.train.report(metrics)


def run_ray(cfg: Any, tracking: Callable) -> dict[str, Any]:
    """Train on Ray Train workers; returns the run summary (read back from the run directory)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from genrec_dist.ray_runtime import ensure_ray

    cfg = copy.deepcopy(cfg)
    run = RunDir.resolve(cfg)  # read once and checked here, before Ray starts; the workers start from it
    ensure_ray(cfg.train.ray_address)  # the named cluster or RAY_ADDRESS's, else a new local Ray (not a stray one)
    use_gpu = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    run_name = cfg.train.run_name = run.name
    if run.resuming:
        cfg.train.resume = run_name
    storage_path = os.path.abspath(os.path.join(
        cfg.workdir if not storage.is_remote(cfg.workdir) else "/tmp", "ray_results"))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "tracking": tracking, "run": run},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
        torch_config=_torch_config(use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path),
    )
    trainer.fit()
    metrics = storage.read_json(storage.join(run.path, "metrics.json"), cfg.storage)
    meta = read_run(run.path, cfg.storage) or {}  # as the workers left it (the MLflow run id is theirs)
    return {"run_name": run_name, "run_dir": run.path, "mlflow_run_id": meta.get("mlflow_run_id"), **metrics}
