"""``moss-rlhf report PIPELINE``: one self-contained HTML page of a whole run of the pipeline — the curves of every
stage, the win rates of the RLHF model against the SFT model, sample replies side by side, and attention before and
after RLHF. PNG plots (matplotlib, Agg) are embedded as base64 ``data:`` URIs and the CSS is inline, so the page opens
from disk, can be mailed around, and makes no network request.

Input contract — a pipeline directory; every part is optional, and a missing stage is shown as "not run"::

    PIPELINE/
      pretrain/metrics.jsonl  train/loss, eval/loss                ← moss-rlhf pretrain --out PIPELINE/pretrain
      sft/metrics.jsonl       train/loss, eval/loss                ← moss-rlhf sft --out PIPELINE/sft
      sft/model/              the policy before RLHF (attention maps)
      reward/metrics.jsonl    keys with "acc" (eval/accuracy, train/accuracy), "loss" (train/loss, eval/loss) and
                              "gap" or "margin" (eval/reward_gap)
      ppo/metrics.jsonl       reward/raw_mean, val/reward, kl/per_token, policy/perplexity, response/length or
                              response/length_mean, val/length, val/gold, policy/entropy (whichever exist)
      ppo/model/              the policy after RLHF (attention maps)
      rl-<recipe>/            more RL runs (``moss-rlhf demo --algorithm grpo``: rl-grpo/; against the gold judge:
                              rl-grpo-gold/), each with metrics.jsonl, config.yaml (its preset and reward sources)
                              and model/; a section each
      eval/stages/*.json      what each stage added (``moss_rlhf.demo.stage_table``: the pretrained, SFT and RLHF
                              models' gold score per task, flaw shares, replies side by side): the first section,
                              from PPO-max's last round when there is one
      eval/*.json             written by `moss-rlhf evaluate --out PIPELINE/eval/NAME.json` (A: an RL run's model,
                              B: SFT); the comparison page puts every run's evaluation side by side
      reward-round2/, ppo-round2/, …   later feedback rounds, same layout (a section each; the attention
                              "after RLHF" map uses the last round's ppo*/model)

``metrics.jsonl`` is the run directory's log (``runs.RunDir``): one JSON object per line with a ``step``. The report
is written to ``PIPELINE/report.html`` (or ``--out DIR``).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.data.formats import DataError
from moss_rlhf.files import atomic_write_text
from moss_rlhf.runs import read_metrics

DEFAULT_PROBE = 'What is the sentiment of "The soup was delicious."?'

# (panel title, metric keys drawn in it) — panels whose keys are all absent are left out.
LM_PANELS = [("loss", ["train/loss", "eval/loss"]), ("held-out perplexity", ["eval/perplexity"])]
DPO_PANELS = [("loss", ["train/loss", "eval/loss"]), ("held-out reward accuracy", ["eval/accuracy"]),
              ("implicit rewards β·log(π/π_ref)", ["eval/chosen_reward", "eval/rejected_reward"]),
              ("reply log-prob per token", ["eval/chosen_logp", "eval/rejected_logp"]),
              ("KL to the reference on held-out prompts, per token", ["eval/kl_per_token"])]
DPO_NAMES = {"sigmoid": "DPO", "robust": "robust DPO", "ipo": "IPO", "hinge": "SLiC", "simpo": "SimPO",
             "orpo": "ORPO", "kto": "KTO"}
PPO_PANELS = [("reward", ["reward/raw_mean", "val/reward"]), ("gold score (demo judge)", ["val/gold"]),
              ("KL from the SFT policy, per token", ["kl/per_token"]), ("policy perplexity", ["policy/perplexity"]),
              ("reply length (tokens)", ["response/length_mean", "response/length", "val/length"]),
              ("policy entropy", ["policy/entropy"]), ("advantages (std)", ["advantage/std"]),
              ("groups whose rewards are all equal", ["groups/equal_reward_share"])]


@dataclass
class Figure:
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    ran: bool = True
    note: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)     # {"prompt", "a", "b", "score_a", "score_b"}
    sample_names: tuple[str, str] = ("A", "B")


@dataclass
class ReportConfig(Config):
    pipeline: str = option("runs/pipeline", "pipeline directory (pretrain/, sft/, reward/, ppo/, eval/)",
                           positional=True)
    out: str = option("", "directory to write report.html into (default: the pipeline directory)")
    title: str = option("MOSS-RLHF pipeline report", "page title")
    probe: str = option(DEFAULT_PROBE, "user message whose attention maps are compared before and after RLHF")
    samples: int = option(6, "sample replies shown side by side per evaluation", at_least=0)


# --------------------------------------------------------------------------------------------------------------------
# Reading


def read_evaluations(eval_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(str(path), e.lineno, None, f"not valid JSON ({e.msg})") from None
        for key in ("model_a", "model_b", "win_rate", "models"):
            if key not in data:
                raise DataError(str(path), None, key, "missing: expected a file written by `moss-rlhf evaluate`")
        found.append((path, data))
    return found


# --------------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def curves_png(rows: list[dict], panels: list[tuple[str, list[str]]]) -> bytes | None:
    """One panel per (title, keys) with at least one finite value; noisy curves get a smoothed line on top."""
    present = [(title, [k for k in keys if any(_finite(r.get(k)) for r in rows)]) for title, keys in panels]
    present = [(title, keys) for title, keys in present if keys]
    if not present:
        return None
    plt = _pyplot()
    cols = min(3, len(present))
    n_rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.3 * cols, 2.9 * n_rows), squeeze=False)
    colors = ["#2563eb", "#ea580c", "#16a34a", "#9333ea"]
    for ax, (title, keys) in zip(axes.flat, present):
        for color, key in zip(colors, keys):
            points = [(r["step"], float(r[key])) for r in rows if _finite(r.get(key))]
            steps, values = zip(*points)
            if len(points) > 30:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, _smooth(list(values)), color=color, linewidth=1.8, label=key)
            else:
                ax.plot(steps, values, color=color, linewidth=1.8, marker="o", markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def win_rate_png(evaluation: dict) -> bytes:
    """Horizontal bars: overall and per-task win rate of A with the 95% interval, the 50% line marking parity."""
    plt = _pyplot()
    w = evaluation["win_rate"]
    labels, rates = ["overall"], [w["win_rate"]]
    for task, t in evaluation.get("by_task", {}).items():
        labels.append(f"{task} (n={t['n']})")
        rates.append(t["win_rate"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.1))
    positions = list(range(len(labels)))[::-1]
    colors = ["#2563eb"] + ["#93c5fd"] * (len(labels) - 1)
    ax.barh(positions, rates, color=colors, height=0.6)
    ax.errorbar([w["win_rate"]], [positions[0]], xerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]],
                fmt="none", ecolor="#1e293b", capsize=4, linewidth=1.2)
    ax.axvline(0.5, color="#64748b", linestyle="--", linewidth=1)
    for i, (y, rate) in enumerate(zip(positions, rates)):
        right = max(rate, w["ci_high"]) if i == 0 else rate  # clear of the overall bar's interval whisker
        ax.text(min(right + 0.015, 0.92), y, f"{rate:.0%}", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.set_xlabel(f"win rate of {evaluation['model_a']['name']} over {evaluation['model_b']['name']} (ties ½)",
                  fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------------------------------
# Sections


def training_section(title: str, run_dir: Path, panels: list[tuple[str, list[str]]], what: str) -> Section:
    rows = read_metrics(run_dir)
    if not rows:
        return Section(title, ran=False, note=f"not run — no {run_dir.name}/metrics.jsonl")
    png = curves_png(rows, panels)
    last = rows[-1]
    shown = [k for _, keys in panels for k in keys if _finite(last.get(k))]
    table = Table("last logged step", ["step", *shown], [[str(int(last["step"])), *(f"{last[k]:.4g}" for k in shown)]])
    section = Section(title, note=f"{what} — {len(rows)} logged steps, last step {int(last['step'])}.",
                      tables=[table] if shown else [])
    if png is None:
        section.note += " None of the expected metrics were logged."
    else:
        section.figures.append(Figure(title, png))
    return section


def reward_section(run_dir: Path, round_number: int = 1) -> Section:
    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k in r if k != "step"})
    panels = [("preference accuracy", [k for k in keys if "acc" in k]), ("loss", [k for k in keys if "loss" in k]),
              ("reward gap, chosen − rejected", [k for k in keys if "gap" in k or "margin" in k])]
    title = "Reward model" + (f" (round {round_number})" if round_number > 1 else "")
    return training_section(title, run_dir, panels, "Bradley–Terry reward model on preference pairs")


def evaluation_sections(evaluations: list[tuple[Path, dict]], n_samples: int) -> list[Section]:
    if not evaluations:
        return [Section("Evaluation: win rate", ran=False, note="not run — no eval/*.json from `moss-rlhf evaluate`")]
    sections = []
    for path, ev in evaluations:
        a, b, w = ev["model_a"]["name"], ev["model_b"]["name"], ev["win_rate"]
        judge = "the gold judge" if ev.get("judge") == "gold" else f"the reward model {ev.get('judge')}"
        head = Table(f"{a} vs {b}", ["", "win rate of A (ties ½)", "95% interval", "wins", "ties", "losses"],
                     [[f"{a} vs {b}", f"{w['win_rate']:.1%}", f"{w['ci_low']:.1%} – {w['ci_high']:.1%}",
                       str(w["wins"]), str(w["ties"]), str(w["losses"])]])
        keys = [k for k in ("mean_score", "response_length", "distinct_1", "distinct_2", "perplexity")
                if any(k in s for s in ev["models"].values())]
        models = Table("per model", ["model", *(k.replace("_", " ") for k in keys)],
                       [[name, *(f"{s[k]:.3f}" if _finite(s.get(k)) else "–" for k in keys)]
                        for name, s in ev["models"].items()])
        tables = [head, models]
        if ev.get("by_task"):
            tables.append(Table("by task", ["task", "prompts", "win rate of A", f"score {a}", f"score {b}"],
                                [[task, str(t["n"]), f"{t['win_rate']:.1%}", f"{t['mean_score_a']:.2f}",
                                  f"{t['mean_score_b']:.2f}"] for task, t in ev["by_task"].items()]))
        note = f"{ev.get('n_prompts', '?')} held-out prompts judged by {judge} ({path.name})."
        if ev.get("kl"):
            note += f" KL({a} ‖ {b}) at temperature {ev['kl'].get('temperature', 1.0):g} on {a}'s replies: " \
                    f"{ev['kl']['per_sequence']:.3f} per reply, {ev['kl']['per_token']:.4f} per token."
        sections.append(Section(f"Evaluation: {a} vs {b}", note=note, tables=tables,
                                figures=[Figure("win rate", win_rate_png(ev))],
                                samples=ev.get("samples", [])[:n_samples], sample_names=(a, b)))
    return sections


def stages_section(root: Path) -> Section:
    """The first screen: per task, the gold score after pretraining, after SFT and after RLHF; the flaw shares before
    and after feedback; replies side by side."""
    title = "What each stage added"
    files = sorted((root / "eval" / "stages").glob("*.json")) if (root / "eval" / "stages").is_dir() else []
    if not files:
        return Section(title, ran=False, note="not run — no eval/stages/*.json (written by `moss-rlhf demo`)")

    def rank(path: Path) -> tuple:
        run, _, number = path.stem.rpartition("_round")
        return (run == "ppo", int(number) if number.isdigit() else 0, path.stat().st_mtime)

    path = max(files, key=rank)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        stages, tasks = table["stages"], table["tasks"]
        names = [stage["name"] for stage in stages]
        scores = Table("gold score (0–10) by task", ["task", *names],
                       [[task, *(f"{stage['by_task'][task]:.2f}" for stage in stages)] for task in tasks]
                       + [["all tasks", *(f"{stage['mean']:.2f}" for stage in stages)]])
        flaw_names = list(stages[0]["flaws"])
        flaws = Table("share of replies with each flaw of the SFT data", ["flaw", *names],
                      [[flaw.replace("_", "-"), *(f"{stage['flaws'][flaw]:.1%}" for stage in stages)]
                       for flaw in flaw_names] + [["none (clean)", *(f"{stage['clean']:.1%}" for stage in stages)]])
        tables = [scores, flaws]
        probe = table.get("reward_probe")
        if probe:
            kinds = probe["flaws"]
            tables.append(Table("the reward model's pick between the clean reply and the same reply with each flaw "
                                "(share of prompts where it prefers the clean one; the gold judge always does)",
                                ["task", *(flaw.replace("_", "-") for flaw in kinds)],
                                [[task, *(f"{shares[flaw]:.0%}" for flaw in kinds)]
                                 for task, shares in probe["by_task"].items()]
                                + [["all tasks", *(f"{probe['all'][flaw]:.0%}" for flaw in kinds)]]))
        tables.append(Table("replies side by side (gold score)", ["task", "prompt", *names],
                            [[x["task"], x["prompt"], *(f"{r['reply']} ({r['score']:.1f})" for r in x["replies"])]
                             for x in table["samples"]]))
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"not valid JSON ({e.msg})") from None
    except KeyError as e:
        raise DataError(str(path), None, str(e.args[0]), "missing: expected a stage table written by "
                                                          "`moss-rlhf demo`") from None
    except (TypeError, IndexError, AttributeError) as e:
        raise DataError(str(path), None, None, f"not a stage table written by `moss-rlhf demo` ({e})") from None
    note = (f"{table['n_prompts']} held-out prompts, every model prompted with the chat template and sampled at "
            f"temperature {table['temperature']:g}, scored by the gold judge ({path.relative_to(root)}). Each column "
            f"is a stage: pretraining brings the knowledge, SFT the demonstrations' answers and their flaws, feedback the "
            f"preference that removes the flaws.")
    return Section(title, note=note, tables=tables)


def stage_rounds(root: Path, stage: str) -> list[tuple[int, Path]]:
    """``stage/`` (round 1), then ``stage-round2/``, ``stage-round3/``… — the later rounds of feedback."""
    later = []
    for path in root.glob(f"{stage}-round*"):
        match = re.fullmatch(rf"{re.escape(stage)}-round(\d+)", path.name)
        if match and path.is_dir():
            later.append((int(match.group(1)), path))
    return [(1, root / stage)] + sorted(later)


def rl_runs(root: Path) -> list[tuple[str, int, Path]]:
    """``(run, round, directory)`` of every RL run in a pipeline directory: ``ppo``, ``rl-grpo``, ``rl-grpo-gold``
    … and their later rounds (``ppo-round2``), PPO-max first."""
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = re.fullmatch(r"(ppo|dpo|kto|rl-[\w.-]+?)(?:-round(\d+))?", path.name)
        if match and path.is_dir():
            found.append((match.group(1), int(match.group(2) or 1), path))
    return sorted(found, key=lambda run: (run[0] != "ppo", run[0], run[1]))


def run_description(run_dir: Path) -> tuple[str, str, bool]:
    """``(recipe, reward sources, from human feedback)`` of an RL or DPO run, from the ``config.yaml`` it saved."""
    import yaml

    from moss_rlhf.recipes import RECIPE_NAMES

    path = run_dir / "config.yaml"
    cfg = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}
    if "loss" in cfg and "preset" not in cfg:  # a DPO-family run: trained on the preference pairs themselves
        name = DPO_NAMES.get(cfg["loss"], cfg["loss"])
        return ("cDPO" if name == "DPO" and cfg.get("label_smoothing") else name), "the preference pairs", True
    preset = cfg.get("preset", "ppo_max")
    functions = cfg.get("reward_fn") or []
    weight = cfg.get("reward_model_weight")
    uses_model = (weight if weight is not None else 0.0 if functions else 1.0) > 0
    # the pipeline's reward models by directory: reward/ (plain), reward-part2/, reward-metarm-round2/ …
    model_dir = Path(str(cfg.get("reward_model") or "reward/model")).parent.name
    named = "the reward model" + ("" if model_dir in ("reward", "") else f" ({model_dir}/)")
    sources = ([named] if uses_model else []) + \
        ["the gold judge" if f == "moss_rlhf.demo.judge:gold_scores" else f for f in functions]
    recipe = RECIPE_NAMES.get(preset, preset) + (f" (KL to the reference at T {cfg['reference_temperature']:g})"
                                                 if cfg.get("reference_temperature") else "")
    return recipe, " + ".join(sources), uses_model


def rl_sections(root: Path) -> list[Section]:
    runs = rl_runs(root)
    if not runs:
        return [training_section("PPO-max", root / "ppo", PPO_PANELS, "PPO-max against the reward model")]
    sections = []
    for _, number, path in runs:
        recipe, sources, uses_model = run_description(path)
        title = (recipe if uses_model else f"RL against {sources} ({recipe})") + \
            (f" (round {number})" if number > 1 else "")
        panels, against = (DPO_PANELS, "from") if sources == "the preference pairs" else (PPO_PANELS, "against")
        sections.append(training_section(title, path, panels, f"{recipe} {against} {sources} ({path.name}/)"))
    return sections


def comparison_section(root: Path, evaluations: list[tuple[Path, dict]]) -> Section:
    """Every RL run's evaluation against SFT side by side: win rate with its bootstrap interval, mean judge score,
    KL to SFT, reply length and time per step — RLHF runs (a reward model in the reward) apart from runs that
    optimise a Python reward such as the gold judge itself."""
    title = "RL algorithms compared"
    runs = {path.name: path for _, _, path in rl_runs(root)}
    found = []
    for eval_path, ev in evaluations:
        run = runs.get(Path(ev["model_a"].get("path", "")).parent.name)
        if run is not None:
            found.append((run, ev))
    found.sort(key=lambda item: list(runs).index(item[0].name))  # PPO-max first, then by name and round
    if not found:
        return Section(title, ran=False, note="not run — no evaluation of an RL run (ppo/, rl-*/) in eval/")
    header = ["run", "reward", "win rate vs SFT", "95% interval", "mean score", "SFT's", "KL per token",
              "reply length", "s per step", "steps"]
    groups: dict[bool, list[list[str]]] = {True: [], False: []}
    bars = []
    for run, ev in found:
        _, sources, uses_model = run_description(run)
        a, b, w = ev["model_a"]["name"], ev["model_b"]["name"], ev["win_rate"]
        rows = read_metrics(run)
        times = sorted(r["time/step_s"] for r in rows if _finite(r.get("time/step_s")))
        kl = (ev.get("kl") or {}).get("per_token")
        groups[uses_model].append([
            a, sources, f"{w['win_rate']:.1%}", f"{w['ci_low']:.1%} – {w['ci_high']:.1%}",
            f"{ev['models'][a]['mean_score']:.2f}", f"{ev['models'][b]['mean_score']:.2f}",
            f"{kl:.3f}" if _finite(kl) else "–", f"{ev['models'][a].get('response_length', float('nan')):.1f}",
            f"{times[len(times) // 2]:.2f}" if times else "–", str(int(rows[-1]["step"])) if rows else "–"])
        bars.append((a, w, uses_model))
    tables = [Table(caption, header, groups[key]) for key, caption in
              ((True, "From human feedback: RL against the reward model, DPO from the preference pairs"),
               (False, "RL against a Python reward (not RLHF)"))
              if groups[key]]
    judge = {ev.get("judge") for _, ev in found}
    note = (f"Each run's final model against SFT on the same {found[0][1].get('n_prompts', '?')} held-out prompts, "
            f"judged by {'the gold judge' if judge == {'gold'} else ', '.join(map(str, judge))} (ties count ½); the "
            f"interval is a bootstrap 95% interval; KL is the run's KL to SFT per reply token; time per step is the "
            f"median of the run's time/step_s. Runs that optimise the gold judge itself are not RLHF and are listed "
            f"apart.")
    figures = [Figure("win rates", comparison_png(bars))] if len(bars) > 1 else []  # one run: its own section has it
    return Section(title, note=note, tables=tables, figures=figures)


def comparison_png(bars: list[tuple[str, dict, bool]]) -> bytes:
    """One bar per run: its win rate over SFT with the 95% interval; RLHF runs blue, Python-reward runs grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.1))
    positions = list(range(len(bars)))[::-1]
    for y, (name, w, uses_model) in zip(positions, bars):
        ax.barh([y], [w["win_rate"]], color="#2563eb" if uses_model else "#94a3b8", height=0.6)
        ax.errorbar([w["win_rate"]], [y], xerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]],
                    fmt="none", ecolor="#1e293b", capsize=4, linewidth=1.2)
        ax.text(min(w["ci_high"] + 0.015, 0.92), y, f"{w['win_rate']:.0%}", va="center", fontsize=8)
    ax.axvline(0.5, color="#64748b", linestyle="--", linewidth=1)
    ax.set_yticks(positions, [name for name, _, _ in bars], fontsize=8)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.set_xlabel("win rate over SFT (ties ½), 95% interval", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _png(fig)


def attention_section(pipeline: Path, probe: str) -> Section:
    after_dirs = [path / "model" for _, path in stage_rounds(pipeline, "ppo") if (path / "model").is_dir()]
    before, after = pipeline / "sft" / "model", (after_dirs[-1] if after_dirs else pipeline / "ppo" / "model")
    missing = [str(p.relative_to(pipeline)) for p in (before, after) if not (p / "config.json").exists()]
    title = "Attention before and after RLHF"
    if missing:
        return Section(title, ran=False, note=f"not run — needs {' and '.join(missing)}")
    from moss_rlhf.interpret import attention_maps, load_for_inspection, plot_attention_comparison

    maps = []
    for path in (before, after):
        model, tokenizer = load_for_inspection(str(path), "cpu")
        maps.append(attention_maps(model, tokenizer, probe, chat=True))
    (tokens, first), (_, second) = maps
    layer = first.shape[0] - 1
    png_path = pipeline / ".report_attention.png"
    after_label = "PPO-max" + after.parent.name.removeprefix("ppo").replace("-round", " round ")
    plot_attention_comparison(tokens, first[layer], second[layer], layer, png_path, ("SFT", after_label))
    png = png_path.read_bytes()
    png_path.unlink()
    return Section(title, note=f"Last layer's heads on the chat-rendered probe {probe!r} (query ↓, key →).",
                   figures=[Figure("attention", png)])


def build_sections(pipeline: str | Path, probe: str = DEFAULT_PROBE, n_samples: int = 6) -> list[Section]:
    """Every section of the report from a pipeline directory (see the module docstring for the layout)."""
    root = Path(pipeline)
    evaluations = read_evaluations(root / "eval")
    return [
        stages_section(root),
        training_section("Pretraining", root / "pretrain", LM_PANELS, "Causal-LM pretraining"),
        training_section("Supervised fine-tuning", root / "sft", LM_PANELS, "SFT on demonstrations"),
        *(reward_section(path, number) for number, path in stage_rounds(root, "reward")),
        *rl_sections(root),
        comparison_section(root, evaluations),
        *evaluation_sections(evaluations, n_samples),
        attention_section(root, probe),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Writing


def write_report(out_dir: str | Path, sections: list[Section], title: str = "MOSS-RLHF pipeline report",
                 subtitle: str = "") -> Path:
    """Render ``sections`` into ``out_dir/report.html`` (atomically) and return its path."""
    import jinja2

    template_text = (Path(__file__).with_name("report_template.html")).read_text(encoding="utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["score"] = lambda v: f"{v:.2f}" if _finite(v) else "–"
    page = environment.from_string(template_text).render(
        title=title, subtitle=subtitle, sections=sections,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, page)
    path.chmod(0o644)  # a page to share: the temporary file it was renamed from was private
    return path


def run(cfg: ReportConfig) -> Path:
    if not Path(cfg.pipeline).is_dir():
        raise ConfigError(f"{cfg.pipeline}: pipeline directory not found")
    sections = build_sections(cfg.pipeline, cfg.probe, cfg.samples)
    path = write_report(cfg.out or cfg.pipeline, sections, cfg.title, subtitle=str(cfg.pipeline))
    ran = [s.title for s in sections if s.ran]
    print(f"report: {len(ran)}/{len(sections)} sections with data -> {path}")
    return path
