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
    before the process group exists (only rank 0 says where its config came from)."""
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


# DeepSpeed's CPU backend loads one C++ op at every process-group start, whatever the job: the shared-memory
# all-reduce (ops/csrc/cpu/comm/shm.cpp) that only its tensor-parallel inference calls (``inference_all_reduce``);
# ZeRO training reduces through torch.distributed (gloo) either way. Loading it compiles it on a machine that has not
# yet (about a minute on 2 cores), under a lock file in $TORCH_EXTENSIONS_DIR that every later start waits on, forever
# and silently, if the building process died; and each rank makes a 66 MB /dev/shm segment that it never unlinks
# (RAM: 4 GB after a day of test runs here).
SHM_COMM_OP = "deepspeed_shm_comm"


def init_process_group(use_cuda: bool) -> None:
    """``deepspeed.init_distributed`` (NCCL on GPU, gloo on CPU), reusing a process group a launcher made already
    (Ray Train), without DeepSpeed's CPU shared-memory all-reduce op (above): DeepSpeed skips an op its registry marks
    incompatible, and the registry is one dict that keeps edits (deepspeed/ops/__init__.py)."""
    import deepspeed
    import deepspeed.ops

    if not use_cuda:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
