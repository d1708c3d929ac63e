"""Self-supervised pretraining: the causal-LM objective on packed sequences (default), or the masked-LM objective
(BERT's 80/10/10 masking of 15% of tokens) for encoder models.

Reads text files (``{"text"}`` JSONL, ``.txt``, parquet, a ``datasets`` directory or hub id; conversation records are
rendered with the chat template, as in mid-training on chats); trains a tokenizer if
none is given; builds the model from a preset or loads a checkpoint; then runs
the shared loop (``training.train_lm``): AdamW, warm-up + cosine, accumulation, clipping, bf16, evaluation,
checkpoints and exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import IGNORE, TokenData
from moss_rlhf.data.corpus import corpus_texts
from moss_rlhf.data.formats import load_documents
from moss_rlhf.data.splits import load_split
from moss_rlhf.models import check_vocabulary
from moss_rlhf.runs import RunDir
from moss_rlhf.training import LoopResult, causal_loss, lm_evaluator, train_lm


@dataclass
class PretrainConfig(TrainConfig):
    out: str = option("runs/pretrain", "run directory")
    data: list[str] = option([], "training text files or dataset ids ({\"text\"} records; conversation records are "
                                 "rendered with the chat template)")
    eval_data: list[str] = option([], "held-out text files; default: --eval-fraction of --data")
    eval_fraction: float = option(0.02, "share of --data documents held out when no --eval-data is given",
                                  above=0.0, below=1.0)
    model: str = option("tiny", "a size preset (tiny, mini, small, base), a config.json path, or a model to continue "
                                "(hub id or save_pretrained directory)")
    tokenizer: str = option("", "tokenizer to use (hub id or directory); default: the model's own, or train one")
    vocab_size: int = option(4096, "vocabulary size when a tokenizer is trained", at_least=263)
    objective: str = option("clm", "clm (causal LM, decoder) or mlm (masked LM, encoder)", choices=("clm", "mlm"))
    mlm_probability: float = option(0.15, "share of tokens masked for the mlm objective", above=0.0, below=1.0)
    seq_len: int = option(128, "tokens per packed training sequence", at_least=2)
    max_steps: int = option(300, "optimizer steps to run", at_least=1)
    batch_size: int = option(32, "sequences per micro-batch per process", at_least=1)
    lr: float = option(3e-3, "peak learning rate (AdamW)", above=0.0)

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ConfigError("give --data FILE (repeat for several): the text to pretrain on")


def prepare_tokenizer(cfg: PretrainConfig):
    from moss_rlhf.models import PRESETS
    from moss_rlhf.tokenizer import load_tokenizer, train_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.model not in PRESETS and not cfg.model.endswith(".json"):
        return load_tokenizer(cfg.model, "--model")
    return train_tokenizer(corpus_texts(cfg.data), cfg.vocab_size)


def prepare_model(cfg: PretrainConfig, tokenizer):
    from moss_rlhf.models import PRESETS, build_causal_lm, build_masked_lm, load_causal_lm

    if cfg.objective == "mlm":
        return build_masked_lm(cfg.model if cfg.model in PRESETS else "tiny", tokenizer, cfg.seed)
    if cfg.model in PRESETS or cfg.model.endswith(".json"):
        return build_causal_lm(cfg.model, tokenizer, cfg.seed)
    return load_causal_lm(cfg.model)


def causal_data(rows: torch.Tensor) -> TokenData:
    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        ids = rows[indices]
        return {"input_ids": ids, "labels": ids, "n_targets": torch.tensor(ids[:, 1:].numel())}

    return TokenData(len(rows), batch)


def masked_data(rows: torch.Tensor, tokenizer, probability: float, seed: int) -> TokenData:
    """BERT masking, seeded per row and epoch-independent so that resume and multi-process runs agree."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        ids = rows[indices].clone()
        labels = ids.clone()
        g = torch.Generator().manual_seed(seed * 7919 + sum(indices) * 31 + len(indices))
        chosen = (torch.rand(ids.shape, generator=g) < probability) & ~torch.isin(ids, special)
        labels[~chosen] = IGNORE
        roll = torch.rand(ids.shape, generator=g)
        ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        ids[swap] = torch.randint(len(tokenizer), ids.shape, generator=g)[swap]
        return {"input_ids": ids, "labels": labels, "n_targets": chosen.sum()}

    return TokenData(len(rows), batch)


def masked_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def run(cfg: PretrainConfig) -> LoopResult:
    """``moss-rlhf pretrain``."""
    from moss_rlhf.data.collate import pack_texts

    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    texts, eval_texts = load_split(load_documents, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                   "documents in --data")

    tokenizer = prepare_tokenizer(cfg)
    model = prepare_model(cfg, tokenizer)
    if cfg.objective == "clm":
        check_vocabulary(model, tokenizer)
    train_rows = pack_texts(tokenizer, texts, cfg.seq_len)
    eval_rows = pack_texts(tokenizer, eval_texts, cfg.seq_len)
    if cfg.objective == "mlm":
        train, evaluation = (masked_data(train_rows, tokenizer, cfg.mlm_probability, cfg.seed),
                             masked_data(eval_rows, tokenizer, cfg.mlm_probability, cfg.seed + 1))
        loss_fn = masked_loss
    else:
        train, evaluation, loss_fn = causal_data(train_rows), causal_data(eval_rows), causal_loss
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretrain: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, {len(train_rows)} sequences × "
              f"{cfg.seq_len} tokens ({train_rows.numel() / 1e6:.2f}M tokens), {len(eval_rows)} held out")
    result = train_lm(cfg, model, tokenizer, train, loss_fn, run_dir, dist,
                      evaluate=lm_evaluator(evaluation, loss_fn, cfg, dist), desc="pretrain")
    if dist.is_main:
        print(f"pretrain: step {result.step}, train loss {result.train_loss:.3f}, eval loss "
              f"{result.eval_loss if result.eval_loss is None else round(result.eval_loss, 3)} -> "
              f"{Path(cfg.out) / 'model'}")
    return result
