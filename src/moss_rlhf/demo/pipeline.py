"""``moss-rlhf demo``: the whole MOSS-RLHF story in one command, on a laptop CPU.

build the demo world → train the tokenizer → pretrain → SFT → sample response pairs from the SFT policy →
simulated annotators judge them through the feedback store (the same path as people) → export preferences →
reward model → RL (PPO-max by default; ``--algorithm grpo`` and the other critic-free recipes against the same
reward model; ``--rl-reward gold``: RL against the gold judge itself, reported apart; ``--algorithm dpo`` or ``kto``:
offline optimisation on the labelled pairs instead) → evaluate (gold judge, each
RL run's final model vs SFT) → report (with a page comparing every RL run the directory holds).

Every stage writes into ``DIR/<stage>``; ``DIR/pipeline.json`` records the finished ones (atomically), so re-running
skips them and a broken training stage resumes from its last checkpoint. ``--from STAGE`` redoes from a stage.
``--rounds N`` repeats the feedback loop as the seed describes ("repeat until the model meets human expectations"):
new pairs from the current policy, new labels, the reward model continues training, PPO runs again. With
``--metarm`` the later rounds take no new labels: the reward model continues on round 1's pairs with MetaRM (Dou et al.
2024) on replies sampled from the current policy, which keeps it able to tell that shifted policy's replies apart.

``--reward-recipe part2`` trains the reward model as "Secrets of RLHF ... Part II" advises: an ensemble measures
every labelled pair's preference strength (``moss-rlhf reward strength``), and the reward model trains on the pairs
with the treatments and the contrastive term in ``PART2_REWARD`` (its own directories, ``reward-part2/`` and
``rl-<algorithm>-part2/``, beside the plain run's, so the report compares both).

The same pipeline runs on the user's own material: ``--model`` (skip pretraining), ``--corpus``, ``--sft-data``,
``--prompts``, ``--eval-prompts``, and ``--preferences`` (real human labels exported by the feedback app instead of
simulated ones).

Several RL runs share one pipeline directory: ``moss-rlhf demo --algorithm rloo`` after a finished default run reuses
every stage up to the reward model and adds ``rl-rloo/`` and its evaluation; the report compares them all.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.files import atomic_write_text

STAGES = ("world", "tokenizer", "pretrain", "sft", "pairs", "label", "reward", "ppo", "evaluate", "report")
LOOP_STAGES = ("pairs", "label", "reward", "ppo", "evaluate")  # repeated once per feedback round
ALGORITHMS = ("ppo_max", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "remax",  # `moss-rlhf rl --preset`s
              "dpo", "kto")  # `moss-rlhf dpo [--loss kto]`: from the labelled pairs, no reward model
OFFLINE = ("dpo", "kto")  # trained on the labelled pairs themselves by `moss-rlhf dpo`
GOLD_REWARD = "moss_rlhf.demo.judge:gold_scores"  # the world's judge as a Python reward function (--reward-fn)
# DPO on the labelled pairs: in a sweep on the default world (150 steps, win rate on the validation prompts) β 0.3 at
# lr 1e-4 won 67% over SFT; β 0.1 won 62–65% at lr 5e-5–2e-4, with KL to SFT up to 0.71 per token at 2e-4
# KTO on the same pairs (each a desirable and an undesirable reply), 150 steps of 32 replies, same sweep: β 0.3 and
# 0.5 at lr 1e-4 won 68.0% and 68.5%; β 0.1 won 63.0% (lr 1e-4) and 63.5% (2e-4)
DPO_SETTINGS = (0.3, 1e-4, 16)  # β, lr, pairs per step
KTO_SETTINGS = (0.3, 1e-4, 32)  # β, lr, replies per step: each pair gives two
STRENGTH_MEMBERS = 5  # the ensemble that measures preference strength (the paper: 10 larger models)
# Part II's recipe: soft labels from each pair's strength and the SwAV term. On the default world no treatment or
# term moved agreement with the gold judge by more than 1.4 points (6 of 414 held-out pairs; the README's table)
PART2_REWARD = {"soft_labels": True, "contrastive_weight": 0.1, "contrastive_method": "swav",
                "contrastive_temperature": 0.1}
METARM_SAMPLES = (128, 4)  # meta set: prompts sampled from the current policy, replies per prompt
METARM_SETTINGS = {"meta_lr": 0.01, "meta_batch": 4}


@dataclass
class DemoConfig(Config):
    out: str = option("demo_out", "pipeline directory: one subdirectory per stage, report.html at the top")
    quick: bool = option(False, "a ~3-minute version (smaller world, fewer steps) for tests and a first look")
    rounds: int = option(1, "feedback rounds: sample → label → reward model → PPO, repeated", at_least=1)
    from_stage: str = option("", f"redo this stage and everything after it ({', '.join(STAGES)})")
    seed: int = option(0, "seed of the world, the models and the annotators")
    model: str = option("", "start from this model (hub id or directory) and skip pretraining")
    corpus: list[str] = option([], "your pretraining text files (default: the demo world)")
    sft_data: list[str] = option([], "your SFT conversation files (default: the world's flawed demonstrations)")
    prompts: str = option("", "prompts for feedback pairs and RL (default: the world's)")
    eval_prompts: str = option("", "held-out evaluation prompts (default: the world's)")
    preferences: list[str] = option([], "real human preference files (skip simulated labelling)")
    responses_per_prompt: int = option(6, "replies sampled per feedback prompt (k > 2: annotators rank them, and "
                                          "a ranking of k gives k(k-1)/2 pairs)", at_least=2)
    annotators: int = option(3, "simulated annotators", at_least=1)
    annotator_error_rate: float = option(0.1, "simulated annotators' chance of flipping a judgement", at_least=0.0,
                                         at_most=1.0)
    model_size: str = option("", "size preset of the pretrained model (tiny, mini, small; default: the budget's)",
                             choices=("", "tiny", "mini", "small"))
    pretrain_steps: int = option(0, "override the pretraining steps (0: the preset's)", at_least=0)
    sft_steps: int = option(0, "override the SFT steps (0: the preset's)", at_least=0)
    reward_steps: int = option(0, "override the reward-model steps (0: the preset's)", at_least=0)
    ppo_steps: int = option(0, "override the RL steps (0: the preset's)", at_least=0)
    algorithm: str = option("ppo_max", "the RL recipe (a `moss-rlhf rl --preset`), or dpo / kto (`moss-rlhf dpo` "
                                       "on the labelled pairs); runs of several recipes share one pipeline directory "
                                       "and the report compares them", choices=ALGORITHMS)
    rl_reward: str = option("model", "what RL optimises: 'model' (the reward model: RLHF) or 'gold' (the demo world's "
                                     "gold judge as a Python reward: RL against the gold judge, reported apart)",
                            choices=("model", "gold"))
    reward_recipe: str = option("plain", "the reward model: plain Bradley–Terry, or part2 (an ensemble's preference "
                                         "strength of every pair, then Part II's treatment of the pairs; its own "
                                         "reward-part2/ and RL run, compared in the report)", choices=("plain", "part2"))
    metarm: bool = option(False, "--rounds > 1 without new labels: the reward model continues on round 1's pairs with "
                                 "MetaRM on replies sampled from the current policy")
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if self.from_stage and self.from_stage not in STAGES:
            raise ConfigError(f"--from-stage must be one of {', '.join(STAGES)}, got {self.from_stage!r}")
        if self.rounds < 1:
            raise ConfigError("--rounds must be at least 1")
        if self.rl_reward == "gold" and self.algorithm in OFFLINE:
            raise ConfigError(f"--algorithm {self.algorithm} learns from the labelled pairs; --rl-reward gold is for "
                              f"RL recipes")
        if self.reward_recipe != "plain" and (self.algorithm in OFFLINE or self.rl_reward == "gold"):
            raise ConfigError(f"--reward-recipe {self.reward_recipe} changes the reward model; --algorithm "
                              f"{self.algorithm} --rl-reward {self.rl_reward} does not use one")
        if self.metarm and (self.rounds < 2 or self.preferences or self.algorithm in OFFLINE):
            raise ConfigError("--metarm adapts the reward model between RL rounds: it needs --rounds 2 or more, the "
                              "simulated labels and an RL --algorithm")
        if self.rl_reward == "gold" and self.eval_prompts:
            raise ConfigError("--rl-reward gold needs the demo world's prompts (the gold judge knows only its tasks); "
                              "leave out --eval-prompts")

    @property
    def rl_run(self) -> str:
        """The RL run's directory and stage name: ``ppo`` for PPO-max against the reward model (the pipeline's
        first layout), ``rl-<algorithm>`` for the others, with ``-gold`` when it optimises the gold judge."""
        if self.algorithm in ("ppo_max", *OFFLINE) and self.rl_reward == "model" and not self.reward_variant:
            return "ppo" if self.algorithm == "ppo_max" else self.algorithm
        return f"rl-{self.algorithm}" + ("-gold" if self.rl_reward == "gold" else "") + self.reward_variant

    @property
    def reward_variant(self) -> str:
        """``-part2`` for the Part II recipe, ``-metarm`` for rounds of MetaRM: runs of their own beside the plain
        ones (round 1 of a MetaRM pipeline is the plain round 1: the pipeline passes ``metarm=False`` there)."""
        return ("" if self.reward_recipe == "plain" else f"-{self.reward_recipe}") + ("-metarm" if self.metarm else "")

    @property
    def reward_run(self) -> str:
        """The reward model's directory and stage name: ``reward``, ``reward-part2``, ``reward-metarm`` …"""
        return "reward" + self.reward_variant

    @property
    def rl_label(self) -> str:
        from moss_rlhf.recipes import RECIPE_NAMES

        gold = " against the gold judge" if self.rl_reward == "gold" else ""
        recipe = " (Part II reward model)" if self.reward_recipe == "part2" else ""
        return {**RECIPE_NAMES, "dpo": "DPO", "kto": "KTO"}[self.algorithm] + gold + recipe + \
            (" (MetaRM between rounds)" if self.metarm else "")


