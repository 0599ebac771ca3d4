"""The little the trainer needs from ``torch.distributed``: set-up from torchrun's environment, exact sums, a check.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single process. The backend
is nccl on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainError

__all__ = ["Env", "is_rank_zero", "setup", "teardown", "all_sum", "per_rank", "broadcast_buffers",
           "check_replicas_in_sync"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Env:
    """Where this process stands: its rank among ``world_size``, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True if setup() created the process group (so teardown() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its torchrun job (``RANK``), or runs alone; readable before :func:`setup`.

    Rank 0 is the one that prints, writes the run folder and holds its lock.
    """
    return int(os.environ.get("RANK", "0")) == 0


def setup() -> Env:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1 and not dist.is_initialized():
        return Env(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Env(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)


def teardown(env: Env) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, env: Env) -> torch.Tensor:
    """Sum ``values`` over ranks (float64 counts and sums stay exact for integers below 2**53)."""
    if env.world_size > 1:
        values = values.to(env.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def per_rank(values: torch.Tensor, env: Env) -> torch.Tensor:
    """Every rank's 1-D ``values`` as the rows of a ``(world_size, len(values))`` tensor, the same on every rank.

    One all-reduce of a zero-padded matrix (a sum with zeros is exact, NaN and inf included); a single process
    gets ``values[None]`` with no communication. The result stays on ``values``' device: read it with one
    ``.tolist()``.
    """
    if env.world_size == 1:
        return values[None]
    rows = torch.zeros(env.world_size, len(values), dtype=values.dtype, device=env.device)
    rows[env.rank] = values
    dist.all_reduce(rows, op=dist.ReduceOp.SUM)
    return rows


def broadcast_buffers(model: nn.Module, env: Env) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP does this at the start of each forward, so after the last training step each rank still holds the statistics
    of its own last batch; evaluation and checkpoints need the ones DDP would use next.
    """
    if env.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def check_replicas_in_sync(model: nn.Module, env: Env) -> int:
    """CRC32 of all parameters and buffers, identical on every rank or :class:`TrainError`; returns the CRC."""
    crc = 0
    for tensor in model.state_dict().values():
        crc = zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes(), crc)
    if env.world_size > 1:
        crcs = torch.zeros(env.world_size, dtype=torch.int64, device=env.device)
        crcs[env.rank] = crc
        dist.all_reduce(crcs, op=dist.ReduceOp.SUM)
        if len(set(crcs.tolist())) != 1:
            raise TrainError(
                f"the ranks' weights differ (CRCs {crcs.tolist()}): a module changes weights outside DDP's "
                "gradient sync; report it with the command line"
            )
    return crc
