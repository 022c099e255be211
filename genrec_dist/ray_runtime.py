"""Connecting to Ray, for every stage that uses it (tokenization's Ray Data and actors, Ray Train): the cluster
named in the config or by ``RAY_ADDRESS`` (``ray job submit`` sets it), else a fresh local Ray on this machine (never
a stray cluster someone else started here)."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str = "", num_cpus: int | None = None) -> str:
    """Initialise Ray once per process; returns how it was reached ("existing", the address, or "local")."""
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return "local"
