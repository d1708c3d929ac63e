"""``moss-rlhf dpo``: offline preference optimisation — a policy trained directly on preference pairs, without a
reward model or RL: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") and the variants users reach for, each a ``--loss`` of ``losses.dpo_loss``: ``sigmoid`` (DPO, with
``--label-smoothing`` the conservative cDPO), ``robust`` (Chowdhury et al. 2024), ``ipo`` (Azar et al. 2023),
``hinge`` (SLiC), and the reference-free ``simpo`` (Meng et al. 2024) and ``orpo`` (Hong et al. 2024: the odds-ratio
term plus the SFT loss on the chosen reply).

The data are the reward model's: any preference file (``{prompt, chosen, rejected}``, HH-RLHF, MOSS-RLHF JSON, the
labelling app's export), each reply rendered as reward training and RL see it (ending at its turn end), its
log-prob summed over the reply's tokens only. The loop is the shared supervised one (``training.train_lm``):
gradient accumulation, clipping, bf16, LoRA, several processes, atomic checkpoints, exact resume. One step:

  1. before training, the frozen reference (``--reference``, default ``--model``; with LoRA the base the adapters
     start from) scores every pair once, without gradients, and is freed: training holds one model;
  2. each micro-batch pads its chosen and rejected replies together and runs the policy once over both, with the
     output projection at reply positions only;
  3. the loss, summed over pairs and divided by the global batch's pair count (accumulation and more processes equal
     one big batch);
  4. held-out pairs: loss, reward accuracy, the implicit rewards ``β (log π − log π_ref)`` of the chosen and the
     rejected reply and their margin, and both replies' mean token log-probs (the known failure where both fall).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import IGNORE, TokenData, pad_examples, reply_example
from moss_rlhf.data.formats import Preference, load_preferences
from moss_rlhf.data.splits import load_split
from moss_rlhf.losses import DPO_LOSSES, dpo_loss
from moss_rlhf.models import LoraOptions, apply_lora, check_vocabulary, final_hidden_states, load_causal_lm
from moss_rlhf.runs import RunDir
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import LoopResult, autocast, plain_output_head, train_lm

REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig(TrainConfig):
    out: str = option("runs/dpo", "run directory")
    model: str = option("runs/sft/model", "the policy starts here (usually the SFT model)")
    reference: str = option("", "frozen reference model (default: --model; unused by simpo and orpo)")
    tokenizer: str = option("", "tokenizer (default: the model's)")
    data: list[str] = option([], "preference files ({prompt, chosen, rejected}, HH-RLHF, MOSS-RLHF JSON, or "
                                 "`moss-rlhf feedback export` output)")
    eval_data: list[str] = option([], "held-out preference files; default: --eval-fraction of --data")
    eval_fraction: float = option(0.1, "share of --data held out when no --eval-data is given", above=0.0, below=1.0)
    loss: str = option("sigmoid", "sigmoid (DPO; cDPO with --label-smoothing), robust, ipo, hinge (SLiC), simpo, "
                                  "orpo", choices=DPO_LOSSES)
    beta: float = option(0.1, "β: the KL strength of DPO/IPO/hinge, SimPO's reward scale, ORPO's λ", above=0.0)
    label_smoothing: float = option(0.0, "ε: the share of labels taken as flipped (sigmoid: cDPO; robust; simpo)",
                                    at_least=0.0, below=0.5)
    simpo_gamma: float = option(0.5, "SimPO's target reward margin γ", at_least=0.0)
    max_len: int = option(256, "longest prompt + reply in tokens (the prompt is cut from the left)", at_least=2)
    max_steps: int = option(200, "optimizer steps to run", at_least=1)
    batch_size: int = option(8, "pairs per micro-batch per process", at_least=1)
    lr: float = option(5e-6, "peak learning rate (AdamW)", above=0.0)
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay", at_least=0)
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)", at_least=0)
    lora_r: int = option(0, "LoRA rank (0: train every weight); the reference is then the base", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)

    def check(self) -> None:
        if not self.data:
            raise ConfigError("give --data PREFERENCES.jsonl (e.g. written by `moss-rlhf feedback export`)")


def reply_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its reply tokens (``labels`` not IGNORE) ``[B]`` and their count ``[B]``; the
    output projection runs at those positions only where the model allows it."""
    targets = batch["labels"][:, 1:]
    counted = targets != IGNORE
    head = plain_output_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][counted]
    else:
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=1)
        logits = head(hidden[:, :-1][counted])
    # one fused kernel over the [reply tokens, V] block (token_logprobs loops over rows: here, one per token)
    token_lp = -torch.nn.functional.cross_entropy(logits.float(), targets[counted], reduction="none")
    rows = counted.nonzero()[:, 0]
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=token_lp.device).index_add(0, rows, token_lp)
    return sums, counted.sum(1)


