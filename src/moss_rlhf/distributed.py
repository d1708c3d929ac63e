"""Data-parallel plumbing on top of ``torch.distributed``: one process per device, started by ``torchrun`` or
``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK). gloo on CPU, NCCL on GPU. Rank 0 alone writes files.

Two ways to spread a model over the processes (``--parallel``):

* ``ddp``: every process holds the whole model, its gradients and its optimizer state; DDP all-reduces gradients.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, the engine of torchtitan, torchtune and veRL) shards
  every transformer block and the rest of the model (embeddings, final norm, heads) over the processes; a block's
  weights are all-gathered for its forward and backward and its gradients reduce-scattered, so each process keeps
  1/N of the weights, gradients and optimizer state. Frozen models (reference, reward model) are sharded the same
  way, without an optimizer.

A sharded model's forward is a collective: every process must run the same number of them. Loops whose work is even
across processes (training steps, the rollout's scoring) need nothing; evaluations whose shares may differ by one
batch pad with dummies (:func:`shard_batches`, :func:`lockstep`); sampling, whose length differs per process, runs
on a whole copy of the weights (:func:`plain_copy`, refreshed by :func:`copy_weights` after each update), as a
rollout engine such as vLLM does.
Every forward of a sharded model runs through its root (``models.final_hidden_states``): FSDP2 keeps the root's
weights (embeddings, heads) gathered after the root's forward, so a head applied to its hidden states sees whole
weights.

A single process (``python -m`` or the ``moss-rlhf`` command, no launcher) starts no process group for ``ddp``: every
loop runs unchanged. With ``--parallel fsdp`` it shards over a group of one (in memory: no port, no launcher) — FSDP
on one device: the same code path as on N processes, and on a GPU with ``--cpu-offload`` the weights, gradients and
optimizer state kept in host memory, each block's weights brought to the GPU only for its forward and backward.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

_started_here = False  # whether init() started the process group (shutdown() ends only that one)


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
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        _import_group_defaults()
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        global _started_here
        _started_here = True
    return Dist(rank, world_size, local_rank, dev)


def _import_group_defaults() -> None:
    """Import, while no process group exists, the torch modules whose functions take ``group=dist.group.WORLD`` as a
    default argument (``torch.distributed.nn.functional``'s collectives, FSDP's grad scaler, ZeRO): imported after
    ``init_process_group`` — transformers imports them when it loads a model — each such default holds the group
    for good, ``destroy_process_group`` cannot free it, and its gloo threads are still running when the interpreter
    shuts down. A gloo thread that then drops a finished collective's tensors needs the GIL, which finalization
    holds, and the process aborts after a run that ended well ("terminate called without an active exception":
    about one two-process run in thirty, from a core dump's stacks). Imported first, the defaults are None."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.nn  # noqa: F401
    import torch.distributed.optim  # noqa: F401


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Keep the memory that a CPU training step frees for the next step, instead of returning it to the OS (glibc
    only; returns whether the settings were applied). By default glibc serves every block above a threshold that
    adapts up to 32 MiB with a fresh ``mmap`` and gives the heap's free top back to the OS: a step's activations,
    logits and gradients (a few to tens of MiB each, all freed when the step ends) then arrive as new pages every
    step, and each first touch of a page is a page fault and a page of zeros. On the GRPO benchmark (one thread, 8
    steps) these settings took the run from 227K to 153K page faults and a step 6–8% faster. Blocks under 32 MiB now
    come from the heap and the heap is never trimmed, so the process keeps its peak memory, as PyTorch's caching
    allocator does on a GPU. A user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` settings are left
    alone."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


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


def broadcast_object(value):
    """The main process's ``value`` on every process (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel when there are several processes; the model itself otherwise."""
    if d.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (its weights are DTensors, 1/N per process)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, d: Dist, cpu_offload: bool = False, precision: str = "fp32") -> torch.nn.Module:
    """FSDP2, in place: each transformer block (the model's ``_no_split_modules`` classes) is one unit, and the root
    holds the rest. On a GPU with ``precision`` bf16, weights are gathered and computed in bf16 and gradients
    reduced in fp32; ``cpu_offload`` keeps the shards and the optimizer step on the CPU. One process without a
    launcher shards over a group of its own (:func:`join_group_of_one`)."""
    if cpu_offload and d.device.type != "cuda":
        from moss_rlhf.config import ConfigError

        raise ConfigError("--cpu-offload moves the shards from the GPU to the host; on a CPU they are there already")
    join_group_of_one(d)
    import warnings

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a root returns a view (transformers' outputs do); nothing of ours writes into one in place
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    from moss_rlhf.models import base_model

    options = {}
    if precision == "bf16" and d.device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = set(getattr(base_model(model), "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"{type(model).__name__} names no transformer block (_no_split_modules) to shard")
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def join_group_of_one(d: Dist) -> None:
    """FSDP2 shards over a process group, even of one process: a process started without a launcher gets one of its
    own, held in memory (a ``HashStore``: no address, no port), which :func:`shutdown` ends."""
    global _started_here
    if d.world_size == 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        _started_here = True


def plain_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A whole, unsharded copy of ``model`` on the same device: of a sharded one (every process takes part: the
    weights are gathered one tensor at a time), or with its weights in another ``dtype`` (a bf16 sampler's; the
    buffers, such as rotary frequencies, keep theirs); ``model`` itself when it is neither."""
    if not is_sharded(model) and dtype in (None, next(model.parameters()).dtype):
        return model
    device = next(model.buffers(), next(model.parameters())).device  # buffers sit on the compute device
    copy = unsharded_skeleton(model).to_empty(device=device)
    for parameter in copy.parameters() if dtype is not None else ():
        parameter.data = parameter.data.to(dtype)
    copy_weights(model, copy)
    copy.eval()
    return copy.requires_grad_(False)


def unsharded_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A module of sharded ``model``'s structure, unsharded and on the meta device (it holds no memory): its
    transformers class built from its config, with the same LoRA adapters when it has them."""
    from torch.distributed.fsdp import FSDPModule

    from moss_rlhf.models import base_model

    base = base_model(model)
    plain_class = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        skeleton = plain_class(base.config)
        if getattr(base, "generation_config", None) is not None:  # the checkpoint's own, not one made from config
            skeleton.generation_config = copy.deepcopy(base.generation_config)
        if hasattr(model, "peft_config"):
            from peft import get_peft_model

            skeleton = get_peft_model(skeleton, copy.deepcopy(model.peft_config["default"]))
    return skeleton


def copy_weights(sharded: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Gather ``sharded``'s weights into ``plain`` (same architecture) one tensor at a time, buffers included; a
    collective, so every process calls it at the same point (after each policy update)."""
    from torch.distributed.tensor import DTensor

    reshard(sharded)
    targets = dict(plain.named_parameters())
    targets.update(plain.named_buffers())
    with torch.no_grad():
        for name, tensor in [*sharded.named_parameters(), *sharded.named_buffers()]:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            targets[name].copy_(whole.to(targets[name].device, targets[name].dtype))
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit of ``model`` back to its shards. FSDP2 keeps the root's weights gathered after a forward
    (for the backward that usually follows); a frozen model, or one read after an evaluation, would keep them so."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded ``model``, gathered from the shards onto the main process's CPU (None on
    the others); a collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main else None


def lockstep(n_batches: int, sharded: bool) -> int:
    """How many batches this process must add (dummies whose results it drops) so that every process runs the most
    any process runs: a sharded model's forward is a collective. 0 when nothing is sharded or all run alike."""
    if not sharded or not is_distributed():
        return 0
    most = torch.tensor(n_batches, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) - n_batches


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors``: the local shard of a DTensor, a plain tensor whole."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def describe_parallel(models: dict) -> str:
    """"fsdp over 2 processes" / "ddp over 2 processes" / "1 process" for the models of a run."""
    world = dist.get_world_size() if is_distributed() else 1
    modules = [getattr(m, "model", m) for m in models.values() if m is not None]
    sharded = any(is_sharded(m) for m in modules)
    if world == 1:
        return "fsdp on 1 process" if sharded else "1 process"
    return f"{'fsdp' if sharded else 'ddp'} over {world} processes"


def shard_batches(n_items: int, batch_size: int, d: Dist, model: torch.nn.Module) -> list[list[int] | None]:
    """This process's share of ``n_items`` held-out items (every ``world_size``-th one) in batches; for a sharded
    ``model``, padded with None — a dummy batch, to be run and its result dropped — up to the most batches any
    process has."""
    mine = list(range(d.rank, n_items, d.world_size))
    batches: list[list[int] | None] = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    return batches + [None] * lockstep(len(batches), is_sharded(model))


def shutdown(wait_for_all: bool = False) -> None:
    """Destroy the process group this module started — not one another library started in this process (vLLM's
    in-process engine makes its own and tears it down at exit: destroyed under it, it raised at exit).

    ``wait_for_all`` (a run that ended well, on every process) first waits for the others: a process that tears
    its group down and exits while a peer is still writing the final model or in a last collective can abort in
    gloo's teardown. Never after an error: the peers may be blocked in another collective, and would match it."""
    global _started_here
    if _started_here and dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        _free_device_mesh_groups()
        dist.destroy_process_group()
    _started_here = False


def _free_device_mesh_groups() -> None:
    """FSDP2's device meshes outlive the models sharded over them: DTensor's sharding caches (torch's, module-level)
    keep their specs, and each mesh holds its process groups (``_pg_registry``). ``destroy_process_group`` then left
    the group and its gloo threads running into the interpreter's shutdown after every FSDP run, with the abort
    :func:`_import_group_defaults` describes (met once in a full test suite on a busy machine). Emptied registries free
    it; outside torch.compile a mesh finds its groups by name, so a cached mesh stays harmless. The sharded models
    that are gone but in reference cycles (FSDP's hooks make them) hold the group as well: collected first."""
    device_mesh = sys.modules.get("torch.distributed.device_mesh")
    if device_mesh is None:
        return
    gc.collect()
    for obj in gc.get_objects():
        if issubclass(type(obj), device_mesh.DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()
