"""``moss-rlhf demo``: the whole MOSS-RLHF story in one command, on a laptop CPU.

build the demo world → train the tokenizer → pretrain → SFT → sample response pairs from the SFT policy →
simulated annotators judge them through the feedback store (the same path as people) → export preferences →
reward model → RL (PPO-max by default; ``--algorithm grpo`` and the other critic-free recipes against the same
reward model; ``--rl-reward gold``: RL against the gold judge itself, reported apart; ``--algorithm dpo`` or ``kto``:
offline optimisation on the labelled pairs instead) → evaluate (gold judge, each
RL run's final model vs SFT) → report (with a page comparing every RL run the directory holds).

Every stage (a function of ``demo.pipeline_stages``) writes into ``DIR/<stage>``; ``DIR/pipeline.json`` records the
finished ones (atomically), so re-running skips them and a broken training stage resumes from its last checkpoint.
``--from STAGE`` redoes from a stage.
``--rounds N`` repeats the feedback loop as the seed describes ("repeat until the model meets human expectations"):
new pairs from the current policy, new labels, the reward model continues training, PPO runs again. With
``--metarm`` the later rounds take no new labels: the reward model continues on round 1's pairs with MetaRM (Dou et al.
2024) on replies sampled from the current policy, which keeps it able to tell that shifted policy's replies apart.

``--reward-recipe part2`` trains the reward model as "Secrets of RLHF ... Part II" advises: an ensemble measures
every labelled pair's preference strength (``moss-rlhf reward strength``), and the reward model trains on the pairs
with the settings in ``pipeline_stages.PART2_REWARD`` — soft labels from the strength, and the reply's likelihood in
the reward (``--likelihood-weight``, in the ensemble's members too) — in its own directories,
``reward-part2/`` and ``rl-<algorithm>-part2/``, beside the plain run's, so the report compares both.

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
from moss_rlhf.demo import pipeline_stages as stages
from moss_rlhf.files import atomic_write_text

STAGES = ("world", "tokenizer", "pretrain", "sft", "pairs", "label", "reward", "ppo", "evaluate", "report")
LOOP_STAGES = ("pairs", "label", "reward", "ppo", "evaluate")  # repeated once per feedback round
ALGORITHMS = ("ppo_max", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "remax",  # `moss-rlhf rl --preset`s
              "dpo", "kto")  # `moss-rlhf dpo [--loss kto]`: from the labelled pairs, no reward model
OFFLINE = ("dpo", "kto")  # trained on the labelled pairs themselves by `moss-rlhf dpo`


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
                                         "strength of every pair, then soft labels and the reply's likelihood in the "
                                         "reward; its own reward-part2/ and RL run, compared in the report)",
                                choices=("plain", "part2"))
    reference_temperature: float | None = option(None, "RL recipes: take the KL to SFT at this temperature (below 1: "
                                                       "to SFT sharpened towards its mode, which knows content the "
                                                       "reward model cannot judge); a run of its own, "
                                                       "rl-<algorithm>-ref<τ>/", above=0.0)
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
        if self.reference_temperature is not None and (self.algorithm in OFFLINE or self.algorithm == "dapo"):
            raise ConfigError(f"--reference-temperature sharpens the reference of RL's KL term; --algorithm "
                              f"{self.algorithm} has none")
        if self.rl_reward == "gold" and self.eval_prompts:
            raise ConfigError("--rl-reward gold needs the demo world's prompts (the gold judge knows only its tasks); "
                              "leave out --eval-prompts")

    @property
    def rl_run(self) -> str:
        """The RL run's directory and stage name: ``ppo`` for PPO-max against the reward model (the pipeline's
        first layout), ``rl-<algorithm>`` for the others, with ``-gold`` when it optimises the gold judge, and the
        reward model's variant and ``-ref<τ>`` (the KL to a sharpened SFT) after it."""
        variant = self.reward_variant + (f"-ref{self.reference_temperature:g}"
                                         if self.reference_temperature is not None else "")
        if self.algorithm in ("ppo_max", *OFFLINE) and self.rl_reward == "model" and not variant:
            return "ppo" if self.algorithm == "ppo_max" else self.algorithm
        return f"rl-{self.algorithm}" + ("-gold" if self.rl_reward == "gold" else "") + variant

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
            (" (MetaRM between rounds)" if self.metarm else "") + \
            (f" (KL to SFT at T {self.reference_temperature:g})" if self.reference_temperature is not None else "")


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
    eval_prompts, validation_prompts = stages.split_heldout(cfg.eval_prompts or str(world / "eval_prompts.jsonl"),
                                                            budget.eval_prompts, root / "eval", cfg.seed)

    pipe.run("tokenizer", lambda: stages.tokenizer_stage(cfg, root, world))
    pretrained = str(root / "pretrain" / "model")
    policy = cfg.model or pretrained
    if not cfg.model:
        pipe.run("pretrain", lambda: stages.pretrain_stage(cfg, budget, root, world))
    pipe.run("sft", lambda: stages.sft_stage(cfg, budget, root, world, policy))
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
            pipe.run("meta" + tag, lambda: stages.meta_stage(cfg, meta_file, rl_prompts, policy, round_index))
        else:
            if not cfg.preferences:
                pairs = pipe.run("pairs" + tag, lambda: stages.pairs_stage(cfg, budget, db, project, prompts,
                                                                           policy, round_index))
                project = pairs.get("project", project)
                pipe.run("label" + tag, lambda: stages.label_stage(cfg, db, project, sub("feedback"), round_index))
            reward_data = cfg.preferences or [str(sub("feedback") / "preferences.jsonl")]
            if cfg.reward_recipe == "part2":
                pipe.run("strength" + tag, lambda: stages.strength_stage(cfg, budget, sub("strength"), sft_model,
                                                                         reward_data))
                reward_data = [str(sub("strength") / "strength.jsonl")]
        preference_files = reward_data  # what the reward model learns from (and DPO, KTO)
        init_reward = reward_model or sft_model
        pipe.run(cfg.reward_run + tag, lambda: stages.reward_stage(cfg, budget, sub(cfg.reward_run), init_reward,
                                                                   preference_files, uses_world, meta_file))
        reward_model = str(sub(cfg.reward_run) / "model")
        run = sub(cfg.rl_run)
        if cfg.algorithm in OFFLINE:
            pipe.run(cfg.rl_run + tag, lambda: stages.dpo_stage(cfg, budget, run, policy, sft_model, preference_files))
        else:
            pipe.run(cfg.rl_run + tag, lambda: stages.rl_stage(cfg, budget, run, policy, sft_model, reward_model,
                                                               rl_prompts, validation_prompts, uses_world))
        # every run is evaluated from its final model; the next round samples its pairs from the checkpoint RL
        # kept as best on its validation prompts (disjoint from the evaluation's), else the last
        evaluate_key = "evaluate" if cfg.rl_run == "ppo" else f"evaluate-{cfg.rl_run}"
        pipe.run(evaluate_key + tag, lambda: stages.evaluate_stage(cfg, root / "eval", world, str(run / "model"),
                                                                   sft_model, eval_prompts, uses_world,
                                                                   reward_model, round_index,
                                                                   "" if cfg.model else pretrained))
        policy = str(run / "best") if (run / "best" / "config.json").exists() else str(run / "model")
    pipe.run("report", lambda: stages.report_stage(root), always=True)  # it shows every run the directory holds
    total = time.perf_counter() - started
    print(f"demo: finished in {total / 60:.1f} min -> {root / 'report.html'}")
    return pipe.state
