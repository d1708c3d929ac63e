"""End to end: `moss-rlhf demo --quick --rounds 2` runs every stage (the feedback loop twice), writes every output,
and the reward model learned the simulated annotators' preferences better than chance; re-running skips finished
stages; critic-free, DPO and KTO runs join the same directory and the report compares them; --from-stage redoes a stage without
losing earlier judgements."""

from __future__ import annotations

import json

import pytest
import yaml

from moss_rlhf.cli import main
from moss_rlhf.demo.pipeline_stages import PART2_REWARD, STRENGTH_MEMBERS
from moss_rlhf.models import LIKELIHOOD_WEIGHT


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole pipeline four times over (about 4 minutes on 2 idle cores): a hang guard only
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--rounds", "2", "--out", str(out), "--device", "cpu"]) == 0
    state = json.loads((out / "pipeline.json").read_text())
    for stage in ("world", "tokenizer", "pretrain", "sft", "pairs", "label", "reward", "ppo", "evaluate", "report"):
        assert stage in state["done"], stage
    for path in ("world/world.json", "tokenizer/tokenizer.json", "pretrain/model/model.safetensors",
                 "sft/model/model.safetensors", "feedback.db", "feedback/preferences.jsonl",
                 "reward/model/model.safetensors", "ppo/model/model.safetensors", "ppo/metrics.jsonl",
                 "eval/ppo_round1_vs_sft.json", "report.html"):
        assert (out / path).exists(), path
    assert state["done"]["reward"]["accuracy"] > 0.5
    evaluation = json.loads((out / "eval" / "ppo_round1_vs_sft.json").read_text())
    assert evaluation["n_prompts"] >= 200
    for stage in ("pairs@2", "label@2", "reward@2", "ppo@2", "evaluate@2"):
        assert stage in state["done"], stage
    for path in ("feedback-round2/preferences.jsonl", "reward-round2/model/model.safetensors",
                 "ppo-round2/metrics.jsonl", "eval/ppo_round2_vs_sft.json"):
        assert (out / path).exists(), path
    assert "round 2" in (out / "report.html").read_text(encoding="utf-8").lower()
    # what each stage added: the pretrained, SFT and PPO-max models, the same replies as the evaluation's
    table = json.loads((out / "eval" / "stages" / "ppo_round2.json").read_text(encoding="utf-8"))
    assert [stage["name"] for stage in table["stages"]] == ["pretrained", "SFT", "PPO-max"]
    second = json.loads((out / "eval" / "ppo_round2_vs_sft.json").read_text())
    assert abs(second["models"]["SFT"]["mean_score"] - table["stages"][1]["mean"]) < 1e-9
    assert state["done"]["evaluate@2"]["by_task"]["PPO-max"] == table["stages"][2]["by_task"]
    assert "What each stage added" in (out / "report.html").read_text(encoding="utf-8")

    capsys.readouterr()
    assert main(["demo", "--quick", "--rounds", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("done already") == 14  # the report always re-runs

    # critic-free runs join the same directory: GRPO against the reward model (its KL to a sharpened SFT: a run of
    # its own, the temperature in its config and on the report), RLOO against the gold judge
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--algorithm", "grpo", "--ppo-steps", "3",
                 "--reference-temperature", "0.5"]) == 0
    assert yaml.safe_load((out / "rl-grpo-ref0.5" / "config.yaml").read_text())["reference_temperature"] == 0.5
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--algorithm", "rloo", "--rl-reward", "gold",
                 "--ppo-steps", "2"]) == 0
    # DPO learns from the same labelled pairs, without the reward model
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--algorithm", "dpo"]) == 0
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--algorithm", "kto"]) == 0
    # Part II's reward model (strength ensemble, then its treatment) and MetaRM rounds join the same directory too
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--reward-recipe", "part2",
                 "--ppo-steps", "2"]) == 0
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--rounds", "2", "--metarm",
                 "--ppo-steps", "2"]) == 0
    for path in ("rl-grpo-ref0.5/model/model.safetensors", "eval/rl-grpo-ref0.5_round1_vs_sft.json",
                 "rl-rloo-gold/model/model.safetensors", "eval/rl-rloo-gold_round1_vs_sft.json",
                 "dpo/model/model.safetensors", "eval/dpo_round1_vs_sft.json",
                 "kto/model/model.safetensors", "eval/kto_round1_vs_sft.json",
                 "strength/strength.jsonl", "reward-part2/model/model.safetensors",
                 "eval/rl-ppo_max-part2_round1_vs_sft.json", "meta-round2/samples.jsonl",
                 "reward-metarm-round2/model/model.safetensors", "eval/rl-ppo_max-metarm_round2_vs_sft.json"):
        assert (out / path).exists(), path
    state = json.loads((out / "pipeline.json").read_text())
    assert "pairs@2" in state["done"] and state["done"]["reward-part2"]["gold_accuracy"] is not None
    # the ensemble that measures strength scores as the Part II reward model does: with the reply's likelihood
    members = sorted((out / "strength" / "members").glob("*/model"))
    assert len(members) == STRENGTH_MEMBERS
    for model in [out / "reward-part2" / "model", *members]:
        saved = json.loads((model / "config.json").read_text())
        assert saved[LIKELIHOOD_WEIGHT] == PART2_REWARD["likelihood_weight"], model
    meta = [json.loads(line) for line in (out / "meta-round2" / "samples.jsonl").read_text().splitlines()]
    assert len(meta) == 4 * len({row["prompt"] for row in meta})  # 4 replies per prompt, from round 1's PPO-max
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "RL algorithms compared" in html and "GRPO" in html and "RLOO against the gold judge" in html
    assert "DPO from the preference pairs" in html and "KTO from the preference pairs" in html
    assert "the reward model (reward-part2/)" in html and "the reward model (reward-metarm-round2/)" in html
    assert "GRPO (KL to the reference at T 0.5)" in html and "GRPO (KL to SFT at T 0.5) (round 1)" in html

    from moss_rlhf.feedback.store import Store

    store = Store(str(out / "feedback.db"))
    judgements_before = len(store.judgements())
    store.close()
    assert main(["demo", "--quick", "--rounds", "2", "--from-stage", "pairs", "--out", str(out),
                 "--device", "cpu", "--ppo-steps", "2"]) == 0
    store = Store(str(out / "feedback.db"))
    assert len(store.judgements()) > judgements_before  # new projects labelled; earlier rows all kept
    store.close()