@dataclass(frozen=True)
class Budget:
    world_size: str
    model_size: str
    pretrain_steps: int
    sft_steps: int
    pair_prompts: int
    reward_steps: int
    ppo_steps: int
    eval_prompts: int
    dpo_steps: int


# Pretraining takes many small steps. At the same tokens and time (2000 steps of 8 × 128 against 500 of 32 × 128:
# 4.6 min on the 2 cores of a slow hour) the tiny model went from 5.3 to 9.1 mean gold when prompted with the chat
# template (generation 3.3 → 9.3, translation 4.7 → 8.6, classification 3.7 → 9.7). The small model is far below
# its critical batch size: it needs more updates (to copy the product from the prompt, to translate word by word),
# not bigger ones. The default takes 1600 of them to stay within the demo's 10 minutes.
PRETRAIN_BATCH = 8
BUDGETS = {
    "default": Budget("default", "tiny", pretrain_steps=1600, sft_steps=150, pair_prompts=500, reward_steps=300,
                      ppo_steps=60, eval_prompts=300, dpo_steps=150),
    "quick": Budget("quick", "tiny", pretrain_steps=320, sft_steps=40, pair_prompts=50, reward_steps=30, ppo_steps=6,
                    eval_prompts=200, dpo_steps=10),
}


def stage_of(key: str) -> str:
    """The stage a done-key belongs to: ``rl-grpo@2`` is an RL ("ppo") stage, ``evaluate-rl-grpo`` an evaluation."""
    name = key.split("@")[0]
    if name.startswith("rl-") or name in OFFLINE:
        return "ppo"
    if name.startswith(("reward-", "strength", "meta")):  # the Part II reward models, their ensemble, MetaRM's samples
        return "reward"
    return "evaluate" if name.startswith("evaluate-") else name


