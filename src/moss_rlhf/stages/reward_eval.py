"""``moss-rlhf reward eval``: what a reward model has learned, beyond its accuracy — the measurements of "Secrets of
RLHF in Large Language Models Part II: Reward Modeling" (Wang et al. 2024, arXiv 2401.06080):

- **accuracy** on preference pairs (ties count half) and the mean reward gap ``r(chosen) − r(rejected)``;
- **accuracy by preference strength**: with pairs scored by ``moss-rlhf reward strength`` (``strength_mean``), the
  pairs sorted by strength and cut into equal buckets — the paper's finding is that a reward model agrees with the
  labels of strong pairs and disagrees with the weakest (likely mislabelled) ones;
- **calibration**: the expected calibration error of ``σ(r_c − r_r)`` read as the probability that the model's
  preferred reply is the labelled one (Guo et al. 2017: confidence ``max(p, 1 − p)``, equal-width bins);
- **length bias**: the correlation of the reward with the reply's length in tokens, over all replies, and of the
  reward gap with the length gap over pairs — the bias that policy optimisation turns into verbose replies;
- with ``--judge`` (a reward model, a ``package.module:function`` scorer, or ``gold``: the demo world's judge), the
  **agreement with the judge**: the share of pairs (judge ties left out) that the model orders as the judge does, the
  same share for the labels themselves (the annotators' agreement with the judge), Spearman's rank correlation of
  the model's rewards with the judge's scores, and — with strength — how well "negative mean strength" finds the
  labels the judge disagrees with (precision and recall).

Output: a table on the terminal and every number in ``--out`` (JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.files import atomic_write_text


@dataclass
class RewardEvalConfig(Config):
    model: str = option("runs/reward/model", "the reward model", positional=True)
    data: list[str] = option([], "preference files (with strength_mean / strength_std from `moss-rlhf reward "
                                 "strength` for the accuracy by strength)")
    judge: str = option("", "also compare with a judge: a reward-model directory, a package.module:function scorer, "
                            "or 'gold' (the demo world's gold judge)")
    buckets: int = option(5, "strength buckets (equal numbers of pairs)", at_least=1)
    calibration_bins: int = option(10, "equal-width confidence bins of the calibration error", at_least=1)
    max_len: int = option(256, "longest prompt + reply in tokens (the prompt is cut from the left)", at_least=2)
    batch_size: int = option(32, "pairs per scoring batch", at_least=1)
    out: str = option("runs/reward/eval.json", "JSON file with every number")
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if not self.data:
            raise ConfigError("give --data PREFERENCES.jsonl: the pairs to evaluate the reward model on")


# --------------------------------------------------------------------------------------------------------------------
# Statistics: pure functions of plain lists


def pairwise_accuracy(diffs: Sequence[float]) -> float:
    """The share of pairs whose chosen reply scores higher; a tie counts half."""
    return sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / max(len(diffs), 1)


def expected_calibration_error(diffs: Sequence[float], bins: int = 10) -> float:
    """ECE of ``p = σ(d)``: each pair's confidence ``max(p, 1 − p)`` in the model's preferred reply, binned over [0.5,
    1]; per bin, |share of pairs whose preferred reply is the labelled one − mean confidence|, weighted by size."""
    total, n = 0.0, len(diffs)
    groups: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for d in diffs:
        p = 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))
        confidence = max(p, 1 - p)
        correct = 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        groups[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append((confidence, correct))
    for group in groups:
        if group:
            total += len(group) / n * abs(sum(c for _, c in group) / len(group) - sum(p for p, _ in group) / len(group))
    return total


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; NaN when either side is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged)."""
    return pearson(ranks(x), ranks(y))