def test_budget_takes_the_model_size_and_step_overrides(tmp_path):
    from moss_rlhf.config import ConfigError, validate
    from moss_rlhf.demo.pipeline import DemoConfig, Pipeline

    default = Pipeline(DemoConfig(out=str(tmp_path / "a"))).budget
    assert (default.model_size, default.pretrain_steps) == ("tiny", 1600)
    budget = Pipeline(DemoConfig(out=str(tmp_path / "b"), model_size="mini", pretrain_steps=900)).budget
    assert (budget.model_size, budget.pretrain_steps, budget.sft_steps) == ("mini", 900, default.sft_steps)
    with pytest.raises(ConfigError, match="model_size|model-size"):
        validate(DemoConfig(out=str(tmp_path / "c"), model_size="huge"))


def test_reward_variants_have_runs_of_their_own_and_bad_combinations_are_refused(tmp_path):
    """Part II's reward model and MetaRM rounds name their directories apart from the plain runs' (so one pipeline
    directory holds and compares all), `--from-stage reward` redoes them with the reward stage, and options that
    cannot go together are refused."""
    from moss_rlhf.config import ConfigError, validate
    from moss_rlhf.demo.pipeline import DemoConfig, stage_of

    plain, part2 = DemoConfig(out="x"), DemoConfig(out="x", reward_recipe="part2")
    assert (plain.reward_run, plain.rl_run) == ("reward", "ppo")
    assert (part2.reward_run, part2.rl_run, part2.rl_label) == ("reward-part2", "rl-ppo_max-part2",
                                                               "PPO-max (Part II reward model)")
    sharpened = DemoConfig(out="x", reference_temperature=0.5)
    assert (sharpened.reward_run, sharpened.rl_run, sharpened.rl_label) == ("reward", "rl-ppo_max-ref0.5",
                                                                           "PPO-max (KL to SFT at T 0.5)")
    assert DemoConfig(out="x", reward_recipe="part2", reference_temperature=0.3).rl_run == "rl-ppo_max-part2-ref0.3"
    metarm = DemoConfig(out="x", rounds=2, metarm=True, algorithm="grpo")
    assert (metarm.reward_run, metarm.rl_run) == ("reward-metarm", "rl-grpo-metarm")
    assert [stage_of(k) for k in ("strength", "reward-part2", "meta@2", "reward-metarm@2", "rl-grpo-metarm@2",
                                  "evaluate-rl-grpo-metarm@2")] == ["reward"] * 4 + ["ppo", "evaluate"]
    for bad, match in ((dict(metarm=True), "--rounds 2"), (dict(rounds=2, metarm=True, algorithm="dpo"), "RL"),
                       (dict(reward_recipe="part2", algorithm="kto"), "does not use one"),
                       (dict(reward_recipe="part2", rl_reward="gold"), "does not use one"),
                       (dict(reference_temperature=0.5, algorithm="dpo"), "has none"),
                       (dict(reference_temperature=0.5, algorithm="dapo"), "has none")):
        with pytest.raises(ConfigError, match=match):
            validate(DemoConfig(out=str(tmp_path), **bad))
