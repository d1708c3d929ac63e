"""``moss-rlhf dpo``: offline preference optimisation — a policy trained directly on human judgements, without a
reward model or RL: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") and the variants users reach for, each a ``--loss``: ``sigmoid`` (DPO, with ``--label-smoothing`` the
conservative cDPO), ``robust`` (Chowdhury et al. 2024), ``ipo`` (Azar et al. 2023), ``hinge`` (SLiC), the
reference-free ``simpo`` (Meng et al. 2024) and ``orpo`` (Hong et al. 2024: the odds-ratio term plus the SFT loss on
the chosen reply), all from ``losses.dpo_loss`` on pairs; and ``kto`` (Ethayarajh et al. 2024, ``losses.kto_loss``)
on unpaired desirable / undesirable replies.

The data are the reward model's: any preference file (``{prompt, chosen, rejected}``, HH-RLHF, MOSS-RLHF JSON, the
labelling app's export); KTO also reads ``{prompt, completion, label}`` records (``moss-rlhf feedback export
--kto-out``: ratings and "both bad" judgements) and takes a pair as a desirable and an undesirable reply. Each reply
is rendered as reward training and RL see it (ending at its turn end), its log-prob summed over its tokens only.
The loop is the shared supervised one (``training.train_lm``): accumulation, clipping, bf16, LoRA, several
processes, atomic checkpoints, exact resume. One step:

  1. before training, the frozen reference (``--reference``, default ``--model``; with LoRA the base the adapters
     start from) scores every reply once, without gradients, each process its share (``--precompute-ref FILE``
     keeps the scores for the next run on the same data), and is freed unless the KL monitor needs it;
  2. (KTO) the policy scores the global batch's mismatched pairs — each prompt with another record's reply —
     without gradients: the reference point ``z0 = max(0, KL estimate)`` of the whole batch;
  3. each micro-batch pads its replies together (chosen and rejected: one forward over both), with the output
     projection at reply positions only; the loss is summed over records and divided by the global batch's record
     count (accumulation and more processes equal one big batch);
  4. held-out records: loss, reward accuracy, the implicit rewards ``β (log π − log π_ref)`` of the chosen (or
     desirable) and rejected (undesirable) replies and their margin, both kinds' mean token log-probs (the known
     failure where both fall), and KL(π ‖ π_ref) on the policy's own replies to held-out prompts.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import IGNORE, Example, TokenData, mismatched_partners, pad_examples, reply_example
from moss_rlhf.data.formats import LabelledReply, Preference, load_labelled_records, load_preferences
from moss_rlhf.data.splits import load_split
from moss_rlhf.evaluate import kl_on_prompts
from moss_rlhf.files import atomic_write_bytes
from moss_rlhf.losses import DPO_LOSSES, dpo_loss, kto_loss, kto_reference_point
from moss_rlhf.models import (LoraOptions, apply_lora, check_vocabulary, disable_dropout, final_hidden_states,
                              load_causal_lm)
from moss_rlhf.runs import RunDir
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import LoopResult, autocast, plain_output_head, train_lm

LOSSES = (*DPO_LOSSES, "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig(TrainConfig):
    out: str = option("runs/dpo", "run directory")
    model: str = option("runs/sft/model", "the policy starts here (usually the SFT model)")
    reference: str = option("", "frozen reference model (default: --model; simpo and orpo train without one)")
    tokenizer: str = option("", "tokenizer (default: the model's)")
    data: list[str] = option([], "preference files ({prompt, chosen, rejected}, HH-RLHF, MOSS-RLHF JSON, or "
                                 "`moss-rlhf feedback export` output); kto also {prompt, completion, label} records")
    eval_data: list[str] = option([], "held-out files of the same kinds; default: --eval-fraction of --data")
    eval_fraction: float = option(0.1, "share of --data held out when no --eval-data is given", above=0.0, below=1.0)
    loss: str = option("sigmoid", "sigmoid (DPO; cDPO with --label-smoothing), robust, ipo, hinge (SLiC), simpo, "
                                  "orpo, kto (unpaired replies)", choices=LOSSES)
    beta: float = option(0.1, "β: the KL strength of DPO/IPO/hinge/KTO, SimPO's reward scale, ORPO's λ", above=0.0)
    label_smoothing: float = option(0.0, "ε: the share of labels taken as flipped (sigmoid: cDPO; robust; simpo)",
                                    at_least=0.0, below=0.5)
    simpo_gamma: float = option(0.5, "SimPO's target reward margin γ", at_least=0.0)
    desirable_weight: float = option(1.0, "KTO's λ_D, the weight of desirable replies", above=0.0)
    undesirable_weight: float = option(1.0, "KTO's λ_U, the weight of undesirable replies", above=0.0)
    max_len: int = option(256, "longest prompt + reply in tokens (the prompt is cut from the left)", at_least=2)
    max_steps: int = option(200, "optimizer steps to run", at_least=1)
    batch_size: int = option(8, "pairs (kto: replies) per micro-batch per process", at_least=1)
    lr: float = option(5e-6, "peak learning rate (AdamW)", above=0.0)
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay", at_least=0)
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)", at_least=0)
    kl_prompts: int = option(32, "held-out prompts the KL monitor samples a reply to at each evaluation (0: no KL "
                                 "monitor, and no reference kept in memory)", at_least=0, free_on_resume=True)
    kl_max_new_tokens: int = option(64, "longest reply the KL monitor samples", at_least=1, free_on_resume=True)
    precompute_ref: str = option("", "file of the reference's log-probs: read when it matches this run's reference "
                                     "and data, else computed and written there", free_on_resume=True)
    lora_r: int = option(0, "LoRA rank (0: train every weight); the reference is then the base", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ConfigError("give --data PREFERENCES.jsonl (e.g. written by `moss-rlhf feedback export`)")


def reply_logprobs(model, batch: dict[str, torch.Tensor], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its reply tokens (``labels`` not IGNORE) ``[B]`` and their count ``[B]``; the
    output projection runs at those positions only where the model allows it. ``prefix`` picks other rows of the
    batch (``kl_``: KTO's mismatched pairs)."""
    input_ids, mask = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
    targets = batch[prefix + "labels"][:, 1:]
    counted = targets != IGNORE
    head = plain_output_head(model)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][counted]
    else:
        logits = head(final_hidden_states(model, input_ids, mask, logits_to_keep=1)[:, :-1][counted])
    # one fused kernel over the [reply tokens, V] block (token_logprobs loops over rows: here, one per token)
    token_lp = -torch.nn.functional.cross_entropy(logits.float(), targets[counted], reduction="none")
    rows = counted.nonzero()[:, 0]
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=token_lp.device).index_add(0, rows, token_lp)
    return sums, counted.sum(1)


