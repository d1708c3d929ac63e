"""Supervised fine-tuning: conversations rendered with the chat template, loss on assistant tokens only, with
per-batch sequence packing (whole examples, never split, no attention across them) or padding. Same loop as
pretraining (``training.train_lm``): accumulation, clipping, bf16, evaluation, checkpoints and exact resume;
optional LoRA.

Reads ``{"messages": [...]}`` or ``{"prompt", "completion"}`` records, by default the demo world's (deliberately
imperfect) demonstrations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf import distributed
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import Example, chat_example, pack_examples, pad_examples
from moss_rlhf.data.corpus import DEFAULT_WORLD_DIR, world_file
from moss_rlhf.data.formats import load_conversations
from moss_rlhf.models import LoraOptions, apply_lora, final_hidden_states, load_causal_lm, unwrap
from moss_rlhf.runs import RunDir, seed_everything
from moss_rlhf.stages.pretrain import causal_loss
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import LoopResult, TokenData, lm_evaluator, train_lm


@dataclass
class SFTConfig(TrainConfig):
    out: str = option("runs/sft", "run directory")
    model: str = option("runs/pretrain/model", "the model to fine-tune (hub id or save_pretrained directory)")
    tokenizer: str = option("", "tokenizer (default: the model's)")
    data: list[str] = option([], "conversation files or dataset ids; default: the demo world's demonstrations")
    eval_data: list[str] = option([], "held-out conversations; default: 5% of the training data")
    max_len: int = option(256, "longest example in tokens (longer ones are cut)")
    pack: bool = option(True, "pack each batch's conversations into shared rows, each attending to itself only "
                                 "(same loss as padding, less compute); else pad each batch to its longest")
    seq_len: int = option(256, "longest packed row in tokens")
    lora_r: int = option(0, "LoRA rank (0: train every weight)")
    lora_alpha: int = option(16, "LoRA alpha")
    world: str = option(DEFAULT_WORLD_DIR, "directory of the demo world (written there if absent)")
    world_size: str = option("default", "demo world size: default or quick", choices=("default", "quick"))
    max_steps: int = option(200, "optimizer steps to run")
    batch_size: int = option(64, "conversations per micro-batch per process")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay")

    def check(self) -> None:
        if self.pack and self.seq_len < self.max_len:
            raise ConfigError(f"--seq-len ({self.seq_len}) must be at least --max-len ({self.max_len}) when packing")


def sft_data(tokenizer, conversations: list, cfg: SFTConfig) -> TokenData:
    """One item per conversation; a micro-batch of ``batch_size`` conversations is packed into rows of ``seq_len``
    (``pack_examples``: the same loss as padding, less compute) or padded to its longest example."""
    examples = [chat_example(tokenizer, conv, cfg.max_len) for conv in conversations]
    examples = [e for e in examples if any(label != -100 for label in e.labels[1:])]

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [examples[i] for i in indices]
        out = (pack_examples(chosen, cfg.seq_len, tokenizer.pad_token_id) if cfg.pack
               else pad_examples(chosen, tokenizer.pad_token_id))
        out["n_targets"] = (out["labels"][:, 1:] != -100).sum()
        return out

    return TokenData(len(examples), batch)


def run(cfg: SFTConfig) -> LoopResult:
    """``moss-rlhf sft``."""
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume)
    paths = cfg.data or [world_file("sft.jsonl", cfg.world, cfg.seed, cfg.world_size)]
    conversations = [c for p in paths for c in load_conversations(p)]
    if cfg.eval_data:
        held_out = [c for p in cfg.eval_data for c in load_conversations(p)]
    else:
        cut = max(1, len(conversations) // 20)
        conversations, held_out = conversations[cut:], conversations[:cut]
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = apply_lora(load_causal_lm(cfg.model), LoraOptions(cfg.lora_r, cfg.lora_alpha))
    train, evaluation = sft_data(tokenizer, conversations, cfg), sft_data(tokenizer, held_out, cfg)
    if dist.is_main:
        print(f"sft: {len(train)} training conversations with an assistant reply, {len(held_out)} held out")
    result = train_lm(cfg, model, tokenizer, train, target_loss, run_dir, dist,
                      evaluate=lm_evaluator(evaluation, target_loss, cfg, dist), desc="sft")
    if dist.is_main:
        print(f"sft: step {result.step}, train loss {result.train_loss:.3f} -> {Path(cfg.out) / 'model'}")
    return result


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss over the batch's targets, with the output projection computed at target positions only.

    In SFT most positions carry no loss (prompts, padding), and with an 8k vocabulary the projection is a quarter of
    the model's FLOPs, so skipping it there is the biggest single saving (TRL's default ``chunked_nll`` loss does the
    same). ``final_hidden_states`` runs the decoder (through ``model(...)`` when training, so that DDP sees the
    forward), and ``logits_to_keep=1`` shrinks the model's own projection to one position. Models
    whose logits are not a plain projection of the last hidden state (soft-capping, logit scaling) and models without
    ``logits_to_keep`` take the ordinary full-logits path (``causal_loss``).
    """
    head = _plain_output_head(model)
    if head is None:
        return causal_loss(model, batch)
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                 logits_to_keep=1)
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    logits = head(hidden[:, :-1][counted])
    # float() is free in fp32 and keeps the softmax in fp32 under bf16 autocast
    return torch.nn.functional.cross_entropy(logits.float(), targets[counted], reduction="sum")


def _plain_output_head(model) -> torch.nn.Module | None:
    """The model's output projection when logits are exactly ``head(last hidden state)``; otherwise None."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # under a peft wrapper
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    head = base.get_output_embeddings()
    return head if isinstance(head, torch.nn.Module) else None


def assistant_only(example: Example) -> list[int]:
    """The tokens that carry loss (for tests and inspection)."""
    return [t for t in example.labels if t != -100]
