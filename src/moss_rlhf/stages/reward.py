"""Reward model: a sequence scorer on top of a causal LM (score read at the last non-pad token), initialised from the
SFT model and trained on preference pairs with the Bradley–Terry loss (Ouyang et al. 2022; Stiennon et al. 2020):

    loss = -log σ(r_chosen - r_rejected - margin)

with the options MOSS-RLHF uses ("Secrets of RLHF in Large Language Models Part II: Reward Modeling", Wang et al.
2024): a margin from the annotators' strength of preference, label smoothing, and an auxiliary LM loss on the chosen
reply (weight β) that keeps the backbone a language model. ``--likelihood-weight w`` adds w × the reply's mean
log-likelihood under the model's own LM head to its reward (SimPO's implicit reward, Meng et al. 2024): the SFT
model's knowledge of what a right reply says counts from the first step. Ties and "both bad" are not pairs; the
feedback export leaves them out. With pairs scored by ``moss-rlhf reward strength`` (an ensemble's preference
strength), Part II's treatments of noisy labels, each a switch: drop the weakest share, flip the labels below a
threshold, soft labels, an adaptive margin, reweighting by the ensemble's confidence; its contrastive terms on the
pairs' difference representations (SimCSE-style InfoNCE, or SwAV-style swapped prediction of Sinkhorn codes over
learned prototypes); and MetaRM (Dou et al. 2024, arXiv 2405.00438): with ``--meta-data`` (unlabelled replies of the
shifted policy, several per prompt) each step first takes a gradient ascent step on the reward model's ability to
tell those replies apart, and the preference loss is minimised at the adapted weights.

Each reply is rendered as PPO's rollouts and evaluation see it (``collate.reply_example``: ending at the reply's turn
end), and the score is read at that turn end. The result is a Hugging Face ``*ForSequenceClassification`` directory
(scorer head included) that the PPO stage loads as reward model and as the critic's initialisation; the held-out
pairs are written to ``OUT/held_out.jsonl``. The loop is the shared one (``training.train_lm``): accumulation,
clipping, bf16, checkpoints, exact resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.data.collate import IGNORE, Example, TokenData, pad_examples, reply_example
from moss_rlhf.data.formats import Preference, SampleGroup, load_preferences, load_sample_groups, preference_record
from moss_rlhf.data.splits import load_split
from moss_rlhf.losses import bradley_terry_loss, info_nce, reward_difference_objective, swav_loss
from moss_rlhf.models import (LIKELIHOOD_WEIGHT, base_model, check_vocabulary, final_hidden_states, likelihood_weight,
                               load_causal_lm, load_scorer, mean_reply_logprobs, reply_likelihood_bonus, score_head,
                               unwrap)
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
    likelihood_weight: float | None = option(None, "add this × the reply's mean log-likelihood under the model's LM "
                                                   "head to its score, saved with it (default: the --model's own, 0 "
                                                   "for an LM; needs tied embeddings)", at_least=0.0)
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
    contrastive_weight: float = option(0.0, "weight of the contrastive term on each pair's difference "
                                            "representation h(chosen) − h(rejected) (Part II; 0: off)", at_least=0.0)
    contrastive_method: str = option("simcse", "the contrastive term: simcse (InfoNCE between two views of each "
                                               "pair) or swav (each view predicts the other's Sinkhorn codes over "
                                               "learned prototypes)", choices=("simcse", "swav"))
    contrastive_temperature: float = option(0.05, "the contrastive term's temperature τ (SwAV: 0.1)", above=0.0)
    contrastive_dropout: float = option(0.1, "feature dropout making the contrastive term's views", above=0.0,
                                        below=1.0)
    swav_prototypes: int = option(16, "swav: number of prototypes (cluster centres, trained too)", at_least=2)
    swav_epsilon: float = option(0.05, "swav: Sinkhorn entropy ε of the codes (smaller: harder)", above=0.0)
    # MetaRM (Dou et al. 2024): the shifted policy's unlabelled replies keep the reward model discriminative there
    meta_data: list[str] = option([], "MetaRM's meta set: replies sampled from the shifted (RL) policy, {prompt, "
                                      "response} rows, at least 2 per prompt (`moss-rlhf generate --num-samples K "
                                      "--out FILE`); one process only")
    meta_lr: float = option(0.01, "MetaRM: the inner step size η of the gradient ascent on the difference objective",
                            above=0.0)
    meta_batch: int = option(4, "MetaRM: meta-set prompts (each with all its replies) per micro-batch; the meta "
                                "step is taken per micro-batch, so --grad-accum is not one big batch here",
                             at_least=1)
    meta_hvp_eps: float = option(0.01, "MetaRM: radius of the finite difference that gives the Hessian-vector "
                                       "product (relative to the gradient's norm)", above=0.0)
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


def pair_data(tokenizer, prefs: list[Preference], cfg: RewardConfig, training: bool = True,
              meta: list[SampleGroup] | None = None) -> TokenData:
    """Token pairs with, per pair, its margin, its target probability that the chosen reply wins (1, or the
    ensemble's σ(mean strength) with ``--soft-labels``) and its weight (1, or the ensemble's confidence). Held-out
    pairs (``training=False``) are measured as labelled: no strength treatment. With a ``meta`` set each batch also
    carries ``--meta-batch`` of its groups (chosen by the batch's first pair indices, so a resumed run sees the same
    ones), their replies one row each."""
    pairs = [pair_examples(tokenizer, p, cfg.max_len) for p in prefs]
    meta_rows = [[reply_example(tokenizer, g.prompt, r, cfg.max_len) for r in g.responses] for g in meta or []]
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
        if meta_rows:
            groups = [meta_rows[i % len(meta_rows)] for i in indices[:cfg.meta_batch]]
            rows = pad_examples([row for group in groups for row in group], tokenizer.pad_token_id)
            padded.update({f"meta_{k}": v for k, v in rows.items()})
            padded["meta_sizes"] = torch.tensor([len(group) for group in groups])
        return padded

    return TokenData(len(pairs), batch)


class RewardLoss:
    """Bradley–Terry loss (+ β × the chosen reply's mean token LM loss), summed over the pairs of a batch: each pair
    contributes the same whatever else shares its micro-batch, so accumulation equals one big batch.

    With ``--contrastive-weight`` a term of Part II joins it on each pair's difference representation (the final
    hidden states at the two replies' score positions, chosen minus rejected), seen twice through independent
    feature dropout: SimCSE's InfoNCE asks each view to pick its twin among the micro-batch's other pairs, SwAV's
    swapped prediction asks each view to predict the other's equal-partition cluster codes over learned prototypes
    — either way the representation the score head reads keeps pairs apart instead of collapsing onto one "easy"
    feature. Its negatives (or its partition) are the micro-batch's pairs, so this term (alone) depends on how a
    batch is split. With a meta set the batch's loss is MetaRM's (:meth:`metarm_loss`)."""

    def __init__(self, cfg: RewardConfig, lm_head: torch.nn.Parameter | None,
                 prototypes: torch.nn.Parameter | None = None):
        self.cfg = cfg
        self.lm_head = lm_head
        self.prototypes = prototypes
        self._names: dict[int, str] = {}

    def current(self, model, param: torch.nn.Parameter) -> torch.Tensor:
        """``param`` (one of the model's) as the model holds it now: under MetaRM's ``functional_call``, the adapted
        weights."""
        module = unwrap(model)
        if id(param) not in self._names:
            self._names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        return functools.reduce(getattr, self._names[id(param)].split("."), module)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "meta_input_ids" in batch and torch.is_grad_enabled():
            return self.metarm_loss(model, batch)
        return self.pair_loss(model, batch)

    def pair_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected, aux_sum, n_pairs = self.forward(model, batch)
        # a soft target p is label smoothing of 1 − p; --label-smoothing ε then smooths that target once more
        eps = self.cfg.label_smoothing
        smoothing = eps + (1 - 2 * eps) * (1 - batch["target"]) if "target" in batch else eps
        per_pair = bradley_terry_loss(chosen, rejected, batch["margin"], smoothing, reduction="none")
        loss = (per_pair * batch["weight"]).sum() if "weight" in batch else per_pair.sum()
        return loss + aux_sum

    def metarm_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """MetaRM (Dou et al. 2024): θ' = θ + η ∇J(θ), a gradient ascent step on the difference objective J of the
        meta batch (``losses.reward_difference_objective``: how far apart the reward model puts the shifted
        policy's replies to one prompt), then the pair loss L at θ'. The returned value is L(θ'); its gradient is
        the meta-gradient ∇_θ L(θ + η∇J(θ)) = ∇L(θ') + η H_J(θ) ∇L(θ'), with the Hessian-vector product taken as a
        central difference of ∇J at θ ± r ∇L(θ') (as DARTS does): two more gradients of J, and no second-order
        autograd through attention kernels that have none."""
        module = unwrap(model)
        names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
        meta = {k: batch[f"meta_{k}"] for k in ("input_ids", "attention_mask", "labels")}
        sizes = batch["meta_sizes"].tolist()

        def at(values, fn, inputs):  # fn(module, inputs) with the weights `values` in place of the parameters
            return torch.func.functional_call(_Apply(module, fn), {f"model.{n}": v for n, v in zip(names, values)},
                                              (inputs,))

        def meta_gradient(values):
            leaves = [v.detach().requires_grad_() for v in values]
            objective = reward_difference_objective(at(leaves, self.rewards, meta), sizes)
            grads = torch.autograd.grad(objective, leaves, allow_unused=True)
            return [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]

        eta = self.cfg.meta_lr
        adapted = [p + eta * g for p, g in zip(params, meta_gradient(params))]
        loss = at(adapted, self.pair_loss, batch)
        loss_grads = [torch.zeros_like(p) if g is None else g
                      for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
        radius = self.cfg.meta_hvp_eps / torch.sqrt(sum((g.float() ** 2).sum() for g in loss_grads)).clamp(min=1e-12)
        plus = meta_gradient([p + radius * g for p, g in zip(params, loss_grads)])
        minus = meta_gradient([p - radius * g for p, g in zip(params, loss_grads)])
        total = [g + eta * (a - b) / (2 * radius) for g, a, b in zip(loss_grads, plus, minus)]
        # a surrogate whose value is 0 and whose gradient is the meta-gradient: the shared loop's backward applies it
        surrogate = sum((p * t.detach()).sum() for p, t in zip(params, total))
        return loss.detach() + surrogate - surrogate.detach()

    def rewards(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One reward per row, read at its last real token."""
        return self.scores_and_features(model, batch)[0]

    def scores_and_features(self, model, batch):
        """Each row's reward (its head at the last real token, + ``--likelihood-weight`` × its reply's mean
        log-likelihood), its final hidden states and that token's index."""
        mask = batch["attention_mask"]
        hidden = final_hidden_states(model, batch["input_ids"], mask)
        last = mask.long().sum(-1) - 1  # right padding: the last real token
        values = score_head(unwrap(model))(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1)
        values = values.to(torch.promote_types(values.dtype, torch.float32))  # bf16 up; float64 (tests) stays
        return values + reply_likelihood_bonus(model, hidden, batch["labels"]).to(values.dtype), hidden, last

    def forward(self, model, batch):
        """Rewards of the chosen and the rejected replies, the auxiliary terms' weighted sum (LM, contrastive) and
        the pair count."""
        rewards, hidden, last = self.scores_and_features(model, batch)
        n = rewards.shape[0] // 2
        aux_sum = torch.zeros((), device=rewards.device)
        if self.cfg.contrastive_weight > 0 and torch.is_grad_enabled():
            at_score = hidden[torch.arange(2 * n, device=hidden.device), last].float()
            difference = at_score[:n] - at_score[n:]
            p, tau = self.cfg.contrastive_dropout, self.cfg.contrastive_temperature
            views = [torch.nn.functional.dropout(difference, p, training=True) for _ in range(2)]
            term = (swav_loss(*views, self.current(model, self.prototypes), tau, self.cfg.swav_epsilon)
                    if self.cfg.contrastive_method == "swav" else info_nce(*views, tau))
            aux_sum = aux_sum + self.cfg.contrastive_weight * term.sum()
        if self.lm_head is not None:  # each pair's token losses averaged within the pair
            targets = batch["labels"][:n, 1:]
            counted = targets != IGNORE
            logprobs = mean_reply_logprobs(hidden[:n, :-1][counted], self.current(model, self.lm_head),
                                           targets[counted], counted.nonzero()[:, 0], n)
            aux_sum = aux_sum - self.cfg.lm_coef * logprobs.sum()
        return rewards[:n], rewards[n:], aux_sum, n


class _Apply(torch.nn.Module):
    """``fn(model, inputs)`` as a module's forward, so that ``torch.func.functional_call`` can run it with other
    weights."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, inputs):
        return self.fn(self.model, inputs)


@torch.no_grad()
def score_pairs(model, tokenizer, prefs: list[Preference], max_len: int = 256, batch_size: int = 32,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected replies, ``([N], [N])``."""
    model.eval()
    cfg = RewardConfig(data=["-"], max_len=max_len, use_margin=False)
    data = pair_data(tokenizer, prefs, cfg)
    loss = RewardLoss(cfg, None)
    scores = []
    for start in range(0, len(prefs), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(prefs)))))
        scores.append([s.cpu() for s in loss.forward(model, {k: v.to(device) for k, v in batch.items()})[:2]])
    return torch.cat([c for c, _ in scores]), torch.cat([r for _, r in scores])


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
    if cfg.likelihood_weight is not None:  # saved with the model: whatever loads it scores with the same term
        setattr(base_model(model).config, LIKELIHOOD_WEIGHT, cfg.likelihood_weight)
    weight = likelihood_weight(model)  # an untied model is refused here, before training
    lm_head = None
    if cfg.lm_coef > 0 and getattr(model.config, "tie_word_embeddings", False):
        lm_head = model.get_input_embeddings().weight  # tied: the scorer's own embeddings
    elif cfg.lm_coef > 0:
        head = load_causal_lm(cfg.model).get_output_embeddings().weight.detach().clone()
        lm_head = model.aux_lm_head = torch.nn.Parameter(head)
    prototypes = None
    if cfg.contrastive_weight > 0 and cfg.contrastive_method == "swav":
        # trained with the model (so they are in its optimizer and checkpoints); seeded by --seed
        generator = torch.Generator().manual_seed(cfg.seed)
        model.register_parameter("swav_prototypes", torch.nn.Parameter(
            torch.randn(cfg.swav_prototypes, model.config.hidden_size, generator=generator)))
        prototypes = model.swav_prototypes
    meta = [group for path in cfg.meta_data for group in load_sample_groups(path)]
    if meta and (dist.world_size > 1 or cfg.parallel == "fsdp"):
        raise ConfigError("--meta-data (MetaRM) runs in one process: its meta step reads the whole model's weights "
                          "and gradients; run it without torchrun")
    loss_fn = RewardLoss(cfg, lm_head, prototypes)
    train = pair_data(tokenizer, prefs, cfg, meta=meta)
    evaluation = pair_data(tokenizer, held_out, cfg, training=False)
    if dist.is_main:
        print(f"reward: {len(prefs)} training pairs, {len(held_out)} held out; from {cfg.model}"
              + (f"; MetaRM on {len(meta)} prompts' {sum(len(g.responses) for g in meta)} sampled replies "
                 f"(η {cfg.meta_lr:g})" if meta else "")
              + (f"; {cfg.contrastive_method} contrastive term × {cfg.contrastive_weight:g}"
                 if cfg.contrastive_weight else "") + (f"; + {weight:g} × log-likelihood" if weight else ""))
    result = train_lm(cfg, model, tokenizer, train, loss_fn, run_dir, dist,
                      evaluate=pair_evaluator(evaluation, loss_fn, cfg, dist), desc="reward")
    if dist.is_main and result.eval_metrics:
        m = result.eval_metrics
        print(f"reward: held-out accuracy {m['eval/accuracy']:.3f}, reward gap {m['eval/reward_gap']:.3f} "
              f"-> {run_dir.model_path}")
    return result