class Pipeline:
    """Which stages are done, with their one-line results, kept in ``DIR/pipeline.json``."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.root = Path(cfg.out)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "pipeline.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": {}}
        base = BUDGETS["quick" if cfg.quick else "default"]
        self.budget = replace(base, **{k: getattr(cfg, k) for k in ("model_size", "pretrain_steps", "sft_steps",
                                                                      "reward_steps", "ppo_steps") if getattr(cfg, k)})

    def forget_from(self, stage: str) -> None:
        """``--from STAGE``: that stage and every later one (all rounds) run again from scratch."""
        later = STAGES[STAGES.index(stage):]
        for key in list(self.state["done"]):
            if stage_of(key) in later:
                del self.state["done"][key]
                shutil.rmtree(self.root / key.replace("@", "-round"), ignore_errors=True)
        self._save()

    def run(self, key: str, fn, always: bool = False) -> dict:
        if key in self.state["done"] and not always:
            print(f"[{key}] done already: {self.state['done'][key]['summary']}")
            return self.state["done"][key]
        print(f"[{key}] …", flush=True)
        started = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.state["done"][key] = result
        self._save()
        print(f"[{key}] {result['summary']} ({result['seconds']:.0f}s)", flush=True)
        return result

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2, ensure_ascii=False))


def run(cfg: DemoConfig) -> dict:
    """``moss-rlhf demo``."""
    from moss_rlhf.demo.world import ensure_world

    pipe = Pipeline(cfg)
    if cfg.from_stage:
        pipe.forget_from(cfg.from_stage)
    root, budget = pipe.root, pipe.budget
    started = time.perf_counter()
    world = root / "world"

    def world_stage() -> dict:
        ensure_world(world, cfg.seed, budget.world_size)
        meta = json.loads((world / "world.json").read_text())
        return {"summary": f"{sum(meta['counts'].values())} records, version {meta['version']}"}

    pipe.run("world", world_stage)
    prompts = cfg.prompts or str(world / "preference_prompts.jsonl")
    rl_prompts = cfg.prompts or str(world / "rl_prompts.jsonl")
    uses_world = not cfg.eval_prompts
    # The held-out prompts are split once: PPO validates (and keeps its best checkpoint) on one part, the final
    # evaluation uses the other, so the reported win rate is not measured on prompts that chose the checkpoint.
    eval_prompts, validation_prompts = _split_heldout(cfg.eval_prompts or str(world / "eval_prompts.jsonl"),
                                                      budget.eval_prompts, root / "eval", cfg.seed)

    pipe.run("tokenizer", lambda: _tokenizer_stage(cfg, root, world))
    pretrained = str(root / "pretrain" / "model")
    policy = cfg.model or pretrained
    if not cfg.model:
        pipe.run("pretrain", lambda: _pretrain_stage(cfg, budget, root, world))
    pipe.run("sft", lambda: _sft_stage(cfg, budget, root, world, policy))
    sft_model = str(root / "sft" / "model")

    policy, reward_model, reward_data = sft_model, "", []
    pipeline_cfg = cfg
    for round_index in range(1, cfg.rounds + 1):
        cfg = pipeline_cfg if round_index > 1 else replace(pipeline_cfg, metarm=False)  # MetaRM: from round 2
        tag = "" if round_index == 1 else f"@{round_index}"
        sub = (lambda name: root / name) if round_index == 1 else (lambda name: root / f"{name}-round{round_index}")
        db = root / "feedback.db"
        project = f"round-{round_index}"
        meta_file = None
        if cfg.metarm and round_index > 1:  # no new labels: round 1's pairs, MetaRM on the current policy's replies
            meta_file = sub("meta") / "samples.jsonl"
            pipe.run("meta" + tag, lambda: _meta_stage(cfg, meta_file, rl_prompts, policy, round_index))
        else:
            if not cfg.preferences:
                pairs = pipe.run("pairs" + tag, lambda: _pairs_stage(cfg, budget, db, project, prompts, policy,
                                                                     round_index))
                project = pairs.get("project", project)
                pipe.run("label" + tag, lambda: _label_stage(cfg, db, project, sub("feedback"), round_index))
            reward_data = cfg.preferences or [str(sub("feedback") / "preferences.jsonl")]
            if cfg.reward_recipe == "part2":
                pipe.run("strength" + tag, lambda: _strength_stage(cfg, budget, sub("strength"), sft_model,
                                                                   reward_data))
                reward_data = [str(sub("strength") / "strength.jsonl")]
        preference_files = reward_data  # what the reward model learns from (and DPO, KTO)
        init_reward = reward_model or sft_model
        pipe.run(cfg.reward_run + tag, lambda: _reward_stage(cfg, budget, sub(cfg.reward_run), init_reward,
                                                             preference_files, uses_world, meta_file))
        reward_model = str(sub(cfg.reward_run) / "model")
        run = sub(cfg.rl_run)
        if cfg.algorithm in OFFLINE:
            pipe.run(cfg.rl_run + tag, lambda: _dpo_stage(cfg, budget, run, policy, sft_model, preference_files))
        else:
            pipe.run(cfg.rl_run + tag, lambda: _rl_stage(cfg, budget, run, policy, sft_model, reward_model,
                                                         rl_prompts, validation_prompts, uses_world))
        # every run is evaluated from its final model; the next round samples its pairs from the checkpoint RL
        # kept as best on its validation prompts (disjoint from the evaluation's), else the last
        evaluate_key = "evaluate" if cfg.rl_run == "ppo" else f"evaluate-{cfg.rl_run}"
        pipe.run(evaluate_key + tag, lambda: _evaluate_stage(cfg, root / "eval", world, str(run / "model"),
                                                             sft_model, eval_prompts, uses_world, reward_model,
                                                             round_index, "" if cfg.model else pretrained))
        policy = str(run / "best") if (run / "best" / "config.json").exists() else str(run / "model")
    pipe.run("report", lambda: _report_stage(root), always=True)  # it shows every run the directory holds
    total = time.perf_counter() - started
    print(f"demo: finished in {total / 60:.1f} min -> {root / 'report.html'}")
    return pipe.state


# ---------------------------------------------------------------------------------------------------------- stages


def _split_heldout(path: str, n_test: int, out_dir: Path, seed: int) -> tuple[str, str]:
    """``n_test`` held-out prompts for the final evaluation (the pipeline's one held-out split), the rest for PPO's
    validation."""
    from moss_rlhf.data.splits import held_out_split

    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < n_test + 16:
        raise ConfigError(f"{path}: {len(lines)} held-out prompts; the demo needs at least {n_test + 16} "
                          f"({n_test} for evaluation, the rest for PPO's validation)")
    validation_lines, test_lines = held_out_split(lines, n_test, seed, f"prompts in {path}")
    test, validation = out_dir / "test_prompts.jsonl", out_dir / "validation_prompts.jsonl"
    atomic_write_text(test, "\n".join(test_lines) + "\n")
    atomic_write_text(validation, "\n".join(validation_lines) + "\n")
    return str(test), str(validation)


def _tokenizer_stage(cfg: DemoConfig, root: Path, world: Path) -> dict:
    from moss_rlhf.data.corpus import corpus_texts
    from moss_rlhf.tokenizer import train_tokenizer

    if cfg.model:
        return {"summary": f"using {cfg.model}'s own tokenizer"}
    texts = corpus_texts(cfg.corpus or [str(world / "pretrain.jsonl"), str(world / "sft.jsonl")])
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    tokenizer.save_pretrained(root / "tokenizer")
    return {"summary": f"{len(tokenizer)} tokens from {len(texts)} documents"}


def _pretrain_stage(cfg: DemoConfig, budget: Budget, root: Path, world: Path) -> dict:
    from moss_rlhf.stages import pretrain

    pc = pretrain.PretrainConfig(
        out=str(root / "pretrain"), data=cfg.corpus or [str(world / "pretrain.jsonl")],
        eval_data=[] if cfg.corpus else [str(world / "pretrain_eval.jsonl")], tokenizer=str(root / "tokenizer"),
        model=budget.model_size, seq_len=128, batch_size=PRETRAIN_BATCH, max_steps=budget.pretrain_steps, lr=2e-3,
        warmup_steps=20, eval_every=max(1, budget.pretrain_steps // 4), save_every=250, resume=True, seed=cfg.seed,
        device=cfg.device, log_every=10)
    result = pretrain.run(pc)
    return {"summary": f"eval loss {result.eval_loss:.3f} (perplexity {_exp(result.eval_loss):.1f}) after "
                       f"{result.step} steps", "eval_loss": result.eval_loss}


def _sft_stage(cfg: DemoConfig, budget: Budget, root: Path, world: Path, base: str) -> dict:
    from moss_rlhf.stages import sft

    sc = sft.SFTConfig(out=str(root / "sft"), model=base, data=cfg.sft_data or [str(world / "sft.jsonl")],
                       max_steps=budget.sft_steps, batch_size=128, seq_len=256, max_len=256, lr=1e-3,
                       warmup_steps=10, eval_every=max(1, budget.sft_steps // 3), save_every=50, resume=True,
                       seed=cfg.seed, device=cfg.device, log_every=5)
    result = sft.run(sc)
    return {"summary": f"eval loss {result.eval_loss:.3f} after {result.step} steps", "eval_loss": result.eval_loss}


def _pairs_stage(cfg: DemoConfig, budget: Budget, db: Path, project: str, prompts: str, policy: str,
                 round_index: int) -> dict:
    from moss_rlhf.feedback.store import Store, create_project_from_models
    from moss_rlhf.sampling import SamplingConfig

    subset = db.parent / f"pair-prompts-round{round_index}.jsonl"
    lines = [line for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    start = (round_index - 1) * budget.pair_prompts % max(1, len(lines))
    chosen = (lines[start:] + lines[:start])[: budget.pair_prompts]
    atomic_write_text(subset, "\n".join(chosen) + "\n")
    store = Store(str(db))
    try:
        attempt = 1
        while store.project_id(project) is not None:
            # an earlier attempt of this round (interrupted, or redone with --from-stage) keeps its rows: judgements
            # are never deleted; this attempt labels a project of its own
            attempt += 1
            project = f"round-{round_index}-attempt-{attempt}"
        created = create_project_from_models(store, project, subset, [policy], k=cfg.responses_per_prompt,
                                             annotators_per_item=cfg.annotators,  # an odd count: always a majority
                                             sampling=SamplingConfig(max_new_tokens=48, temperature=1.0),
                                             seed=cfg.seed + round_index, device=cfg.device, batch_size=64)
    finally:
        store.close()
    return {"summary": f"{len(chosen)} prompts × {cfg.responses_per_prompt} replies from "
                       f"{Path(policy).parent.name} (feedback project {project!r}): {created.duplicates_removed} "
                       f"repeated replies removed, {created.items_dropped} prompts without two different replies "
                       f"dropped", "project": project}


def _label_stage(cfg: DemoConfig, db: Path, project: str, out: Path, round_index: int) -> dict:
    from moss_rlhf.feedback.export import export_preferences
    from moss_rlhf.feedback.simulate import AnnotatorModel, simulate
    from moss_rlhf.feedback.store import Store

    store = Store(str(db))
    try:
        summary = simulate(store, project, annotators=cfg.annotators,
                           model=AnnotatorModel(error_rate=cfg.annotator_error_rate), seed=cfg.seed + round_index)
        out.mkdir(parents=True, exist_ok=True)
        exported = export_preferences(store, project, out / "preferences.jsonl", ties_path=out / "ties.jsonl")
    finally:
        store.close()
    agree = summary.agreement
    text = (f"{summary.judgements} judgements by {len(summary.annotators)} simulated annotators → {exported.pairs} "
            f"preference pairs ({exported.ties} ties/both-bad left out); annotators agree with the gold judge on "
            f"{agree:.1%} of the pairs it does not tie")
    return {"summary": text, "annotator_gold_agreement": agree, "pairs": exported.pairs}


def _reward_settings(cfg: DemoConfig, budget: Budget) -> dict:
    """The demo's reward-model training, shared by the reward model and the strength ensemble's members. lr 6e-4:
    at 2e-4 the reward model learned the manners (rude, rambling) and less of the content."""
    return dict(max_steps=budget.reward_steps, batch_size=16, lr=6e-4, warmup_steps=10,
                eval_every=max(1, budget.reward_steps // 3), save_every=50, seed=cfg.seed, device=cfg.device,
                log_every=5, max_len=192)


def _reward_stage(cfg: DemoConfig, budget: Budget, out: Path, init: str, preference_files: list[str],
                  uses_world: bool, meta_file: Path | None = None) -> dict:
    from moss_rlhf.stages import reward

    extra = dict(PART2_REWARD) if cfg.reward_recipe == "part2" else {}
    if meta_file is not None:
        extra.update(meta_data=[str(meta_file)], **METARM_SETTINGS)
    rc = reward.RewardConfig(out=str(out), model=init, data=preference_files, resume=True,
                             **_reward_settings(cfg, budget), **extra)
    result = reward.run(rc)
    acc = result.eval_metrics.get("eval/accuracy", float("nan"))
    summary = f"held-out accuracy {acc:.3f} against the annotators' labels"
    gold = _reward_gold_agreement(out / "model", out / "held_out.jsonl", cfg) if uses_world else None
    if gold is not None:
        summary += f", {gold:.3f} against the gold judge's ordering"
    treated = ", ".join(f"{k}={v}" for k, v in extra.items() if k != "meta_data")
    return {"summary": summary + (f" ({treated})" if treated else ""), "accuracy": acc, "gold_accuracy": gold}


def _strength_stage(cfg: DemoConfig, budget: Budget, out: Path, init: str, preference_files: list[str]) -> dict:
    """Part II's preference strength of every labelled pair: ``STRENGTH_MEMBERS`` reward models, each on a bootstrap
    resample, trained as the demo's reward model is (from SFT)."""
    from moss_rlhf.stages import reward_strength

    sc = reward_strength.StrengthConfig(out=str(out), model=init, data=preference_files, members=STRENGTH_MEMBERS,
                                        split="bootstrap", progress=False, **_reward_settings(cfg, budget))
    summary = reward_strength.run(sc)
    return {"summary": f"{STRENGTH_MEMBERS} reward models: {summary['negative_share']:.1%} of "
                       f"{summary['pairs']} pairs have a negative mean strength", **summary}


def _meta_stage(cfg: DemoConfig, out: Path, prompts: str, policy: str, round_index: int) -> dict:
    """MetaRM's meta set: ``METARM_SAMPLES`` replies per prompt from the current policy (``moss-rlhf generate``), on a
    slice of the RL prompts that moves with the round."""
    from moss_rlhf.stages import generate

    n, k = METARM_SAMPLES
    lines = [line for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    start = (round_index - 1) * n % max(1, len(lines))
    subset = out.parent / "prompts.jsonl"
    atomic_write_text(subset, "\n".join((lines[start:] + lines[:start])[:n]) + "\n")
    rows = generate.run(generate.GenerateConfig(model=policy, prompts_file=str(subset), num_samples=k,
                                                max_new_tokens=48, temperature=1.0, seed=cfg.seed + round_index,
                                                out=str(out), device=cfg.device, batch_size=64))
    return {"summary": f"{len(rows)} replies ({k} per prompt) from {Path(policy).parent.name}/{Path(policy).name}"}


def _reward_gold_agreement(model_dir: Path, held_out_file: Path, cfg: DemoConfig) -> float | None:
    """How often the reward model orders the pairs the reward stage held out (its ``held_out.jsonl``) as the gold
    judge does (pairs the judge scores equal are left out)."""
    from moss_rlhf.data.formats import load_preferences
    from moss_rlhf.demo.judge import judge
    from moss_rlhf.models import load_scorer, resolve_device
    from moss_rlhf.stages.reward import score_pairs
    from moss_rlhf.tokenizer import load_tokenizer

    held_out = load_preferences(str(held_out_file))
    gold = [(judge(p.prompt[-1]["content"], p.chosen).score, judge(p.prompt[-1]["content"], p.rejected).score)
            for p in held_out]
    keep = [i for i, (a, b) in enumerate(gold) if a != b]
    if not keep:
        return None
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_scorer(str(model_dir), tokenizer).to(device)
    chosen, rejected = score_pairs(model, tokenizer, [held_out[i] for i in keep], max_len=192, device=device)
    agree = [(float(c) > float(r)) == (gold[i][0] > gold[i][1]) for i, c, r in zip(keep, chosen, rejected)]
    return sum(agree) / len(agree)


def _rl_stage(cfg: DemoConfig, budget: Budget, out: Path, policy: str, reference: str, reward_model: str,
              prompts: str, eval_prompts: str, uses_world: bool) -> dict:
    """The RL stage with ``cfg.algorithm``'s preset. Every recipe samples 64 replies per step (PPO-max, REINFORCE++
    and ReMax: 64 prompts; the group recipes: 16 prompts × 4) and updates on mini-batches of 32."""
    from moss_rlhf.demo.judge import gold_scores
    from moss_rlhf.stages import rl

    grouped = cfg.algorithm in ("grpo", "dr_grpo", "dapo", "rloo")
    # the demo's reward model is small and easy to over-optimise: with GRPO's β 0.04 the gold score peaked at step 7
    # and fell below SFT's by step 60; these β kept it up in a sweep on the default world (the presets keep the
    # papers' values). PPO-max takes 0.2 (its preset: 0.1) to keep the content the reward model cannot judge near
    # SFT's: it tells a rude or rambling reply from a clean one every time, a wrong product or polarity barely better
    # than chance. With six replies per feedback prompt and the reward model's lr 6e-4 this raised the final mean
    # gold from 6.81 to 7.48 on the same SFT model. DAPO has no KL by design
    kl_coef = {"grpo": 0.5, "dr_grpo": 0.5, "rloo": 0.1, "reinforce_pp": 0.05, "remax": 0.05,
               "ppo_max": 0.2}.get(cfg.algorithm)
    gold = cfg.rl_reward == "gold"
    prompts_per_step = (16 if grouped else 64) // (2 if cfg.quick else 1)
    rc = rl.RLConfig(out=str(out), policy=policy, reference=reference, reward_model=reward_model,
                     reward_fn=[GOLD_REWARD] if gold else [], prompts=[prompts], eval_prompts=[eval_prompts],
                     max_steps=budget.ppo_steps, preset=cfg.algorithm, group_size=4 if grouped else None,
                     rollout_batch=prompts_per_step, mini_batch=32 if not cfg.quick else 16, batch_size=16,
                     lr=5e-5, min_lr_ratio=0.0, kl_coef=kl_coef, eval_every=max(1, budget.ppo_steps // 8),
                     save_every=max(1, budget.ppo_steps // 3),
                     resume=True, seed=cfg.seed, device=cfg.device)
    # the learning rate decays to 0 (cosine): at a constant one PPO-max's validation gold fell from 8.07 at step 42
    # to 7.57 at step 60 while the reward model's score held; decayed, it stayed at 7.92–7.94 from step 42 on.
    # The gold judge validates (and picks best/) on the world's prompts; in an RLHF run it never reaches the training
    # signal (with --rl-reward gold it is the training signal, and the run is reported apart)
    metrics = rl.run(rc, scorers={"gold": gold_scores} if uses_world else None)
    keys = {k: metrics.get(k) for k in ("val/reward", "val/gold", "kl/per_token") if k in metrics}
    text = ", ".join(f"{k} {v:.3f}" for k, v in keys.items() if isinstance(v, (int, float)))
    return {"summary": f"{cfg.rl_label}: {text or 'done'}", **{k: v for k, v in keys.items()}}


def _dpo_stage(cfg: DemoConfig, budget: Budget, out: Path, policy: str, reference: str,
               preference_files: list[str]) -> dict:
    """DPO (or KTO, each pair a desirable and an undesirable reply) from the labelled pairs the reward model learned
    from: the policy starts at ``policy`` (SFT in round 1), the reference is SFT; held-out records report the reward
    accuracy."""
    from moss_rlhf.stages import dpo

    loss, beta, lr, batch = ("kto", *KTO_SETTINGS) if cfg.algorithm == "kto" else ("sigmoid", *DPO_SETTINGS)
    dc = dpo.DPOConfig(out=str(out), model=policy, reference=reference, data=preference_files, loss=loss,
                       beta=beta, lr=lr, batch_size=batch, max_steps=budget.dpo_steps, warmup_steps=10,
                       eval_every=max(1, budget.dpo_steps // 4), save_every=max(1, budget.dpo_steps // 3),
                       max_len=128, resume=True, seed=cfg.seed, device=cfg.device)
    result = dpo.run(dc)
    m = result.eval_metrics
    return {"summary": f"{cfg.rl_label}: held-out reward accuracy {m.get('eval/accuracy', float('nan')):.3f}, margin "
                       f"{m.get('eval/margin', float('nan')):.3f} after {result.step} steps",
            **{k: m[k] for k in ("eval/accuracy", "eval/margin") if k in m}}


def _evaluate_stage(cfg: DemoConfig, out_dir: Path, world: Path, policy: str, sft_model: str, eval_prompts: str,
                    uses_world: bool, reward_model: str, round_index: int, pretrained: str) -> dict:
    """The RL run's final model against SFT (``moss-rlhf evaluate``); on the demo world also what each stage added
    (pretrained, SFT, this run: per-task gold and flaw shares, the report's first screen)."""
    from moss_rlhf import evaluate
    from moss_rlhf.demo.stage_table import StageModel, measure_stages
    from moss_rlhf.models import resolve_device

    ec = evaluate.EvaluateConfig(model_a=policy, model_b=sft_model, name_a=f"{cfg.rl_label} (round {round_index})",
                                 name_b="SFT", prompts=eval_prompts, max_prompts=0,
                                 judge="gold" if uses_world else reward_model,
                                 perplexity_data=str(world / "pretrain_eval.jsonl") if uses_world else "",
                                 out=str(out_dir / f"{cfg.rl_run}_round{round_index}_vs_sft.json"),
                                 temperature=1.0, top_p=1.0,  # as sampled for labelling and RL
                                 seed=cfg.seed, device=cfg.device)
    report = evaluate.run(ec)
    win = report["win_rate"]
    names = {report["model_a"]["name"]: "rl", report["model_b"]["name"]: "sft"}
    scores = {names[name]: stats["mean_score"] for name, stats in report["models"].items()}
    kl = (report.get("kl") or {}).get("per_sequence")
    by_task = {}
    if uses_world:
        models = ([StageModel("pretrained", pretrained)] if pretrained else []) + [
            StageModel("SFT", sft_model), StageModel(cfg.rl_label, policy)]
        table = measure_stages(models, eval_prompts, out_dir / "stages" / f"{cfg.rl_run}_round{round_index}.json",
                               seed=cfg.seed, device=str(resolve_device(cfg.device)), reward_model=reward_model)
        by_task = {stage["name"]: stage["by_task"] for stage in table["stages"]}
    text = (f"{cfg.rl_label} vs SFT win rate {win['win_rate']:.1%} (95% interval {win['ci_low']:.1%}–"
            f"{win['ci_high']:.1%}, {win['wins']}/{win['ties']}/{win['losses']} win/tie/loss on {report['n_prompts']} "
            f"prompts); mean score {scores['sft']:.2f} → {scores['rl']:.2f}")
    return {"summary": text, "win_rate": win["win_rate"], "ci": [win["ci_low"], win["ci_high"]],
            "score_sft": scores["sft"], "score_rl": scores["rl"], "kl_per_sequence": kl, "by_task": by_task}


def _report_stage(root: Path) -> dict:
    from moss_rlhf import report

    path = report.run(report.ReportConfig(pipeline=str(root)))
    return {"summary": f"{path}"}


def _exp(x: float | None) -> float:
    import math

    return math.exp(min(x, 50.0)) if x is not None else float("nan")
