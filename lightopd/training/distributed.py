"""The process group of a `torchrun` launch: who this process is, its device, and the few
collectives the trainer needs.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) there is no process group
and every collective is the identity, so the trainer has one code path. Under torchrun each
rank joins the group torchrun describes (gloo on CPU, NCCL on CUDA, one GPU per local rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightopd.engine import models
from lightopd.errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes metrics, progress, checkpoints and the final model."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def max(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = World()  # one process, no process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer (it is set by torchrun)") from None


def join(device_name: str) -> tuple[World, torch.device]:
    """This process's World and device; joins torchrun's process group when there is one."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE, models.resolve_device(device_name)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = models.resolve_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise InputError(f"--device {device_name}: under torchrun each rank uses the GPU of its local rank; "
                             "pass --device cuda (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"--device {device_name}: distributed training runs on CUDA (NCCL) or CPU (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    _JOINED[0] += 1
    return World(rank=rank, size=size, local_rank=local_rank), device


_JOINED = [0]  # joins not yet left: a stage run inside `lightopd rounds` leaves the group to the rounds


def leave(world: World, clean: bool = True) -> None:
    """Leave the process group (the last leave of nested joins destroys it); after a failure without
    the final barrier, which the other ranks may never reach (torchrun then stops them when this
    process exits)."""
    if world.active and dist.is_initialized():
        if clean:
            dist.barrier()
        _JOINED[0] = max(_JOINED[0] - 1, 0)
        if not _JOINED[0] or not clean:
            _JOINED[0] = 0
            dist.destroy_process_group()
