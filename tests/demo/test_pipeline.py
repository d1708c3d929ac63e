"""End to end: `moss-rlhf demo --quick` runs every stage, writes every output, and the reward model learned the
simulated annotators' preferences better than chance; re-running skips finished stages."""

from __future__ import annotations

import json

import pytest

from moss_rlhf.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
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

    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("done already") == 10
