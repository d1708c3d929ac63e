"""Data-parallel plumbing on top of ``torch.distributed``: one process per device, started by ``torchrun`` or
``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK). gloo on CPU, NCCL on GPU. Rank 0 alone writes files.

A single process needs none of this and never initialises a process group, so every loop runs unchanged with
``python -m`` or the ``moss-rlhf`` command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the process group the launcher describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place and returned); the identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel when there are several processes; the model itself otherwise."""
    if d.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
