"""``moss-rlhf reward strength``: the preference strength of every pair, measured by an ensemble of reward models, as
in "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al. 2024, arXiv 2401.06080, §2).

M reward models (``--members``) are trained with ``moss-rlhf reward`` — every option of that stage applies to each
— on their own share of the pairs (``--split``): a bootstrap resample (held out: its out-of-bag pairs), a disjoint
1/M (held out: the next member's share), or every pair with the member's own seed and held-out share. Then every
member scores every pair, and the pair's strength is the mean and the standard deviation over the members of
``r(chosen) − r(rejected)``. A negative mean says the ensemble, trained on all the other labels, disagrees with this
one: the paper's mark of a probably wrong label (it found about a quarter of HH-RLHF's pairs negative).

Writes ``OUT/strength.jsonl`` (every pair with ``strength_mean``, ``strength_std`` and the members' differences,
and its record's other fields such as the labelling app's ``item_id``; ``moss-rlhf reward --data``, ``reward eval``
and ``feedback relabel`` read it), ``OUT/summary.json``, ``OUT/strength.png`` (the
distribution) and ``OUT/members/k/`` (each member's reward run). Members already trained are reused; ``--jobs N``
trains N at once in separate processes, each with its share of the cores.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf.config import ConfigError, option
from moss_rlhf.data.formats import Preference, load_preferences, load_records, preference_record
from moss_rlhf.files import atomic_write_bytes, atomic_write_text
from moss_rlhf.runs import resume_changes
from moss_rlhf.stages import reward
from moss_rlhf.stages.reward import RewardConfig

SPLITS = ("bootstrap", "disjoint", "seeds")
# fields a scored pair is written with; a record's other fields (the export's item_id, agreement, …) are kept
CANONICAL = ("prompt", "messages", "chosen", "rejected", "margin", "strength_mean", "strength_std", "strength_members")


@dataclass
class StrengthConfig(RewardConfig):
    out: str = option("runs/strength", "directory: strength.jsonl, summary.json, strength.png, members/k/")
    members: int = option(5, "reward models in the ensemble", at_least=2)
    split: str = option("bootstrap", "each member's pairs: bootstrap (a resample with replacement; its out-of-bag "
                                     "pairs held out), disjoint (its own 1/M; the next share held out), or seeds "
                                     "(every pair, its own seed and --eval-fraction held out)", choices=SPLITS)
    jobs: int = option(1, "members trained at once, in separate processes (each with cores / jobs threads)",
                       at_least=1)

    def check(self) -> None:
        super().check()
        if self.eval_data:
            raise ConfigError("--eval-data: each member holds out its own pairs (see --split); give every pair "
                              "in --data")


def member_pairs(n: int, members: int, split: str, seed: int) -> list[tuple[list[int], list[int]]]:
    """``(training, held-out)`` pair indices of each member; a pure function of its arguments."""
    rng = random.Random(seed)
    if split == "bootstrap":
        out = []
        for _ in range(members):
            drawn = [rng.randrange(n) for _ in range(n)]
            out_of_bag = sorted(set(range(n)) - set(drawn))
            out.append((drawn, out_of_bag or drawn[:1]))
        return out
    if split == "disjoint":
        order = list(range(n))
        rng.shuffle(order)
        shares = [order[k * n // members:(k + 1) * n // members] for k in range(members)]
        return [(shares[k], shares[(k + 1) % members]) for k in range(members)]
    return [(list(range(n)), []) for _ in range(members)]  # seeds: the member's own --eval-fraction split


def member_config(cfg: StrengthConfig, k: int, train_file: Path, held_out_file: Path | None) -> RewardConfig:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RewardConfig)}
    values.update(out=str(Path(cfg.out) / "members" / str(k)), data=[str(train_file)], seed=cfg.seed + k,
                  eval_data=[str(held_out_file)] if held_out_file else [], progress=cfg.progress and cfg.jobs == 1,
                  resume=not cfg.overwrite)  # a member killed mid-training continues from its last checkpoint
    return RewardConfig(**values)


def _train(member: RewardConfig, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    return reward.run(member).eval_metrics


def train_members(cfg: StrengthConfig, prefs: list[Preference]) -> list[Path]:
    """Each member's final model, training the ones not yet trained (``--jobs`` at a time)."""
    root = Path(cfg.out) / "members"
    todo, models = [], []
    for k, (train, held_out) in enumerate(member_pairs(len(prefs), cfg.members, cfg.split, cfg.seed)):
        folder = root / str(k)
        models.append(folder / "model")
        held_file = folder / "held_out_pairs.jsonl" if held_out else None
        member = member_config(cfg, k, folder / "pairs.jsonl", held_file)
        files = {folder / "pairs.jsonl": pairs_text([prefs[i] for i in train])}
        if held_file:
            files[held_file] = pairs_text([prefs[i] for i in held_out])
        if (folder / "model" / "config.json").exists() and not cfg.overwrite:
            changed = sorted(set(resume_changes(folder, member)) - {"resume", "overwrite", "progress"})
            changed += ["pairs"] if any(not f.exists() or f.read_text(encoding="utf-8") != text
                                        for f, text in files.items()) else []
            if changed:
                raise ConfigError(f"{folder} holds a member trained with other {', '.join(changed)}: pass "
                                  f"--overwrite to train the ensemble afresh")
            print(f"reward strength: member {k} trained already ({folder})")
            continue
        for f, text in files.items():
            atomic_write_text(f, text)
        todo.append(member)
    if cfg.jobs == 1 or len(todo) <= 1:
        for member in todo:
            reward.run(member)
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
        with multiprocessing.get_context("spawn").Pool(min(cfg.jobs, len(todo))) as pool:
            pool.starmap(_train, [(member, threads) for member in todo])
    return models


