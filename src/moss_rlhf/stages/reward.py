"""Reward model: a sequence scorer on top of a causal LM (score read at the last non-pad token), initialised from the
SFT model and trained on preference pairs with the Bradley–Terry loss (Ouyang et al. 2022; Stiennon et al. 2020):

    loss = -log σ(r_chosen - r_rejected - margin)

with the options MOSS-RLHF uses ("Secrets of RLHF in Large Language Models Part II: Reward Modeling", Wang et al.
2024): a margin from the annotators' strength of preference, label smoothing, and an auxiliary LM loss on the chosen
reply (weight β) that keeps the backbone a language model. Ties and "both bad" are not pairs; the feedback export
leaves them out. With pairs scored by ``moss-rlhf reward strength`` (an ensemble's preference strength), Part II's
treatments of noisy labels, each a switch: drop the weakest share, flip the labels below a threshold, soft labels,
an adaptive margin, reweighting by the ensemble's confidence; and its contrastive term (SimCSE-style InfoNCE on the
pairs' difference representations).

Each reply is rendered as PPO's rollouts and evaluation see it (``collate.reply_example``: ending at the reply's turn
end), and the score is read at that turn end. The result is a Hugging Face ``*ForSequenceClassification`` directory
(scorer head included) that the PPO stage loads as reward model and as the critic's initialisation; the held-out
pairs are written to ``OUT/held_out.jsonl``. The loop is the shared one (``training.train_lm``): accumulation,
clipping, bf16, checkpoints, exact resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.data.collate import IGNORE, Example, TokenData, pad_examples, reply_example
from moss_rlhf.data.formats import Preference, load_preferences, preference_record
from moss_rlhf.data.splits import load_split
from moss_rlhf.losses import bradley_terry_loss, info_nce
from moss_rlhf.models import check_vocabulary, final_hidden_states, load_causal_lm, load_scorer, score_head, unwrap
from moss_rlhf.runs import RunDir
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import LoopResult, autocast, train_lm


@dataclass
class RewardConfig(TrainConfig):
    out: str = option("runs/reward", "run directory")
    model: str = option("runs/sft/model", "initialise from this model (usually the SFT model)")
    tokenizer: str = option("", "tokenizer (default: the model's)")
    data: list[str] = option([], "preference files ({prompt, chosen, rejected[, margin]}, HH-RLHF, MOSS-RLHF JSON, "
                                 "or `moss-rlhf feedback export` output)")
    eval_data: list[str] = option([], "held-out preference files; default: --eval-fraction of --data")
    eval_fraction: float = option(0.1, "share of --data held out when no --eval-data is given", above=0.0, below=1.0)
    max_len: int = option(256, "longest prompt + reply in tokens (the prompt is cut from the left)", at_least=2)
    use_margin: bool = option(True, "subtract the pair's margin (annotator strength) inside the sigmoid")
    label_smoothing: float = option(0.0, "Bradley–Terry label smoothing ε in [0, 0.5)", at_least=0.0, below=0.5)
    lm_coef: float = option(0.0, "β: weight of the LM loss on the chosen reply (mean over its tokens, per pair)",
                            at_least=0.0)
    # Part II's treatments of the pairs by their preference strength (`moss-rlhf reward strength`), training pairs only
    drop_weakest: float = option(0.0, "leave out this share of the training pairs of lowest mean strength",
                                 at_least=0.0, below=1.0)
    flip_below: float | None = option(None, "flip the label of training pairs whose mean strength is below this "
                                            "(0: where the ensemble disagrees with the label)")
    soft_labels: bool = option(False, "train towards the ensemble's probability σ(mean strength) that the label is "
                                      "right, not towards 1")
    adaptive_margin: float = option(0.0, "add this × max(mean strength, 0) to each pair's margin", at_least=0.0)
    reweight: bool = option(False, "weight each pair by the ensemble's confidence |2σ(mean strength) − 1| "
                                   "(normalised to mean 1)")
    contrastive_weight: float = option(0.0, "weight of the SimCSE-style contrastive term on each pair's difference "
                                            "representation h(chosen) − h(rejected) (Part II; 0: off)", at_least=0.0)
    contrastive_temperature: float = option(0.05, "temperature τ of the contrastive term", above=0.0)
    contrastive_dropout: float = option(0.1, "feature dropout that makes the contrastive term's two views",
                                        above=0.0, below=1.0)
    max_steps: int = option(200, "optimizer steps to run", at_least=1)
    batch_size: int = option(16, "pairs per micro-batch per process", at_least=1)
    lr: float = option(1e-4, "peak learning rate (AdamW)", above=0.0)
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay", at_least=0)
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)", at_least=0)

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ConfigError("give --data PREFERENCES.jsonl (e.g. written by `moss-rlhf feedback export`)")


def pair_examples(tokenizer, pref: Preference, max_len: int) -> tuple[Example, Example]:
    """Chosen and rejected replies as token examples ending at their turn end (where the score is read); labels mark
    the reply (for the LM loss). Long ones keep their end."""
    return (reply_example(tokenizer, pref.prompt, pref.chosen, max_len),
            reply_example(tokenizer, pref.prompt, pref.rejected, max_len))


def uses_strength(cfg: RewardConfig) -> bool:
    return bool(cfg.drop_weakest or cfg.flip_below is not None or cfg.soft_labels or cfg.adaptive_margin
                or cfg.reweight)


def treat_by_strength(prefs: list[Preference], cfg: RewardConfig) -> tuple[list[Preference], dict[str, int]]:
    """Part II's treatments of noisy pairs, in this order: drop the ``--drop-weakest`` share of lowest mean strength,
    then flip the labels below ``--flip-below`` (a flipped pair's strength changes sign with it). Soft labels,
    adaptive margins and weights are read per pair in :func:`pair_data`."""
    if not uses_strength(cfg):
        return prefs, {}
    missing = sum(1 for p in prefs if p.strength_mean is None)
    if missing:
        raise ConfigError(f"--drop-weakest, --flip-below, --soft-labels, --adaptive-margin and --reweight need each "
                          f"pair's strength_mean; {missing} of {len(prefs)} pairs have none (score them with "
                          f"`moss-rlhf reward strength`)")
    kept = sorted(prefs, key=lambda p: p.strength_mean)[round(cfg.drop_weakest * len(prefs)):]
    kept_ids = {id(p) for p in kept}
    out, flipped = [], 0
    for p in (p for p in prefs if id(p) in kept_ids):  # the original order
        if cfg.flip_below is not None and p.strength_mean < cfg.flip_below:
            p = dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, strength_mean=-p.strength_mean)
            flipped += 1
        out.append(p)
    return out, {"dropped": len(prefs) - len(out), "flipped": flipped}


def pair_data(tokenizer, prefs: list[Preference], cfg: RewardConfig, training: bool = True) -> TokenData:
    """Token pairs with, per pair, its margin, its target probability that the chosen reply wins (1, or the
    ensemble's σ(mean strength) with ``--soft-labels``) and its weight (1, or the ensemble's confidence). Held-out
    pairs (``training=False``) are measured as labelled: no strength treatment."""
    pairs = [pair_examples(tokenizer, p, cfg.max_len) for p in prefs]
    margins = torch.tensor([p.margin if cfg.use_margin else 0.0 for p in prefs], dtype=torch.float32)
    targets, weights = torch.ones(len(prefs)), torch.ones(len(prefs))
    if training and uses_strength(cfg) and prefs:
        strength = torch.tensor([p.strength_mean for p in prefs], dtype=torch.float32)
        margins += cfg.adaptive_margin * strength.clamp(min=0)
        if cfg.soft_labels:
            targets = torch.sigmoid(strength)
        if cfg.reweight:
            confidence = (2 * torch.sigmoid(strength) - 1).abs()
            weights = confidence / confidence.mean().clamp(min=1e-8)

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        # chosen rows first, then rejected rows: one forward pass scores both
        padded = pad_examples([pairs[i][0] for i in indices] + [pairs[i][1] for i in indices],
                              tokenizer.pad_token_id)
        padded["margin"] = margins[indices]
        padded["target"], padded["weight"] = targets[indices], weights[indices]
        padded["n_targets"] = torch.tensor(len(indices))
        return padded

    return TokenData(len(pairs), batch)


class RewardLoss:
    """Bradley–Terry loss (+ β × the chosen reply's mean token LM loss), summed over the pairs of a batch: each pair
    contributes the same whatever else shares its micro-batch, so accumulation equals one big batch.

    With ``--contrastive-weight`` the SimCSE-style term of Part II joins it: each pair's difference representation
    (the final hidden states at the two replies' score positions, chosen minus rejected) is seen twice through
    independent feature dropout, and InfoNCE asks each view to pick its twin among the micro-batch's other pairs —
    so the representation the score head reads keeps pairs apart instead of collapsing onto one "easy" feature. Its
    negatives are the micro-batch's pairs, so this term (alone) depends on how a batch is split."""

    def __init__(self, cfg: RewardConfig, lm_head: torch.nn.Parameter | None):
        self.cfg = cfg
        self.lm_head = lm_head

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected, aux_sum, n_pairs = self.forward(model, batch)
        # a soft target p is label smoothing of 1 − p; --label-smoothing ε then smooths that target once more
        eps = self.cfg.label_smoothing
        smoothing = eps + (1 - 2 * eps) * (1 - batch["target"]) if "target" in batch else eps
        per_pair = bradley_terry_loss(chosen, rejected, batch["margin"], smoothing, reduction="none")
        loss = (per_pair * batch["weight"]).sum() if "weight" in batch else per_pair.sum()
        return loss + aux_sum

    def forward(self, model, batch):
        """Rewards of the chosen and the rejected replies, the auxiliary terms' weighted sum (LM, contrastive) and
        the pair count."""
        mask = batch["attention_mask"]
        hidden = final_hidden_states(model, batch["input_ids"], mask)
        values = score_head(unwrap(model))(hidden).squeeze(-1).float()
        last = mask.long().sum(-1) - 1  # right padding: the last real token
        rewards = values.gather(1, last[:, None]).squeeze(1)
        n = rewards.shape[0] // 2
        aux_sum = torch.zeros((), device=rewards.device)
        if self.cfg.contrastive_weight > 0 and torch.is_grad_enabled():
            at_score = hidden[torch.arange(2 * n, device=hidden.device), last].float()
            difference = at_score[:n] - at_score[n:]
            p = self.cfg.contrastive_dropout
            views = [torch.nn.functional.dropout(difference, p, training=True) for _ in range(2)]
            aux_sum = aux_sum + self.cfg.contrastive_weight * info_nce(*views, self.cfg.contrastive_temperature).sum()
        if self.lm_head is not None:
            targets = batch["labels"][:n, 1:]
            counted = targets != IGNORE
            # the projection at the reply's tokens only; each pair's token losses are averaged within the pair
            token_loss = torch.nn.functional.cross_entropy((hidden[:n, :-1][counted] @ self.lm_head.T).float(),
                                                           targets[counted], reduction="none")
            rows = counted.nonzero()[:, 0]
            per_pair = torch.zeros(n, device=rewards.device).index_add(0, rows, token_loss)
            aux_sum = aux_sum + self.cfg.lm_coef * (per_pair / counted.sum(1).clamp(min=1)).sum()
        return rewards[:n], rewards[n:], aux_sum, n


@torch.no_grad()
def score_pairs(model, tokenizer, prefs: list[Preference], max_len: int = 256, batch_size: int = 32,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected replies, ``([N], [N])``."""
    model.eval()
    cfg = RewardConfig(data=["-"], max_len=max_len, use_margin=False)
    data = pair_data(tokenizer, prefs, cfg)
    loss = RewardLoss(cfg, None)
    chosen, rejected = [], []
    for start in range(0, len(prefs), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(prefs)))))
        c, r, _, _ = loss.forward(model, {k: v.to(device) for k, v in batch.items()})
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def pair_evaluator(data: TokenData, loss_fn: RewardLoss, cfg: RewardConfig, dist: distributed.Dist):
    """Held-out accuracy (ties count half), mean reward gap and Bradley–Terry loss."""

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        totals = torch.zeros(4, device=dist.device)  # loss, correct, gap, pairs
        for rows in distributed.shard_batches(len(data), cfg.batch_size, dist, model):
            batch = {k: v.to(dist.device) for k, v in data.batch(rows or [0]).items()}
            with autocast(dist.device, cfg.precision):
                chosen, rejected, _, n = loss_fn.forward(model, batch)
            if rows is None:  # a dummy batch that keeps a sharded model's processes in step
                continue
            totals[0] += bradley_terry_loss(chosen, rejected, batch["margin"], cfg.label_smoothing, reduction="sum")
            totals[1] += (chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum()
            totals[2] += (chosen - rejected).sum()
            totals[3] += n
        distributed.all_reduce_sum(totals)
        n = totals[3].clamp(min=1)
        return {"eval/loss": float(totals[0] / n), "eval/accuracy": float(totals[1] / n),
                "eval/reward_gap": float(totals[2] / n)}

    return evaluate


def run(cfg: RewardConfig) -> LoopResult:
    """``moss-rlhf reward``."""
    dist = distributed.init(cfg.device)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    prefs, held_out = load_split(load_preferences, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                 "preference pairs in --data")
    prefs, treated = treat_by_strength(prefs, cfg)  # the held-out pairs keep their labels: measured as labelled
    if dist.is_main and treated:
        print(f"reward: strength: {treated['dropped']} weakest pairs left out, {treated['flipped']} labels flipped"
              + ("; soft labels" if cfg.soft_labels else "") + ("; reweighted" if cfg.reweight else "")
              + (f"; adaptive margin {cfg.adaptive_margin:g} × strength" if cfg.adaptive_margin else ""))
    if dist.is_main:
        atomic_write_text(run_dir.path / "held_out.jsonl", "".join(
            json.dumps(preference_record(p), ensure_ascii=False) + "\n" for p in held_out))
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer else "--model")
    model = load_scorer(cfg.model, tokenizer)
    check_vocabulary(model, tokenizer)
    lm_head = None
    if cfg.lm_coef > 0:
        lm = load_causal_lm(cfg.model)
        if getattr(lm.config, "tie_word_embeddings", False):
            lm_head = model.get_input_embeddings().weight  # tied: the scorer's own embeddings
        else:
            model.register_parameter("aux_lm_head", torch.nn.Parameter(lm.get_output_embeddings().weight.clone()))
            lm_head = model.aux_lm_head
        del lm
    loss_fn = RewardLoss(cfg, lm_head)
    train, evaluation = pair_data(tokenizer, prefs, cfg), pair_data(tokenizer, held_out, cfg, training=False)
    if dist.is_main:
        print(f"reward: {len(prefs)} training pairs, {len(held_out)} held out; from {cfg.model}")
    result = train_lm(cfg, model, tokenizer, train, loss_fn, run_dir, dist,
                      evaluate=pair_evaluator(evaluation, loss_fn, cfg, dist), desc="reward")
    if dist.is_main and result.eval_metrics:
        m = result.eval_metrics
        print(f"reward: held-out accuracy {m['eval/accuracy']:.3f}, reward gap {m['eval/reward_gap']:.3f} "
              f"-> {run_dir.model_path}")
    return result