class ReplyRows:
    """Records of two reply rows each — a pair's chosen and rejected reply, or (KTO) a reply and its mismatched
    pair — and the reference's summed log-probs of both, ``reference [N, 2]``, once scored."""

    def __init__(self, rows: list[tuple[Example, Example]], pad_id: int, prompts: list[list[dict]]):
        self.rows, self.pad_id, self.prompts = rows, pad_id, prompts
        self.reference = torch.zeros(len(rows), 2)

    def __len__(self) -> int:
        return len(self.rows)

    def both(self, indices: list[int], prefix: str = "") -> dict[str, torch.Tensor]:
        """The first rows of ``indices``, then their second rows, padded together."""
        out = pad_examples([self.rows[i][0] for i in indices] + [self.rows[i][1] for i in indices], self.pad_id)
        return {prefix + k: v for k, v in out.items()}

    def token_data(self) -> TokenData:
        return TokenData(len(self), self.batch)

    @torch.no_grad()
    def score_reference(self, reference, batch_size: int, dist: distributed.Dist, precision: str) -> None:
        """Each process scores its share of the records (a sharded reference in lockstep, its dummy batches
        dropped) and the shares are summed, so every process holds every record's log-probs."""
        reference.eval()
        scores = torch.zeros(len(self), 2, device=dist.device)
        for indices in distributed.shard_batches(len(self), batch_size, dist, reference):
            batch = {k: v.to(dist.device) for k, v in self.both(indices or [0]).items()}
            with autocast(dist.device, precision):
                sums, _ = reply_logprobs(reference, batch)
            if indices is not None:
                scores[indices] = torch.stack(sums.float().chunk(2), 1)
        self.reference = distributed.all_reduce_sum(scores).cpu()  # each record scored by one process, 0 elsewhere


class PairData(ReplyRows):
    """Preference pairs: a micro-batch is its chosen rows, then its rejected rows (one forward over both)."""

    def __init__(self, tokenizer, prefs: list[Preference], max_len: int):
        super().__init__([(reply_example(tokenizer, p.prompt, p.chosen, max_len),
                           reply_example(tokenizer, p.prompt, p.rejected, max_len)) for p in prefs],
                         tokenizer.pad_token_id, [p.prompt for p in prefs])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {**self.both(indices), "reference": self.reference[indices], "n_targets": torch.tensor(len(indices))}


