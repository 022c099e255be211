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

from genrec_dist.errors import GenrecError


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


def init_process_group(use_cuda: bool, timeout_s: float = 0.0) -> None:
    """``deepspeed.init_distributed`` (NCCL on GPU, gloo on CPU), reusing a process group a launcher made already
    (Ray Train), without DeepSpeed's CPU shared-memory all-reduce op (above): DeepSpeed skips an op its registry marks
    incompatible, and the registry is one dict that keeps edits (deepspeed/ops/__init__.py). ``timeout_s`` > 0: how
    long a collective may wait for a rank before it fails (torch's default: 30 minutes)."""
    import datetime

    import deepspeed
    import deepspeed.ops

    if not use_cuda:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        pin_gloo_interface()
    kwargs = {}
    if timeout_s > 0:
        import torch.distributed.distributed_c10d as c10d

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        # The groups DeepSpeed makes later (its data-parallel group carries the gradient all-reduce) take torch's
        # module default, not the world group's timeout: a hung peer then held them for 30 minutes (tested: a
        # SIGSTOPped rank). torch reads these two globals whenever a group is made without a timeout.
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = kwargs["timeout"]
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", **kwargs)


class RankLostError(GenrecError, RuntimeError):
    """A rank of a running job (its process, or its whole node) stopped answering the others' collectives."""


# What a collective raises when a peer is gone, where torch does not raise a DistError: gloo's TCP pair ("[.../gloo/
# transport/tcp/pair.cc] Connection closed by peer [addr]:port", "... Timed out waiting 600000ms for recv"), NCCL's.
_LOST = ("gloo", "nccl", "connection closed by peer", "connection reset by peer")


class RankWatch:
    """Who every rank is (host, address, pid), gathered once at the start, so that a failed collective can name the
    rank it lost instead of gloo's ``Connection closed by peer [10.0.0.2]:41833``."""

    def __init__(self, rank: int, table: list[tuple[str, str, int]]):
        self.rank, self.table = rank, table

    @classmethod
    def gather(cls, rank: int, world_size: int) -> "RankWatch":
        """Every rank calls this (one all-gather)."""
        import torch.distributed as tdist

        me = (socket.gethostname(), own_address(os.environ.get("MASTER_ADDR", "")), os.getpid())
        table: list = [None] * world_size
        tdist.all_gather_object(table, me)
        return cls(rank, [tuple(t) for t in table])

    def is_loss(self, exc: BaseException) -> bool:
        """Whether ``exc`` (or an exception it came from) is a collective that lost a peer."""
        import torch.distributed as tdist

        while exc is not None:
            if isinstance(exc, getattr(tdist, "DistError", ())) or (
                    isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _LOST)):
                return True
            exc = exc.__cause__ or exc.__context__
        return False

    def lost(self, exc: BaseException) -> str:
        """The ranks ``exc`` points at: those at the peer address it names, else every rank on another address."""
        import re

        named = set(re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+", str(exc)))
        mine = self.table[self.rank][1]
        ranks = [r for r, (_, addr, _) in enumerate(self.table) if r != self.rank and addr in named]
        if not ranks:  # a timeout names nobody: the ranks on other addresses (or every other rank)
            ranks = [r for r, (_, addr, _) in enumerate(self.table) if addr != mine] or [
                r for r in range(len(self.table)) if r != self.rank]
        return ", ".join(f"rank {r} ({self.table[r][0]}, {self.table[r][1]}, pid {self.table[r][2]})" for r in ranks)


def own_address(master: str) -> str:
    """The IPv4 address this machine reaches ``master`` from (the one the other ranks know it by)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master or "127.0.0.1", 9))  # UDP: nothing is sent
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def pin_gloo_interface(env: dict | None = None) -> str | None:
    """Gloo's interface: the one this machine reaches ``MASTER_ADDR`` through, set as ``GLOO_SOCKET_IFNAME`` unless
    the user set it. Left alone, gloo binds the address its hostname resolves to, which on a multi-homed machine (or
    one whose hostname resolves to another interface, or to none) is not one the other nodes reach: found on two
    network namespaces, where rank 1 timed out connecting to rank 0 at 127.0.0.1. Returns the name it set."""
    env = os.environ if env is None else env
    master = env.get("MASTER_ADDR", "")
    if "GLOO_SOCKET_IFNAME" in env or int(env.get("WORLD_SIZE", "1")) <= 1 or not master:
        return None
    name = route_interface(master)
    if name:
        env["GLOO_SOCKET_IFNAME"] = name
    return name


def route_interface(addr: str) -> str | None:
    """Name of the network interface this machine sends to ``addr`` from (Linux; ``None`` for loopback, or where it
    cannot tell)."""
    import fcntl
    import struct

    local = own_address(addr)  # the source address the kernel picks for addr (127.0.0.1 where it cannot tell)
    if local.startswith("127."):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None
