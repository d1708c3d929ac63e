"""Supervised fine-tuning: conversations rendered with the chat template, loss on assistant tokens only (each reply
up to its turn end), with per-batch sequence packing (whole examples, never split, no attention across them) or
padding. Same loop as pretraining (``training.train_lm``): accumulation, clipping, bf16, evaluation, checkpoints
and exact resume; optional LoRA.

Reads ``{"messages": [...]}`` or ``{"prompt", "completion"}`` records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import conversation_data
from moss_rlhf.data.formats import load_conversations
from moss_rlhf.data.splits import load_split
from moss_rlhf.models import LoraOptions, apply_lora, check_vocabulary, load_causal_lm
from moss_rlhf.runs import RunDir
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import LoopResult, lm_evaluator, target_loss, train_lm


@dataclass
class SFTConfig(TrainConfig):
    out: str = option("runs/sft", "run directory")
    model: str = option("runs/pretrain/model", "the model to fine-tune (hub id or save_pretrained directory)")
    tokenizer: str = option("", "tokenizer (default: the model's)")
    data: list[str] = option([], "conversation files or dataset ids")
    eval_data: list[str] = option([], "held-out conversations; default: --eval-fraction of --data")
    eval_fraction: float = option(0.05, "share of --data held out when no --eval-data is given", above=0.0, below=1.0)
    max_len: int = option(256, "longest example in tokens (longer ones are cut)", at_least=2)
    pack: bool = option(True, "pack each batch's conversations into shared rows, each attending to itself only "
                                 "(same loss as padding, less compute); else pad each batch to its longest")
    seq_len: int = option(256, "longest packed row in tokens", at_least=2)
    lora_r: int = option(0, "LoRA rank (0: train every weight)", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)
    max_steps: int = option(200, "optimizer steps to run", at_least=1)
    batch_size: int = option(64, "conversations per micro-batch per process", at_least=1)
    lr: float = option(1e-3, "peak learning rate (AdamW)", above=0.0)
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay", at_least=0)

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ConfigError("give --data FILE (repeat for several): the conversations to fine-tune on")
        if self.pack and self.seq_len < self.max_len:
            raise ConfigError(f"--seq-len ({self.seq_len}) must be at least --max-len ({self.max_len}) when packing")


def run(cfg: SFTConfig) -> LoopResult:
    """``moss-rlhf sft``."""
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    conversations, held_out = load_split(load_conversations, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                         "conversations in --data")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer else "--model")
    model = load_causal_lm(cfg.model)
    check_vocabulary(model, tokenizer)
    model = apply_lora(model, LoraOptions(cfg.lora_r, cfg.lora_alpha))
    train, evaluation = (conversation_data(tokenizer, data, cfg.max_len, cfg.pack, cfg.seq_len)
                         for data in (conversations, held_out))
    if dist.is_main:
        print(f"sft: {len(train)} training conversations with an assistant reply, {len(held_out)} held out")
    result = train_lm(cfg, model, tokenizer, train, target_loss, run_dir, dist,
                      evaluate=lm_evaluator(evaluation, target_loss, cfg, dist), desc="sft")
    if dist.is_main:
        print(f"sft: step {result.step}, train loss {result.train_loss:.3f} -> {Path(cfg.out) / 'model'}")
    return result