class PairData:
    """Preference pairs as chosen and rejected reply examples, with the reference's log-probs once scored."""

    def __init__(self, tokenizer, prefs: list[Preference], max_len: int):
        self.pad_id = tokenizer.pad_token_id
        self.pairs = [(reply_example(tokenizer, p.prompt, p.chosen, max_len),
                       reply_example(tokenizer, p.prompt, p.rejected, max_len)) for p in prefs]
        self.reference = torch.zeros(len(prefs), 2)  # [chosen, rejected] summed log-probs

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # chosen rows first, then rejected rows: one forward pass over both
        out = pad_examples([self.pairs[i][0] for i in indices] + [self.pairs[i][1] for i in indices], self.pad_id)
        out["reference"] = self.reference[indices]
        out["n_targets"] = torch.tensor(len(indices))
        return out

    def token_data(self) -> TokenData:
        return TokenData(len(self), self.batch)

    @torch.no_grad()
    def score_reference(self, reference, batch_size: int, device: torch.device, precision: str) -> None:
        reference.eval()
        for start in range(0, len(self), batch_size):
            indices = list(range(start, min(start + batch_size, len(self))))
            batch = {k: v.to(device) for k, v in self.batch(indices).items()}
            with autocast(device, precision):
                sums, _ = reply_logprobs(reference, batch)
            self.reference[indices] = torch.stack(sums.float().cpu().chunk(2), 1)


class PreferenceLoss:
    """``losses.dpo_loss`` summed over the pairs of a micro-batch (ORPO: plus each pair's mean chosen-token NLL), so
    that accumulation equals one big batch; ``forward`` also returns what the evaluation reports."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch)[0].sum()

    def forward(self, model, batch):
        sums, counts = reply_logprobs(model, batch)
        n = sums.shape[0] // 2
        ref = batch["reference"].to(sums.device)
        cfg = self.cfg
        loss, margin = dpo_loss(cfg.loss, sums[:n], sums[n:], ref[:, 0], ref[:, 1], cfg.beta,
                                chosen_len=counts[:n].float(), rejected_len=counts[n:].float(),
                                label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma)
        if cfg.loss == "orpo":
            loss = loss - sums[:n] / counts[:n].clamp(min=1)  # ORPO's L_SFT: the chosen reply's mean token NLL
        return loss, margin, sums, counts, ref


def pair_evaluator(data: PairData, loss_fn: PreferenceLoss, cfg: DPOConfig, dist: distributed.Dist):
    """Held-out loss, reward accuracy (ties count half), implicit rewards and margin, mean token log-probs."""
    names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=dist.device)
        indices = list(range(dist.rank, len(data), dist.world_size))
        for start in range(0, len(indices), cfg.batch_size):
            batch = {k: v.to(dist.device) for k, v in data.batch(indices[start:start + cfg.batch_size]).items()}
            with autocast(dist.device, cfg.precision):
                loss, margin, sums, counts, ref = loss_fn.forward(model, batch)
            n = margin.shape[0]
            rewards = cfg.beta * (sums - ref.T.reshape(-1))
            per_token = sums / counts.clamp(min=1)
            totals += torch.stack([loss.sum(), (margin > 0).sum() + 0.5 * (margin == 0).sum(), margin.sum(),
                                   rewards[:n].sum(), rewards[n:].sum(), per_token[:n].sum(), per_token[n:].sum(),
                                   torch.tensor(float(n), device=dist.device)]).double()
        distributed.all_reduce_sum(totals)
        count = totals[-1].clamp(min=1)
        return {f"eval/{name}": float(totals[i] / count) for i, name in enumerate(names)}

    return evaluate


def run(cfg: DPOConfig) -> LoopResult:
    """``moss-rlhf dpo``."""
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    prefs, held_out = load_split(load_preferences, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                 "preference pairs in --data")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer else "--model")
    train, evaluation = PairData(tokenizer, prefs, cfg.max_len), PairData(tokenizer, held_out, cfg.max_len)
    if cfg.loss not in REFERENCE_FREE:  # scored once, before the policy exists: one model in memory at a time
        reference = load_causal_lm(cfg.reference or cfg.model, flag="--reference" if cfg.reference else "--model")
        reference.to(dist.device)
        for data in (train, evaluation):
            data.score_reference(reference, 2 * cfg.batch_size, dist.device, cfg.precision)
        del reference
    model = load_causal_lm(cfg.model)
    check_vocabulary(model, tokenizer)
    model = apply_lora(model, LoraOptions(cfg.lora_r, cfg.lora_alpha))
    loss_fn = PreferenceLoss(cfg)
    if dist.is_main:
        print(f"dpo: loss {cfg.loss} (β {cfg.beta:g}); {len(train)} training pairs, {len(evaluation)} held out; "
              f"from {cfg.model}" + ("" if cfg.loss in REFERENCE_FREE else
                                     f", reference {cfg.reference or cfg.model} scored once"))
    result = train_lm(cfg, model, tokenizer, train.token_data(), loss_fn, run_dir, dist,
                      evaluate=pair_evaluator(evaluation, loss_fn, cfg, dist), desc="dpo")
    if dist.is_main and result.eval_metrics:
        m = result.eval_metrics
        print(f"dpo: held-out reward accuracy {m['eval/accuracy']:.3f}, margin {m['eval/margin']:.3f}, chosen / "
              f"rejected log-prob per token {m['eval/chosen_logp']:.3f} / {m['eval/rejected_logp']:.3f} "
              f"-> {run_dir.model_path}")
    return result