def pairs_text(prefs: list[Preference]) -> str:
    return "".join(json.dumps(preference_record(p), ensure_ascii=False) + "\n" for p in prefs)


def run(cfg: StrengthConfig) -> dict:
    """``moss-rlhf reward strength``."""
    from moss_rlhf.models import load_scorer, resolve_device
    from moss_rlhf.tokenizer import load_tokenizer

    prefs = [p for path in cfg.data for p in load_preferences(path)]
    extras = [{k: v for k, v in row.items() if k not in CANONICAL} if isinstance(row, dict) else {}
              for path in cfg.data for row in load_records(path)]  # item ids etc., one per pair, kept in the output
    if len(prefs) < cfg.members:
        raise ConfigError(f"{len(prefs)} pairs in --data are fewer than --members {cfg.members}")
    models = train_members(cfg, prefs)
    device = resolve_device(cfg.device)
    diffs = []
    for path in models:
        tokenizer = load_tokenizer(str(path))
        scorer = load_scorer(str(path), tokenizer, trained=True).to(device)
        chosen, rejected = reward.score_pairs(scorer, tokenizer, prefs, cfg.max_len, cfg.batch_size, device)
        diffs.append(chosen - rejected)
    members = torch.stack(diffs).double()  # [M, N]
    mean, std = members.mean(0), members.std(0)  # the sample standard deviation over the members
    if not torch.isfinite(members).all():
        raise ConfigError("a member scored a pair as NaN or infinite: its reward model is broken; retrain it with "
                          "--overwrite")
    out = Path(cfg.out)
    write_scored(out / "strength.jsonl", prefs, extras, mean, std, members)
    summary = {"pairs": len(prefs), "members": cfg.members, "split": cfg.split,
               "negative_share": float((mean < 0).double().mean()), "mean": float(mean.mean()),
               "quantiles": {str(q): float(mean.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
               "mean_std": float(std.mean())}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_strength(out / "strength.png", mean.tolist(), std.tolist())
    print(f"reward strength: {len(prefs)} pairs scored by {cfg.members} reward models ({cfg.split}): "
          f"{summary['negative_share']:.1%} have a negative mean strength; median {summary['quantiles']['0.5']:.3f}, "
          f"mean spread {summary['mean_std']:.3f} -> {out / 'strength.jsonl'}")
    return summary


def write_scored(path: Path, prefs: list[Preference], extras: list[dict], mean: torch.Tensor, std: torch.Tensor,
                 members: torch.Tensor) -> None:
    rows = []
    for i, p in enumerate(prefs):
        row = {**extras[i], **preference_record(p)}
        row.update(strength_mean=round(float(mean[i]), 6), strength_std=round(float(std[i]), 6),
                   strength_members=[round(float(d), 6) for d in members[:, i]])
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(rows))


def plot_strength(path: Path, mean: list[float], std: list[float]) -> None:
    """The histogram of mean strength (negative in red) beside the mean-against-spread scatter; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    _, edges, patches = left.hist(mean, bins=40, color="#4c72b0")
    for patch, low, high in zip(patches, edges, edges[1:]):
        if low + high < 0:  # the bin's centre is negative
            patch.set_facecolor("#c44e52")
    left.axvline(0, color="black", linewidth=0.8)
    left.set(title="preference strength (mean over the ensemble)", xlabel="r(chosen) − r(rejected)", ylabel="pairs")
    right.scatter(mean, std, s=4, alpha=0.4)
    right.set(title="strength against its spread", xlabel="mean", ylabel="standard deviation")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
