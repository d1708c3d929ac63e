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
    if device != "auto":
        from moss_rlhf.models import resolve_device

        resolve_device(device)  # a named device must exist
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


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (same shape on all), concatenated in rank order: global percentiles."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count of the entries of ``x`` where ``mask`` is set, over every process's batch:
    one set of statistics for the whole global batch, in float64, in two passes (sums and count, then squared
    deviations from the global mean)."""
    x = x.double()
    counted = mask.bool()
    totals = all_reduce_sum(torch.stack([torch.where(counted, x, 0.0).sum(), counted.sum().double()]))
    count = totals[1].clamp(min=1)
    mean = totals[0] / count
    squares = all_reduce_sum(torch.where(counted, (x - mean) ** 2, 0.0).sum().reshape(1))[0]
    return mean, squares / count, totals[1]


def global_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` normalised to mean 0 and (unbiased) std 1 over the counted entries of every process; 0 elsewhere."""
    mean, var, n = global_mean_var(x, mask)
    var = var * n / (n - 1).clamp(min=1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0).to(x.dtype)


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the counted entries of every process; NaN when the returns are constant."""
    _, var_returns, _ = global_mean_var(returns, mask)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"))
    _, var_errors, _ = global_mean_var(returns - values, mask)
    return 1.0 - var_errors / var_returns


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
