"""The supervised training loop shared by pretraining, SFT, the reward model and DPO, the LM losses, and the optimizer,
schedule and gradient clipping every stage uses.

One optimizer step, top to bottom:
  1. read this process's micro-batches for the step (``BatchOrder``: a pure function of seed and step);
  2. count the target tokens of the whole global batch (all processes, all micro-batches); a stage whose loss needs a
     statistic of the whole global batch (KTO's reference point) computes it here, without gradients, with
     ``step_constants(model, micro_batches)``, and every micro-batch carries it;
  3. backward each micro-batch's *summed* token loss divided by that count — so 8×1, 2×4 and 2 processes × 4 give
     the same gradient, whatever the padding (a per-micro-batch mean would weight short batches up);
  4. clip the global gradient norm, step AdamW and the warm-up + cosine schedule;
  5. log, evaluate, checkpoint (atomically) on their periods.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import Checkpointer
from moss_rlhf.config import ConfigError, NonFiniteError, TrainConfig
from moss_rlhf.data.collate import BatchOrder, TokenData
from moss_rlhf.losses import lm_loss_sum
from moss_rlhf.models import accepts, base_model, check_positions, compile_layers, final_hidden_states, save_model
from moss_rlhf.runs import Progress, RunDir, plot_curves


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings' 1-d parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CUDA; CPU since torch 2.4) updates each tensor in one pass instead of ~10 elementwise ops: on
    # CPU the optimizer step of the 14M `small` preset drops from ~0.2 s (seconds on a busy machine) to ~0.05 s.
    cpu_fused = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    fused = all(p.is_cuda or (cpu_fused and p.device.type == "cpu") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it at ``max_steps``."""
    warmup, total, floor = cfg.warmup_steps, max(cfg.max_steps, 1), cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# loss_fn(model, batch) -> summed loss over the batch's target tokens
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class LoopResult:
    step: int
    train_loss: float
    eval_loss: float | None
    tokens_per_second: float
    eval_metrics: dict[str, float] = field(default_factory=dict)


Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class Trainee:
    """A model in training with its optimizer and schedule. ``module`` is what forward passes call (DDP-wrapped with
    several processes); ``model`` is the plain one (clipping, saving) — under FSDP both are the sharded model."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: TrainConfig, dist: distributed.Dist, lr: float | None = None,
               max_grad_norm: float | None = None) -> Trainee:
        """``model`` on the device, DDP-wrapped or FSDP-sharded (``--parallel``), with activation checkpointing
        and compiled blocks (``--compile``) when asked, then AdamW — built after sharding, on the shards — and the
        warm-up + cosine schedule."""
        model.to(dist.device)
        if cfg.activation_checkpointing:
            base = base_model(model)
            if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.20's name
                base.activation_checkpointing_enable()
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.compile:
            compile_layers(model)
        module = model
        if cfg.parallel == "fsdp":
            distributed.shard(model, dist, cfg.cpu_offload, cfg.precision)
        else:
            module = distributed.wrap_ddp(model, dist)
        optimizer = build_optimizer(model, cfg, lr)
        return cls(model, module, optimizer, build_schedule(optimizer, cfg),
                   cfg.max_grad_norm if max_grad_norm is None else max_grad_norm)

    def step(self, finite_loss: bool = True) -> float:
        """Clip the gradient norm and step the optimizer, then clear the gradients; returns the norm before
        clipping. With a non-finite loss or gradient norm nothing is applied: the weights and the optimizer's state
        stay as they were (the caller stops or skips, see :func:`skip_or_stop`)."""
        grad_norm = clip_gradients(self.model, self.max_grad_norm)
        if finite_loss and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def no_sync(self, sync: bool):
        """DDP's no-sync for every micro-batch but the last of an accumulation (where ``sync`` is True). FSDP
        reduce-scatters every micro-batch: skipping it would hold whole gradients, the memory FSDP exists to save."""
        return contextlib.nullcontext() if sync or not hasattr(self.module, "no_sync") else self.module.no_sync()


# step_constants(model, micro_batches) -> tensors every micro-batch of the step shares (computed before any backward)
StepConstants = Callable[[torch.nn.Module, list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


def train_lm(cfg: TrainConfig, model: torch.nn.Module, tokenizer, train: TokenData, loss_fn: LossFn, run: RunDir,
             dist: distributed.Dist, evaluate: Evaluator | None = None, desc: str = "train",
             step_constants: StepConstants | None = None,
             frozen: dict[str, torch.nn.Module | None] | None = None) -> LoopResult:
    """Train ``model`` on ``train`` with ``loss_fn``; ``evaluate(model)`` returns held-out metrics ("eval/loss" is
    reported in the result). Used by pretraining, SFT, the reward model and DPO; ``step_constants`` (KTO) adds
    global-batch values to every micro-batch, so that accumulation and more processes still equal one batch.
    ``frozen``: the other models the run holds (DPO's reference), for the memory report."""
    device = dist.device
    # the longest positions a batch holds: an example's (--max-len; packed examples restart theirs), else a row's
    length = next((name for name in ("max_len", "seq_len") if hasattr(cfg, name)), None)
    if length:
        check_positions(model, getattr(cfg, length), "--" + length.replace("_", "-"))
    trainee = Trainee.create(model, cfg, dist)
    optimizer, schedule = trainee.optimizer, trainee.schedule
    order = BatchOrder(len(train), cfg.batch_size, cfg.grad_accum, dist.world_size, cfg.seed)
    if len(train) < order.global_batch:
        raise ConfigError(f"{len(train)} training examples are fewer than one global batch ({cfg.batch_size} "
                          f"--batch-size × {cfg.grad_accum} --grad-accum × {dist.world_size} processes)")
    checkpoints = Checkpointer(run.checkpoints, {"model": model, "optimizer": optimizer, "schedule": schedule},
                               tokenizer, cfg.keep_checkpoints, dist.is_main, desc)
    restored = (checkpoints.restore() if cfg.resume else None) or {}
    step, skipped = restored.get("step", 0), restored.get("skipped", 0)
    if cfg.resume:
        run.truncate_metrics(step)

    progress = Progress(cfg.max_steps, step, desc, enabled=cfg.progress and dist.is_main)
    started, tokens_seen, first_step = time.perf_counter(), 0, step + 1
    train_loss, eval_loss = float("nan"), None
    last_eval: dict[str, float] = {}
    model.train()
    while step < cfg.max_steps:
        step_started = time.perf_counter()
        micro_batches = [train.batch(order.indices(step, j, dist.rank)) for j in range(cfg.grad_accum)]
        local_targets = sum(int(mb["n_targets"]) for mb in micro_batches)
        n_targets = distributed.all_reduce_sum(torch.tensor(float(local_targets), device=device))
        scale = dist.world_size / n_targets.clamp(min=1.0)  # DDP averages gradients over processes
        shared = step_constants(trainee.module, micro_batches) if step_constants else {}
        loss_sum = torch.zeros((), device=device)
        for j, mb in enumerate(micro_batches):
            mb = {**{k: v.to(device) for k, v in mb.items() if k != "n_targets"}, **shared}
            with trainee.no_sync(j == cfg.grad_accum - 1), autocast(device, cfg.precision):
                batch_loss = loss_fn(trainee.module, mb)
                (batch_loss * scale).backward()
            loss_sum += batch_loss.detach().float()
        train_loss = float(distributed.all_reduce_sum(loss_sum) / n_targets)
        grad_norm = trainee.step(math.isfinite(train_loss))
        skipped += skip_or_stop(cfg, desc, step + 1, skipped,
                                nonfinite({"loss": train_loss, "gradient norm": grad_norm}))
        schedule.step()
        step += 1

        step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * dist.world_size
        tokens_seen += step_tokens
        tok_s = tokens_seen / max(time.perf_counter() - started, 1e-9)
        progress.update(step_tokens, loss=train_loss)
        measured = memory_report({"model": trainee, **(frozen or {})}, desc, dist) if step == first_step else {}
        metrics = measured if step == 1 else {}  # a resumed run prints it but logs only what a fresh one did
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
            metrics.update({"train/loss": train_loss, "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s,
                            "train/lr": schedule.get_last_lr()[0], "train/epoch": order.epoch_of(step),
                            "train/skipped_steps": skipped, "train/s_per_step": time.perf_counter() - step_started})
        if evaluate is not None and (step == cfg.max_steps or cfg.eval_every and step % cfg.eval_every == 0):
            eval_metrics = evaluate(trainee.module)
            last_eval = eval_metrics
            eval_loss = eval_metrics.get("eval/loss", eval_loss)
            metrics.update(eval_metrics)
            model.train()
        if metrics:
            run.log(step, metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            checkpoints.save(step, data_position=step * order.global_batch, skipped=skipped)
    progress.close()
    checkpoints.save(step, data_position=step * order.global_batch, skipped=skipped)
    save_model(model, tokenizer, run.model_path, dist.is_main)
    if dist.is_main:
        plot_curves(run.path, title=desc)
    distributed.barrier()
    run.close()
    return LoopResult(step, train_loss, eval_loss, tokens_seen / max(time.perf_counter() - started, 1e-9), last_eval)


def memory_report(parts: dict[str, Trainee | torch.nn.Module | None], desc: str,
                  dist: distributed.Dist) -> dict[str, float]:
    """What each model holds on this process, measured after a first step: its weights (the local shards under
    FSDP) and, when trained, its optimizer state — ``memory/<name>_weights_mb`` and ``_optimizer_mb``, printed by
    the main process (``moss-rlhf plan`` estimates the same before anything is loaded); on a GPU also the device's
    peak allocation so far (``memory/device_peak_mb``), which ``--cpu-offload`` is there to lower."""
    metrics = {}
    for name, part in parts.items():
        if part is None:
            continue
        model = part.model if isinstance(part, Trainee) else part
        distributed.reshard(model)  # its shards, not the root's weights a forward left gathered
        metrics[f"memory/{name}_weights_mb"] = distributed.local_bytes(model.parameters()) / 2 ** 20
        if isinstance(part, Trainee):
            state = [t for s in part.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            metrics[f"memory/{name}_optimizer_mb"] = distributed.local_bytes(state) / 2 ** 20
    if dist.device.type == "cuda":  # what the first step needed of the device: activations and gathered blocks too
        metrics["memory/device_peak_mb"] = torch.cuda.max_memory_allocated(dist.device) / 2 ** 20
    if dist.is_main:
        shown = ", ".join(f"{k.removeprefix('memory/').removesuffix('_mb').replace('_', ' ')} {v:.1f} MB"
                          for k, v in metrics.items())
        print(f"{desc}: per process ({distributed.describe_parallel(parts)}): {shown}")
    return metrics


def nonfinite(values: dict[str, float]) -> str | None:
    """``"loss nan, gradient norm inf"`` for the values that are NaN or infinite; None when all are finite."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    return ", ".join(bad) or None


def skip_or_stop(cfg: TrainConfig, desc: str, step: int, skipped: int, problem: str | None) -> int:
    """After a step with a ``problem`` (see :func:`nonfinite`; nothing of the step was applied): 1 under
    ``--on-nonfinite skip``, or a :class:`NonFiniteError` under ``stop`` and once more than ``--max-skipped-steps``
    were skipped; 0 when there was no problem. Every process sees the same (globally reduced) values, so all decide
    alike."""
    if problem is None:
        return 0
    if cfg.on_nonfinite == "stop" or skipped + 1 > cfg.max_skipped_steps:
        raise NonFiniteError(f"{desc}: step {step}: {problem}; nothing of this step was applied and no non-finite "
                             f"weight was saved (try a lower --lr, or --on-nonfinite skip)")
    print(f"{desc}: step {step}: {problem}: step skipped ({skipped + 1} of at most {cfg.max_skipped_steps})")
    return 1


def lm_batches(tokenizer, paths: list[str], max_len: int, batch_size: int, dist: distributed.Dist,
               seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """Batches of conversations for a supervised LM term inside another loop (PPO-ptx): ``batch_at(update)`` is a
    pure function of the global update number, so a resumed run reads what the uninterrupted one did."""
    from moss_rlhf.data.collate import conversation_data
    from moss_rlhf.data.formats import load_conversations

    data = conversation_data(tokenizer, [c for path in paths for c in load_conversations(path)], max_len)
    if not len(data):
        raise ConfigError(f"{', '.join(paths)}: no conversation with an assistant reply")
    order = BatchOrder(len(data), batch_size, 1, dist.world_size, seed)

    def batch_at(update: int) -> dict[str, torch.Tensor]:
        return {k: v.to(dist.device) for k, v in data.batch(order.indices(update, 0, dist.rank)).items()}

    return batch_at


def lm_backward(trainee: Trainee, batch: dict[str, torch.Tensor], coef: float, world_size: int) -> float:
    """Backward of ``coef ×`` the mean target-token LM loss of one batch over every process (PPO-ptx: InstructGPT's
    pretraining-mix term, PPO-max's optional one); returns the global mean loss."""
    batch = dict(batch)
    n_total = distributed.all_reduce_sum(batch.pop("n_targets").double()).clamp(min=1)
    loss_sum = target_loss(trainee.module, batch)
    (coef * loss_sum * world_size / n_total).backward()  # DDP averages over processes
    return float(distributed.all_reduce_sum(loss_sum.detach().double()) / n_total)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: measure only); returns the norm before clipping. Under FSDP
    the norm of the sharded gradients is reduced over the processes (a DTensor: ``full_tensor``)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def lm_evaluator(data: TokenData, loss_fn: LossFn, cfg: TrainConfig, dist: distributed.Dist) -> Evaluator:
    """Held-out loss and perplexity."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        loss = evaluate_loss(model, data, loss_fn, cfg, dist)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    return evaluate


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: TokenData, loss_fn: LossFn, cfg: TrainConfig,
                  dist: distributed.Dist) -> float:
    """Mean target loss over the first ``eval_batches`` global batches of held-out data (sharded over processes)."""
    model.eval()
    device = dist.device
    total = torch.zeros(2, device=device)
    # every item of the evaluated prefix counts once, whatever the number of processes (a process may get one more)
    n_items = min(cfg.eval_batches * cfg.batch_size * dist.world_size, len(data))
    for rows in distributed.shard_batches(n_items, cfg.batch_size, dist, model):
        batch = data.batch(rows or [0])
        n = float(batch.pop("n_targets"))
        with autocast(device, cfg.precision):
            loss = loss_fn(model, {k: v.to(device) for k, v in batch.items()}).float()
        if rows is not None:  # None: a dummy batch that keeps a sharded model's processes in step
            total += torch.stack([loss, torch.tensor(n, device=device)])
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1.0))


# --------------------------------------------------------------------------------------------------------------------
# LM losses: summed over the batch's target tokens (the loop divides by the global count)


def causal_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss from the model's full logits (pretraining: every position is a target)."""
    # use_cache=False: with a cache, transformers ignores packed position_ids (SFT's packed rows) and lets the
    # examples of a row attend to each other; a training forward has no use for a cache anyway
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits
    return lm_loss_sum(logits, batch["labels"])[0]


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss over the batch's targets, with the output projection computed at target positions only
    (SFT, PPO-ptx).

    In SFT most positions carry no loss (prompts, padding), and with an 8k vocabulary the projection is a quarter of
    the model's FLOPs, so skipping it there is the biggest single saving (TRL's default ``chunked_nll`` loss does the
    same). ``final_hidden_states`` runs the decoder (through ``model(...)`` when training, so that DDP sees the
    forward), and ``logits_to_keep=1`` shrinks the model's own projection to one position. Models whose logits are
    not a plain projection of the last hidden state (soft-capping, logit scaling) and models without
    ``logits_to_keep`` take the ordinary full-logits path (:func:`causal_loss`).
    """
    head = plain_output_head(model)
    if head is None:
        return causal_loss(model, batch)
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                 logits_to_keep=1)
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    logits = head(hidden[:, :-1][counted])
    # float() is free in fp32 and keeps the softmax in fp32 under bf16 autocast
    return torch.nn.functional.cross_entropy(logits.float(), targets[counted], reduction="sum")


def plain_output_head(model) -> torch.nn.Module | None:
    """The model's output projection when logits are exactly ``head(last hidden state)``; otherwise None."""
    base = base_model(model)
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    if not accepts(base, "logits_to_keep"):
        return None
    head = base.get_output_embeddings()
    return head if isinstance(head, torch.nn.Module) else None