class UnpairedData(ReplyRows):
    """KTO's replies, each with its mismatched pair: its prompt with the reply of the next record in a seeded cycle
    whose prompt differs. Fixed per record, so the batch's KL estimate does not depend on how records are split into
    micro-batches and processes."""

    def __init__(self, tokenizer, replies: list[LabelledReply], max_len: int, seed: int):
        partner = mismatched_partners([r.prompt for r in replies], seed)
        super().__init__([(reply_example(tokenizer, r.prompt, r.reply, max_len),
                           reply_example(tokenizer, r.prompt, replies[partner[i]].reply, max_len))
                          for i, r in enumerate(replies)], tokenizer.pad_token_id, [r.prompt for r in replies])
        self.desirable = torch.tensor([r.desirable for r in replies], dtype=torch.bool)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        replies = pad_examples([self.rows[i][0] for i in indices], self.pad_id)
        mismatched = pad_examples([self.rows[i][1] for i in indices], self.pad_id)
        return {**replies, **{"kl_" + k: v for k, v in mismatched.items()}, "reference": self.reference[indices],
                "desirable": self.desirable[indices], "n_targets": torch.tensor(len(indices))}


def kto_batch_point(model, micro_batches: list[dict], device: torch.device, precision: str,
                    counted: list[bool] | None = None) -> dict:
    """KTO's reference point over the whole global batch: the policy's and the reference's summed log-probs of the
    mismatched pairs of every micro-batch of every process, without gradients (``train_lm``'s step constants);
    ``counted``: False for a dummy micro-batch (see ``distributed.shard_batches``)."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for mb, counts in zip(micro_batches, counted or [True] * len(micro_batches)):
            with autocast(device, precision):
                sums, _ = reply_logprobs(model, {k: v.to(device) for k, v in mb.items() if k.startswith("kl_")}, "kl_")
            if counts:
                totals += torch.stack([sums.sum().double(), mb["reference"][:, 1].sum().double().to(device),
                                       torch.tensor(float(len(sums)), dtype=torch.float64, device=device)])
    distributed.all_reduce_sum(totals)
    return {"reference_point": kto_reference_point(*totals)}


class PreferenceLoss:
    """The ``--loss`` summed over the records of a micro-batch (ORPO: plus each pair's mean chosen-token NLL), so
    that accumulation equals one big batch; ``forward`` also returns what the evaluation reports."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch)[0].sum()

    def forward(self, model, batch):
        """Per-record loss, a margin whose sign says "right" (pairs: chosen above rejected; KTO: the implicit reward
        on the label's side of the reference point), the rows' summed log-probs and counts, and the implicit
        rewards ``β (log π − log π_ref)`` of the first rows and the second (KTO: desirable, undesirable)."""
        cfg = self.cfg
        sums, counts = reply_logprobs(model, batch)
        ref = batch["reference"].to(sums.device)
        if cfg.loss == "kto":
            desirable = batch["desirable"]
            loss, r = kto_loss(sums, ref[:, 0], desirable, batch["reference_point"], cfg.beta, cfg.desirable_weight,
                               cfg.undesirable_weight)
            margin = torch.where(desirable, r - batch["reference_point"], batch["reference_point"] - r)
            return loss, margin, sums, counts, cfg.beta * r, desirable
        n = sums.shape[0] // 2
        loss, margin = dpo_loss(cfg.loss, sums[:n], sums[n:], ref[:, 0], ref[:, 1], cfg.beta,
                                chosen_len=counts[:n].float(), rejected_len=counts[n:].float(),
                                label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma)
        if cfg.loss == "orpo":
            loss = loss - sums[:n] / counts[:n].clamp(min=1)  # ORPO's L_SFT: the chosen reply's mean token NLL
        first = torch.arange(2 * n, device=sums.device) < n
        return loss, margin, sums, counts, cfg.beta * (sums - ref.T.reshape(-1)), first


def preference_evaluator(data: ReplyRows, loss_fn: PreferenceLoss, cfg: DPOConfig, dist: distributed.Dist,
                         reference, tokenizer):
    """Held-out loss, reward accuracy (ties count half), implicit rewards and margin, mean token log-probs, and the
    sampled KL to the reference on the first ``--kl-prompts`` distinct held-out prompts."""
    names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")
    kto = cfg.loss == "kto"

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        shares = distributed.shard_batches(len(data), cfg.batch_size, dist, model)
        chunks = [data.batch(rows or [0]) for rows in shares]  # None: a dummy that keeps sharded processes in step
        shared = kto_batch_point(model, chunks, dist.device, cfg.precision, [r is not None for r in shares]) \
            if kto else {}
        totals = torch.zeros(len(names) + 3, dtype=torch.float64, device=dist.device)
        for chunk, rows in zip(chunks, shares):
            batch = {**{k: v.to(dist.device) for k, v in chunk.items()}, **shared}
            with autocast(dist.device, cfg.precision):
                loss, margin, sums, counts, rewards, first = loss_fn.forward(model, batch)
            if rows is None:
                continue
            per_token = sums / counts.clamp(min=1)
            totals += torch.stack([loss.sum(), (margin > 0).sum() + 0.5 * (margin == 0).sum(),
                                   rewards[first].sum() - rewards[~first].sum() if kto else margin.sum(),
                                   rewards[first].sum(), rewards[~first].sum(), per_token[first].sum(),
                                   per_token[~first].sum(), torch.tensor(float(len(margin)), device=dist.device),
                                   first.sum(), (~first).sum()]).double()
        distributed.all_reduce_sum(totals)
        records, n_first, n_second = (totals[-3:]).clamp(min=1).tolist()
        divisors = [records, records, records, n_first, n_second, n_first, n_second]
        if kto:  # the margin of KTO: mean desirable minus mean undesirable implicit reward
            totals[2] = totals[3] / n_first - totals[4] / n_second
            divisors[2] = 1.0
        metrics = {f"eval/{name}": float(totals[i] / divisors[i]) for i, name in enumerate(names)}
        if kto:
            metrics["eval/reference_point"] = float(shared["reference_point"])
        distinct = list({str(p): p for p in data.prompts}.values())[:cfg.kl_prompts]
        return {**metrics, **kl_on_prompts(model, reference, tokenizer, distinct, max_new_tokens=cfg.kl_max_new_tokens,
                                           max_len=cfg.max_len, batch_size=cfg.batch_size, seed=cfg.seed, dist=dist)}

    return evaluate


def reference_fingerprint(name: str, datasets: list[ReplyRows]) -> str:
    """What the reference's log-probs depend on: the reference (its path and its weight files' sizes and times, or
    its hub id) and every scored row's tokens."""
    digest = hashlib.sha256(str(Path(name).resolve() if Path(name).exists() else name).encode())
    for f in sorted(Path(name).glob("*")) if Path(name).is_dir() else []:
        if f.suffix in (".safetensors", ".bin", ".json"):
            digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    for data in datasets:
        digest.update(f"|{len(data)}|".encode())
        for first, second in data.rows:
            digest.update(repr((first.input_ids, first.labels, second.input_ids, second.labels)).encode())
    return digest.hexdigest()


def score_references(cfg: DPOConfig, datasets: list[ReplyRows], dist: distributed.Dist):
    """Fill every data set's ``reference`` log-probs (from ``--precompute-ref`` when it matches; none for a
    reference-free loss); returns the reference model when the KL monitor needs it in memory, else None."""
    if cfg.loss in REFERENCE_FREE:  # the monitor's reference: the start model (with LoRA: the base, no copy)
        return load_reference(cfg, dist) if cfg.kl_prompts and not cfg.lora_r else None
    keep = cfg.kl_prompts > 0 and not (cfg.lora_r and not cfg.reference)
    cache = Path(cfg.precompute_ref) if cfg.precompute_ref else None
    fingerprint = reference_fingerprint(cfg.reference or cfg.model, datasets) if cache else ""
    if cache and cache.exists():
        try:
            stored = torch.load(cache, weights_only=True)
        except Exception as e:
            stored = type(e).__name__
        if not isinstance(stored, dict) or "fingerprint" not in stored:  # another file: never written over
            why = stored if isinstance(stored, str) else "no fingerprint"
            raise ConfigError(f"--precompute-ref {cache}: exists and is not a file of reference log-probs ({why}); "
                              f"give another path, or delete it to score afresh")
        if stored.get("fingerprint") == fingerprint:
            for data, reference in zip(datasets, stored["reference"]):
                data.reference = reference
            if dist.is_main:
                print(f"dpo: reference log-probs read from {cache}")
            return load_reference(cfg, dist) if keep else None
        if dist.is_main and stored:
            print(f"dpo: {cache} holds another reference's or other data's log-probs: scoring again")
    reference = load_reference(cfg, dist)
    for data in datasets:
        data.score_reference(reference, 2 * cfg.batch_size, dist, cfg.precision)
    if cache and dist.is_main:
        buffer = io.BytesIO()
        torch.save({"fingerprint": fingerprint, "reference": [d.reference for d in datasets]}, buffer)
        atomic_write_bytes(cache, buffer.getvalue())
    return reference if keep else None


def load_reference(cfg: DPOConfig, dist: distributed.Dist):
    """The frozen reference (``--reference``, default ``--model``) on the device, sharded under ``--parallel fsdp``
    as every frozen model is."""
    reference = load_causal_lm(cfg.reference or cfg.model, flag="--reference" if cfg.reference else "--model")
    reference.to(dist.device).eval().requires_grad_(False)
    return distributed.shard(reference, dist, cfg.cpu_offload, cfg.precision) if cfg.parallel == "fsdp" else reference


def load_data(cfg: DPOConfig, tokenizer) -> tuple[ReplyRows, ReplyRows]:
    """Training and held-out records: pairs, or (KTO) labelled replies split by record."""
    if cfg.loss != "kto":
        prefs, held_out = load_split(load_preferences, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                     "preference pairs in --data")
        return PairData(tokenizer, prefs, cfg.max_len), PairData(tokenizer, held_out, cfg.max_len)
    records, held_out = load_split(load_labelled_records, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                   "records in --data")
    return (UnpairedData(tokenizer, [r for record in records for r in record], cfg.max_len, cfg.seed),
            UnpairedData(tokenizer, [r for record in held_out for r in record], cfg.max_len, cfg.seed + 1))


def run(cfg: DPOConfig) -> LoopResult:
    """``moss-rlhf dpo``."""
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer else "--model")
    train, evaluation = load_data(cfg, tokenizer)
    # on every process: a one-sided data set stops them all
    balance = kto_balance(train.desirable, cfg) if cfg.loss == "kto" else ""
    # scored once, before the policy exists: one model in memory at a time, unless the KL monitor keeps it
    reference = score_references(cfg, [train, evaluation], dist)
    model = load_causal_lm(cfg.model)
    check_vocabulary(model, tokenizer)
    disable_dropout(model)  # the reference scored without dropout: so must the policy, or h ≠ 0 at the start
    model = apply_lora(model, LoraOptions(cfg.lora_r, cfg.lora_alpha))
    loss_fn = PreferenceLoss(cfg)
    if dist.is_main:
        what = "replies" if cfg.loss == "kto" else "pairs"
        print(f"dpo: loss {cfg.loss} (β {cfg.beta:g}); {len(train)} training {what}, {len(evaluation)} held out; "
              f"from {cfg.model}" + ("" if cfg.loss in REFERENCE_FREE else f", reference {cfg.reference or cfg.model}")
              + (f"; KL monitor on {cfg.kl_prompts} held-out prompts" if cfg.kl_prompts else ""))
        if balance:
            print(balance)
    # KTO: z0 of the whole global batch, before its first backward
    step_constants = partial(kto_batch_point, device=dist.device, precision=cfg.precision) if cfg.loss == "kto" else None
    result = train_lm(cfg, model, tokenizer, train.token_data(), loss_fn, run_dir, dist, desc="dpo",
                      evaluate=preference_evaluator(evaluation, loss_fn, cfg, dist, reference, tokenizer),
                      step_constants=step_constants, frozen={"reference": reference})
    if dist.is_main and result.eval_metrics:
        m = result.eval_metrics
        kinds = "desirable / undesirable" if cfg.loss == "kto" else "chosen / rejected"
        kl = f", KL to the reference {m['eval/kl_per_reply']:.3f} per reply" if "eval/kl_per_reply" in m else ""
        print(f"dpo: held-out reward accuracy {m['eval/accuracy']:.3f}, margin {m['eval/margin']:.3f}, {kinds} "
              f"log-prob per token {m['eval/chosen_logp']:.3f} / {m['eval/rejected_logp']:.3f}{kl} "
              f"-> {run_dir.model_path}")
    return result


def kto_balance(desirable: torch.Tensor, cfg: DPOConfig) -> str:
    """The paper's advice: λ_D n_D / (λ_U n_U) in [1, 4/3]; the weights that reach 1 when it is outside."""
    n_d, n_u = int(desirable.sum()), int((~desirable).sum())
    if not n_d or not n_u:
        raise ConfigError(f"kto needs desirable and undesirable replies; --data has {n_d} desirable, {n_u} "
                          f"undesirable")
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    line = f"dpo: kto: {n_d} desirable, {n_u} undesirable replies; λ_D n_D / (λ_U n_U) = {ratio:.2f}"
    if not 1.0 <= ratio <= 4 / 3:
        line += (f" (the paper advises 1 to 4/3: e.g. --desirable-weight {n_u / n_d * cfg.undesirable_weight:.3g})")
    return line
