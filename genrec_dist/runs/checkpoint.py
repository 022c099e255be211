"""Checkpoints that are only "latest" once complete, on local disk or ``s3://``.

Layout under the checkpoint root (one per run)::

    step-00000120/               DeepSpeed's files (engine.save_checkpoint, every rank writes its part)
    step-00000120/rng-rank<r>.pt every rank's RNG states (torch, numpy, python)
    step-00000120/trainer.json   step, data cursor, best validation value, patience counter, MLflow run id
    step-00000120/history.json   the rows logged so far (the state's ``history``, one compact line), so a
                                 resumed run's history.json and curves start at step 1
    step-00000120/COMPLETE       written last, by rank 0, after every rank has written (and uploaded) its files

Resume picks the newest step directory that has ``COMPLETE``; a run killed while writing leaves a directory
without it, which is ignored (and removed by the next prune). For ``s3://`` roots DeepSpeed writes to a local
staging copy and the first rank of each node uploads what its node wrote; the marker goes up last. A local root
shared by several nodes must be a shared filesystem; otherwise use ``s3://``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch

from genrec_dist import storage
from genrec_dist.errors import GenrecError

MARKER = "COMPLETE"
STATE = "trainer.json"
HISTORY = "history.json"
_TAG = re.compile(r"^step-(\d{8})$")


class CheckpointWorldError(GenrecError, RuntimeError):
    """A ZeRO 1-3 checkpoint resumed at another world size than the one that saved it."""


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


# ----- RNG states (plain tensors/lists so torch.load(weights_only=True) reads them) -----

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----- finding checkpoints -----

def complete_steps(root: str, storage_cfg: Any = None) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending (none when ``root`` does not exist)."""
    fs, p = storage.filesystem(root, storage_cfg)
    if not fs.exists(p):
        return []
    steps = []
    for name in sorted(os.path.basename(n.rstrip("/")) for n in fs.ls(p, detail=False)):
        m = _TAG.match(name)
        if m and fs.exists(f"{p}/{name}/{MARKER}"):
            steps.append(int(m.group(1)))
    return steps


def latest_complete(root: str, storage_cfg: Any = None) -> int | None:
    steps = complete_steps(root, storage_cfg)
    return steps[-1] if steps else None


def read_state(root: str, step: int, storage_cfg: Any = None) -> dict[str, Any]:
    return storage.read_json(storage.join(root, tag_of(step), STATE), storage_cfg)


# ----- writing -----

class CheckpointStore:
    """Where one run's checkpoints live: ``root`` (local or s3) and ``local`` (the directory DeepSpeed writes to;
    the same as ``root`` when it is local). ``barrier`` synchronises all ranks; ``node_leader`` is local rank 0;
    ``world_size`` (the ranks saving or resuming) checks a ZeRO checkpoint is resumed at the world that wrote it."""

    def __init__(self, root: str, local: str, rank: int, node_leader: bool, barrier: Callable[[], None],
                 storage_cfg: Any = None, world_size: int = 1):
        self.root, self.local, self.world_size = root.rstrip("/"), local.rstrip("/"), world_size
        self.remote = storage.is_remote(root)
        self.rank, self.node_leader, self.barrier, self.storage_cfg = rank, node_leader, barrier, storage_cfg

    def save(self, engine: Any, step: int, state: dict[str, Any], keep: int) -> None:
        """Every rank calls this. Returns once the checkpoint is complete (marker written)."""
        tag = tag_of(step)
        engine.save_checkpoint(self.local, tag=tag)
        local_tag = os.path.join(self.local, tag)
        torch.save(rng_state(), os.path.join(local_tag, f"rng-rank{self.rank}.pt"))
        if self.rank == 0:
            state = dict(state)
            with open(os.path.join(local_tag, HISTORY), "w") as fh:
                json.dump(state.pop("history", []), fh, separators=(",", ":"))
            with open(os.path.join(local_tag, STATE), "w") as fh:
                json.dump(state, fh, indent=2, sort_keys=True)
        self.barrier()  # every rank's files are on disk
        if self.remote and self.node_leader:
            fs, p = storage.filesystem(storage.join(self.root, tag), self.storage_cfg)
            for name in sorted(os.listdir(local_tag)):
                fs.put(os.path.join(local_tag, name), f"{p}/{name}")
        self.barrier()  # every node's files are uploaded
        if self.rank == 0:
            storage.write_bytes(storage.join(self.root, tag, MARKER), json.dumps({"step": step}).encode(),
                                self.storage_cfg)
            self._prune(keep)
        if self.remote and self.node_leader:
            shutil.rmtree(local_tag, ignore_errors=True)  # the staging copy is no longer needed
        self.barrier()

    def _prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove older ones and incomplete leftovers below them."""
        steps = complete_steps(self.root, self.storage_cfg)
        if keep < 1 or len(steps) <= keep:
            return
        oldest_kept = steps[-keep]
        fs, p = storage.filesystem(self.root, self.storage_cfg)
        for name in fs.ls(p, detail=False):
            m = _TAG.match(os.path.basename(name.rstrip("/")))
            if m and int(m.group(1)) < oldest_kept:
                marker = f"{name.rstrip('/')}/{MARKER}"
                if fs.exists(marker):
                    fs.rm(marker)  # no longer "complete" before anything else goes
                fs.rm(name, recursive=True)

    # ----- reading -----

    def _check_world(self, engine: Any, tag: str) -> None:
        """ZeRO 1-3 save the optimizer in one part per rank, and DeepSpeed reloads them only at the world size that
        wrote them (a ZeRORuntimeException deep in its loader otherwise): say so in one line, with what to do."""
        parts = [n for n in os.listdir(os.path.join(self.local, tag)) if n.startswith("zero_pp_rank_")]
        saved = len({n.split("_mp_rank_")[0] for n in parts})
        world = self.world_size
        stage = engine.zero_optimization_stage()
        if stage and saved and saved != world:
            raise CheckpointWorldError(
                f"{self.root}/{tag} was saved by {saved} ranks at ZeRO stage {stage}, and DeepSpeed reloads a ZeRO "
                f"optimizer only at the world size that wrote it; this resume has {world}: relaunch with {saved} "
                f"ranks (the nodes that are left may run several ranks each: deepspeed --num_gpus / slots=)")

    def load(self, engine: Any, step: int) -> dict[str, Any]:
        """Every rank calls this: restores engine (weights, optimizer, lr schedule) and this rank's RNG states;
        returns the trainer state."""
        tag = tag_of(step)
        if self.remote:
            if self.node_leader:
                fs, p = storage.filesystem(storage.join(self.root, tag), self.storage_cfg)
                local_tag = os.path.join(self.local, tag)
                shutil.rmtree(local_tag, ignore_errors=True)
                os.makedirs(local_tag, exist_ok=True)
                for name in fs.ls(p, detail=False):
                    fs.get(name, os.path.join(local_tag, os.path.basename(name)))
            self.barrier()
        self._check_world(engine, tag)
        path, _ = engine.load_checkpoint(self.local, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{self.root}/{tag}: DeepSpeed could not load this checkpoint")
        rng_file = os.path.join(self.local, tag, f"rng-rank{self.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        with open(os.path.join(self.local, tag, STATE)) as fh:
            state = json.load(fh)
        history = os.path.join(self.local, tag, HISTORY)
        if os.path.exists(history):  # checkpoints written before history was kept have none
            with open(history) as fh:
                state["history"] = json.load(fh)
        return state