def accuracy_by_strength(strengths: Sequence[float], diffs: Sequence[float], buckets: int) -> list[dict]:
    """Pairs sorted by strength and cut into ``buckets`` of (nearly) equal size: each bucket's strength range, size,
    mean strength and the model's accuracy on it."""
    order = sorted(range(len(strengths)), key=lambda i: strengths[i])
    out = []
    for b in range(min(buckets, len(order))):
        part = order[b * len(order) // buckets:(b + 1) * len(order) // buckets]
        if part:
            out.append({"low": strengths[part[0]], "high": strengths[part[-1]], "pairs": len(part),
                        "mean_strength": sum(strengths[i] for i in part) / len(part),
                        "accuracy": pairwise_accuracy([diffs[i] for i in part])})
    return out


def detection(flagged: Sequence[bool], wrong: Sequence[bool]) -> dict[str, float]:
    """Precision and recall of ``flagged`` (e.g. negative mean strength) as a detector of ``wrong`` labels."""
    hits = sum(1 for f, w in zip(flagged, wrong) if f and w)
    n_flagged, n_wrong = sum(flagged), sum(wrong)
    return {"flagged": n_flagged, "wrong": n_wrong, "precision": hits / n_flagged if n_flagged else float("nan"),
            "recall": hits / n_wrong if n_wrong else float("nan")}


# --------------------------------------------------------------------------------------------------------------------
# The command


def evaluate_rewards(prefs, chosen: Sequence[float], rejected: Sequence[float], lengths: tuple[list[int], list[int]],
                     cfg: RewardEvalConfig, judge_scores: tuple[list[float], list[float]] | None = None) -> dict:
    """Every number of the report from the rewards of each pair's replies (and their lengths, and a judge's scores)."""
    diffs = [c - r for c, r in zip(chosen, rejected)]
    len_c, len_r = lengths
    report = {"pairs": len(diffs), "accuracy": pairwise_accuracy(diffs), "reward_gap": sum(diffs) / len(diffs),
              "ece": expected_calibration_error(diffs, cfg.calibration_bins),
              "length_correlation": pearson(list(chosen) + list(rejected), len_c + len_r),
              "gap_length_correlation": pearson(diffs, [a - b for a, b in zip(len_c, len_r)])}
    strengths = [p.strength_mean for p in prefs]
    has_strength = all(s is not None for s in strengths)
    if has_strength:
        report["by_strength"] = accuracy_by_strength(strengths, diffs, cfg.buckets)
        report["negative_strength_share"] = sum(1 for s in strengths if s < 0) / len(strengths)
    if judge_scores is not None:
        gold_c, gold_r = judge_scores
        decided = [i for i in range(len(diffs)) if gold_c[i] != gold_r[i]]
        report["judge"] = {
            "decided_pairs": len(decided),
            "model_agreement": pairwise_accuracy([diffs[i] * (1 if gold_c[i] > gold_r[i] else -1) for i in decided]),
            "label_agreement": sum(1 for i in decided if gold_c[i] > gold_r[i]) / max(len(decided), 1),
            "spearman": spearman(list(chosen) + list(rejected), gold_c + gold_r)}
        if has_strength:
            report["judge"]["noisy_label_detection"] = detection(
                [strengths[i] < 0 for i in decided], [gold_c[i] < gold_r[i] for i in decided])
    return report


def run(cfg: RewardEvalConfig) -> dict:
    """``moss-rlhf reward eval``."""
    from moss_rlhf.data.formats import load_preferences
    from moss_rlhf.models import check_vocabulary, load_scorer, resolve_device
    from moss_rlhf.scoring import text_scorer
    from moss_rlhf.stages.reward import pair_examples, score_pairs
    from moss_rlhf.tokenizer import load_tokenizer

    device = resolve_device(cfg.device)
    prefs = [p for path in cfg.data for p in load_preferences(path)]
    tokenizer = load_tokenizer(cfg.model)
    model = load_scorer(cfg.model, tokenizer, trained=True).to(device)
    check_vocabulary(model, tokenizer)
    chosen, rejected = score_pairs(model, tokenizer, prefs, cfg.max_len, cfg.batch_size, device)
    examples = [pair_examples(tokenizer, p, cfg.max_len) for p in prefs]
    lengths = ([sum(t != -100 for t in c.labels) for c, _ in examples],
               [sum(t != -100 for t in r.labels) for _, r in examples])
    judge_scores = None
    if cfg.judge:
        judge = text_scorer(cfg.judge, device, "--judge", cfg.max_len)
        prompts = [p.prompt for p in prefs]
        judge_scores = ([float(s) for s in judge(prompts, [p.chosen for p in prefs])],
                        [float(s) for s in judge(prompts, [p.rejected for p in prefs])])
    report = {"model": cfg.model, "data": cfg.data, "judge_spec": cfg.judge or None,
              **evaluate_rewards(prefs, chosen.tolist(), rejected.tolist(), lengths, cfg, judge_scores)}
    atomic_write_text(Path(cfg.out), json.dumps(report, indent=2) + "\n")
    print_report(report)
    return report


def print_report(report: dict) -> None:
    print(f"reward eval: {report['pairs']} pairs: accuracy {report['accuracy']:.3f}, mean reward gap "
          f"{report['reward_gap']:.3f}, calibration error {report['ece']:.3f}; correlation with reply length "
          f"{report['length_correlation']:.3f} (reward), {report['gap_length_correlation']:.3f} (gap)")
    for b in report.get("by_strength", []):
        print(f"  strength {b['low']:+.2f} … {b['high']:+.2f} ({b['pairs']} pairs): accuracy {b['accuracy']:.3f}")
    if "negative_strength_share" in report:
        print(f"  {report['negative_strength_share']:.1%} of the pairs have a negative mean strength")
    if judge := report.get("judge"):
        print(f"  against the judge ({judge['decided_pairs']} pairs it does not tie): the model agrees on "
              f"{judge['model_agreement']:.3f}, the labels on {judge['label_agreement']:.3f}; Spearman "
              f"{judge['spearman']:.3f}")
        if found := judge.get("noisy_label_detection"):
            print(f"  negative strength as a detector of the labels the judge disagrees with: precision "
                  f"{found['precision']:.3f}, recall {found['recall']:.3f} ({found['flagged']} flagged, "
                  f"{found['wrong']} wrong)")
