"""What each stage added: the table is measured with the same sampling as `moss-rlhf evaluate` (so its numbers agree
with the evaluation's), its shares are the judge's, and the report shows it first."""

from __future__ import annotations

import json
import statistics

from moss_rlhf.demo.judge import FLAW_NAMES, flaws_of, judge
from moss_rlhf.demo.stage_table import StageModel, measure_stages, reward_probe, stage_replies
from moss_rlhf.demo.world import build_world
from moss_rlhf.report import build_sections


def _prompts_file(tmp_path, n_per_task: int = 4):
    rows, seen = [], {}
    for record in build_world(seed=0, size="quick").eval_prompts:
        if seen.get(record["task"], 0) < n_per_task:
            seen[record["task"]] = seen.get(record["task"], 0) + 1
            rows.append(record)
    path = tmp_path / "test_prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def test_stage_table_agrees_with_evaluate_and_feeds_the_report(tmp_path, tiny_model_dir):
    from moss_rlhf import evaluate

    prompts_file, rows = _prompts_file(tmp_path)
    models = [StageModel("pretrained", str(tiny_model_dir)), StageModel("SFT", str(tiny_model_dir)),
              StageModel("PPO-max", str(tiny_model_dir))]
    out = tmp_path / "pipe" / "eval" / "stages" / "ppo_round1.json"
    table = measure_stages(models, str(prompts_file), out, seed=3, samples_per_task=2)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(table))
    pretrained, sft, ppo = table["stages"]
    assert sft["by_task"] == ppo["by_task"]  # the same model and seeds: the same replies

    # the chat-template rows are the replies `moss-rlhf evaluate` samples for the same prompts and seed
    report = evaluate.run(evaluate.EvaluateConfig(model_a=str(tiny_model_dir), model_b=str(tiny_model_dir),
                                                  prompts=str(prompts_file), judge="gold", top_p=1.0,
                                                  temperature=1.0, seed=3, out=str(tmp_path / "e.json")))
    assert abs(next(iter(report["models"].values()))["mean_score"] - sft["mean"]) < 1e-9

    # per task and flaw shares, recomputed here from the replies
    replies = stage_replies(str(tiny_model_dir), [r["prompt"] for r in rows], seed=3, device="cpu")
    for task, mean in pretrained["by_task"].items():
        expected = statistics.mean(judge(r["prompt"], x).score for r, x in zip(rows, replies) if r["task"] == task)
        assert abs(mean - expected) < 1e-9
    found = [flaws_of(r["prompt"], x) for r, x in zip(rows, replies)]
    assert pretrained["flaws"] == {f: sum(f in x for x in found) / len(rows) for f in FLAW_NAMES}
    assert pretrained["clean"] == sum(not x for x in found) / len(rows)
    assert [len([s for s in table["samples"] if s["task"] == t]) for t in table["tasks"]] == [2] * 5
    assert [r["stage"] for r in table["samples"][0]["replies"]] == ["pretrained", "SFT", "PPO-max"]

    section = build_sections(tmp_path / "pipe")[0]
    assert section.title == "What each stage added" and section.ran
    scores, flaws, samples = section.tables
    assert scores.header == ["task", "pretrained", "SFT", "PPO-max"]
    assert scores.rows[-1] == ["all tasks", *(f"{s['mean']:.2f}" for s in table["stages"])]
    assert [row[0] for row in flaws.rows] == ["wrong", "rude", "rambling", "off-instruction", "none (clean)"]
    assert len(samples.rows) == 10 and samples.rows[0][2:] == [
        f"{r['reply']} ({r['score']:.1f})" for r in table["samples"][0]["replies"]]


def test_reward_probe_counts_the_reward_models_choices(tmp_path, tiny_model_dir):
    """The probe's shares are the reward model's choices between each prompt's clean reply and its flawed versions
    (seeded), counted per task and flaw; a reward model with its head negated makes the opposite choice every time."""
    import random

    import torch

    from moss_rlhf.data.formats import Preference
    from moss_rlhf.demo.flaws import FLAWS, flawed_response
    from moss_rlhf.demo.tasks import parse_prompt, reference_for
    from moss_rlhf.models import load_scorer, save_model, score_head
    from moss_rlhf.stages.reward import score_pairs
    from moss_rlhf.tokenizer import load_tokenizer

    prompts_file, rows = _prompts_file(tmp_path, n_per_task=3)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_scorer(str(tiny_model_dir), tokenizer)
    torch.manual_seed(0)
    torch.nn.init.normal_(score_head(model).weight)
    save_model(model, tokenizer, tmp_path / "rm")
    score_head(model).weight.data.neg_()
    save_model(model, tokenizer, tmp_path / "rm-negated")

    probe = reward_probe(str(tmp_path / "rm"), str(prompts_file), seed=1)
    assert probe["flaws"] == list(FLAWS) and list(probe["by_task"]) == ["generation", "translation", "sentiment",
                                                                        "classification", "dialogue"]
    # reference: every clean/flawed pair scored on its own, in the probe's order (its flawed replies, seeded)
    rng, pairs, keys = random.Random("reward-probe/1"), [], []
    for row in rows:
        parsed = parse_prompt(row["prompt"])
        for flaw in FLAWS:
            flawed = flawed_response(parsed, flaw, rng)
            if flawed != reference_for(parsed):
                pairs.append(Preference([{"role": "user", "content": row["prompt"]}], reference_for(parsed), flawed))
                keys.append((row["task"], flaw))
    # the gold judge prefers the clean reply every time: the probe measures a distinction the truth always makes
    assert all(judge(p.prompt[0]["content"], p.chosen).score > judge(p.prompt[0]["content"], p.rejected).score
               for p in pairs)
    chosen, rejected = score_pairs(load_scorer(str(tmp_path / "rm"), tokenizer), tokenizer, pairs, max_len=192)
    right = {}
    for key, c, r in zip(keys, chosen.tolist(), rejected.tolist()):
        right.setdefault(key, []).append(c > r)
    assert 0 < sum(map(sum, right.values())) < len(pairs)  # a random head: some choices each way
    assert probe["pairs"] == sum(map(len, right.values()))
    for (task, flaw), choices in right.items():
        assert probe["by_task"][task][flaw] == sum(choices) / len(choices), (task, flaw)
    for flaw in FLAWS:
        every = [x for (_, f), xs in right.items() if f == flaw for x in xs]
        assert probe["all"][flaw] == sum(every) / len(every)

    negated = reward_probe(str(tmp_path / "rm-negated"), str(prompts_file), seed=1)
    for task, shares in probe["by_task"].items():
        for flaw, share in shares.items():
            assert abs(share + negated["by_task"][task][flaw] - 1) < 1e-12, (task, flaw)

    # the stage table carries it, and the report shows it beside the flaw shares
    out = tmp_path / "pipe" / "eval" / "stages" / "ppo_round1.json"
    table = measure_stages([StageModel("SFT", str(tiny_model_dir))], str(prompts_file), out, seed=1,
                           reward_model=str(tmp_path / "rm"))
    assert table["reward_probe"] == probe
    section = build_sections(tmp_path / "pipe")[0]
    probe_table = section.tables[2]
    assert probe_table.header == ["task", "wrong", "rude", "rambling", "off-instruction"]
    assert probe_table.rows[-1] == ["all tasks", *(f"{probe['all'][f]:.0%}" for f in FLAWS)]
