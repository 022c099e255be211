"""The one reader of the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Every launcher says who a process is through the same variables: the ``deepspeed`` launcher (one node or
``--hostfile``), ``torchrun``, and Ray Train (which also initialises the process group before the worker function
runs). A plain ``python jobs/train.py`` sets none of them: it is the whole world, rank 0 of 1, and we fill them in
(loopback address, a free port) so ``deepspeed.init_distributed`` never falls back to MPI discovery.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank_zero(env: dict | None = None) -> bool:
    """Whether this process is rank 0 (or a lone process), without filling anything in: what a job's entrypoint asks
    before the process group exists (only rank 0 prints the resolved config)."""
    return (os.environ if env is None else env).get("RANK", "0") == "0"


def world_from_env(env: dict | None = None) -> WorldInfo:
    """Who this process is, from the launcher's variables; a lone process is rank 0 of 1 (variables filled in)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    try:
        return WorldInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    except ValueError as exc:
        raise ValueError(f"launcher environment is not numeric (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT): {exc}"
                         ) from None


# DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp, used when every rank is on one machine) names a
# segment per rank <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and never unlinks it: each finished CPU launch
# left 2 x 66 MB in /dev/shm, which is RAM (4 GB after a day of test runs on a 24 GB machine).
SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(world: WorldInfo) -> str:
    """This rank's DeepSpeed shared-memory all-reduce segment (it exists only when every rank is local)."""
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{world.master_addr}_{world.master_port}_{world.rank}")


def release_shm_buffer(world: WorldInfo) -> bool:
    """Unlink this rank's segment once no collective is left to run: the mappings stay valid until the processes
    exit, the name (and, at exit, the memory) goes. Returns whether there was one."""
    try:
        os.unlink(shm_buffer_path(world))
        return True
    except FileNotFoundError:
        return False
