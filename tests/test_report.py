"""The HTML report: built from a fake pipeline directory (small metrics files and an evaluate JSON), self-contained,
robust to missing stages, and rendered by headless Chromium with every image decoded."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from moss_rlhf.data.formats import DataError
from moss_rlhf.report import build_sections, curves_png, write_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _evaluation() -> dict:
    return {
        "model_a": {"name": "ppo", "path": "p/ppo/model"}, "model_b": {"name": "sft", "path": "p/sft/model"},
        "judge": "gold", "n_prompts": 40,
        "win_rate": {"wins": 24, "ties": 6, "losses": 10, "win_rate": 0.675, "ci_low": 0.55, "ci_high": 0.79,
                     "confidence": 0.95, "bootstrap_resamples": 2000},
        "models": {"ppo": {"mean_score": 6.1, "response_length": 14.2, "distinct_1": 0.41, "distinct_2": 0.7,
                           "perplexity": 9.3},
                   "sft": {"mean_score": 4.9, "response_length": 17.0, "distinct_1": 0.38, "distinct_2": 0.66,
                           "perplexity": 8.8}},
        "kl": {"per_sequence": 1.8, "per_token": 0.12},
        "by_task": {"sentiment": {"n": 20, "win_rate": 0.7, "mean_score_a": 7.0, "mean_score_b": 5.0},
                    "translation": {"n": 20, "win_rate": 0.65, "mean_score_a": 5.2, "mean_score_b": 4.8}},
        "samples": [{"prompt": 'What is the sentiment of "The soup was delicious."?', "task": "sentiment",
                     "a": "The sentiment is positive.", "b": "The sentiment is positive, I think, maybe <b>.",
                     "score_a": 10.0, "score_b": 6.4},
                    {"prompt": "Translate to Chinese: The cat is small.", "task": "translation",
                     "a": "猫很小。", "b": "The cat is small.", "score_a": 9.0, "score_b": 1.0}],
    }


@pytest.fixture()
def pipeline(tmp_path) -> Path:
    root = tmp_path / "pipeline"
    lm = [{"step": s, "train/loss": 6 * math.exp(-s / 40) + 1.2, "train/lr": 1e-3} for s in range(1, 201, 10)]
    lm += [{"step": s, "eval/loss": 6 * math.exp(-s / 40) + 1.4, "eval/perplexity": math.exp(1.4)} for s in (50, 100,
                                                                                                             200)]
    _metrics(root / "pretrain", lm)
    _metrics(root / "sft", [{"step": s, "train/loss": 2.0 - s / 100} for s in range(1, 101, 5)])
    _metrics(root / "reward", [{"step": s, "train/loss": 0.69 - s / 400, "train/accuracy": 0.5 + s / 250,
                                "eval/accuracy": 0.5 + s / 300, "eval/reward_gap": s / 50} for s in range(1, 101, 5)])
    _metrics(root / "ppo", [{"step": s, "reward/raw_mean": -1 + s / 30 + 0.3 * math.sin(s), "kl/per_token": s / 900,
                             "policy/perplexity": 4 + s / 60, "response/length": 20 - s / 10,
                             "val/gold": 4 + s / 40} for s in range(1, 121)])
    (root / "eval").mkdir()
    (root / "eval" / "ppo_vs_sft.json").write_text(json.dumps(_evaluation(), ensure_ascii=False), encoding="utf-8")
    (root / "eval" / "stages").mkdir()
    for name, gold in (("ppo_round1", 6.0), ("ppo_round2", 7.5), ("rl-grpo_round3", 9.0)):
        (root / "eval" / "stages" / f"{name}.json").write_text(json.dumps(_stage_table(gold)), encoding="utf-8")
    return root


def _stage_table(gold: float) -> dict:
    def stage(name, mean):
        return {"name": name, "path": f"p/{name}/model", "mean": mean, "by_task": {"sentiment": mean, "translation": mean / 2},
                "flaws": {"wrong": 0.5, "rude": 0.1, "rambling": 0.2, "off_instruction": 0.0}, "clean": 0.3}

    return {"judge": "gold", "temperature": 1.0, "n_prompts": 40, "tasks": ["sentiment", "translation"],
            "stages": [stage("pretrained", 1.0), stage("SFT", 4.0), stage("PPO-max", gold)],
            "samples": [{"task": "sentiment", "prompt": "p", "replies": [{"stage": n, "reply": "r", "score": 1.0}
                                                                         for n in ("pretrained", "SFT", "PPO-max")]}]}


@pytest.fixture()
def pipeline_with_models(pipeline, tiny_model_dir) -> Path:
    """The fake pipeline plus a policy before (sft/model) and after (ppo/model) RLHF, for the attention maps."""
    import torch

    from moss_rlhf.models import load_causal_lm, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    shutil.copytree(tiny_model_dir, pipeline / "sft" / "model")
    changed = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for p in changed.model.layers[-1].self_attn.parameters():
            p.mul_(3.0)  # sharper attention in the last layer, so "after" differs visibly
    save_model(changed, load_tokenizer(str(tiny_model_dir)), pipeline / "ppo" / "model")
    return pipeline


def test_attention_section_compares_the_two_policies(pipeline_with_models):
    from moss_rlhf.report import attention_section

    section = attention_section(pipeline_with_models, "Hello there")
    assert section.ran and section.figures[0].png.startswith(b"\x89PNG")
    assert "Hello there" in section.note
    assert not (pipeline_with_models / ".report_attention.png").exists()


def test_sections_cover_every_stage(pipeline):
    sections = {s.title: s for s in build_sections(pipeline)}
    assert [t for t, s in sections.items() if not s.ran] == ["Attention before and after RLHF"]  # no models saved
    first = build_sections(pipeline)[0]  # what each stage added: from PPO-max's last round
    assert first.title == "What each stage added" and "ppo_round2.json" in first.note
    assert first.tables[0].rows == [["sentiment", "1.00", "4.00", "7.50"], ["translation", "0.50", "2.00", "3.75"],
                                    ["all tasks", "1.00", "4.00", "7.50"]]
    assert first.tables[1].rows[-1] == ["none (clean)", "30.0%", "30.0%", "30.0%"]
    assert len(sections["PPO-max"].figures) == 1
    assert sections["Reward model"].tables[0].header[1:] == ["eval/accuracy", "train/accuracy", "train/loss",
                                                               "eval/reward_gap"]
    evaluation = sections["Evaluation: ppo vs sft"]
    assert evaluation.tables[0].rows[0][1:3] == ["67.5%", "55.0% – 79.0%"]
    assert "0.1200 per token" in evaluation.note


def test_later_feedback_rounds_get_their_own_sections(pipeline_with_models):
    from moss_rlhf.models import load_causal_lm, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    root = pipeline_with_models
    _metrics(root / "ppo-round2", [{"step": s, "reward/raw_mean": s / 10} for s in range(1, 11)])
    _metrics(root / "reward-round2", [{"step": 5, "eval/accuracy": 0.8}])
    model_dir = root / "sft" / "model"
    save_model(load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)), root / "ppo-round2" / "model")
    titles = [s.title for s in build_sections(root)]
    assert titles.index("Reward model") < titles.index("Reward model (round 2)") < titles.index("PPO-max")
    assert titles.index("PPO-max") < titles.index("PPO-max (round 2)")
    from moss_rlhf.report import stage_rounds

    assert [n for n, _ in stage_rounds(root, "ppo")] == [1, 2]


def test_rl_runs_are_compared_with_rlhf_apart_from_python_rewards(pipeline):
    """A GRPO run against the reward model, an RLOO run against the gold judge and a DPO run join PPO-max: one row
    each, the gold-judge run in its own table (it is not RLHF), and one bar per run."""
    import yaml

    runs = (("rl-grpo", {"preset": "grpo", "reward_fn": []}),
            ("rl-rloo-gold", {"preset": "rloo", "reward_fn": ["moss_rlhf.demo.judge:gold_scores"]}),
            ("dpo", {"loss": "sigmoid", "label_smoothing": 0.0}))
    for run, saved in runs:
        _metrics(pipeline / run, [{"step": s, "reward/raw_mean": s / 10, "time/step_s": 1.0 + s / 100,
                                   "eval/accuracy": 0.5 + s / 40} for s in range(1, 11)])
        (pipeline / run / "config.yaml").write_text(yaml.safe_dump(saved))
        evaluation = _evaluation()
        evaluation["model_a"] = {"name": run, "path": f"p/{run}/model"}
        evaluation["models"][run] = evaluation["models"].pop("ppo")
        (pipeline / "eval" / f"{run}_vs_sft.json").write_text(json.dumps(evaluation), encoding="utf-8")
    sections = {s.title: s for s in build_sections(pipeline)}
    section = sections["RL algorithms compared"]
    rlhf, python_reward = section.tables
    assert [row[:3] for row in rlhf.rows] == [["ppo", "the reward model", "67.5%"],
                                              ["dpo", "the preference pairs", "67.5%"],
                                              ["rl-grpo", "the reward model", "67.5%"]]
    assert "GRPO" in sections and "RL against the gold judge (RLOO)" in sections
    assert sections["DPO"].ran and len(sections["DPO"].figures) == 1  # its own panels (accuracy)
    assert python_reward.caption.startswith("RL against a Python reward")
    assert python_reward.rows[0][:2] == ["rl-rloo-gold", "the gold judge"] and python_reward.rows[0][-2:] == ["1.06",
                                                                                                        "10"]
    assert len(section.figures) == 1 and section.figures[0].png.startswith(b"\x89PNG")


def test_missing_stages_say_not_run(tmp_path):
    (tmp_path / "p" / "ppo").mkdir(parents=True)
    (tmp_path / "p" / "ppo" / "metrics.jsonl").write_text('{"step": 1, "unrelated/key": 3}\n', encoding="utf-8")
    sections = build_sections(tmp_path / "p")
    assert sum(not s.ran for s in sections) == len(sections) - 1
    ppo = next(s for s in sections if s.title == "PPO-max")
    assert ppo.ran and not ppo.figures and "None of the expected metrics" in ppo.note
    page = write_report(tmp_path / "out", sections).read_text(encoding="utf-8")
    assert page.count("not run") >= 2 * (len(sections) - 1)


def test_bad_inputs_name_file_and_line(tmp_path):
    _metrics(tmp_path / "p" / "sft", [{"step": 1, "train/loss": 1.0}])
    with (tmp_path / "p" / "sft" / "metrics.jsonl").open("a") as fh:
        fh.write("{broken\n")
    with pytest.raises(DataError, match=r"sft/metrics.jsonl:2"):
        build_sections(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "sft")
    (tmp_path / "p" / "eval").mkdir()
    (tmp_path / "p" / "eval" / "x.json").write_text('{"model_a": {}}', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.json: model_b: missing"):
        build_sections(tmp_path / "p")
    (tmp_path / "p" / "eval" / "x.json").unlink()
    (tmp_path / "p" / "eval" / "stages").mkdir()
    (tmp_path / "p" / "eval" / "stages" / "ppo_round1.json").write_text('{"stages": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"ppo_round1.json: tasks: missing"):
        build_sections(tmp_path / "p")


def test_curves_skip_missing_and_non_finite_keys():
    rows = [{"step": 1, "a": 1.0, "b": float("nan")}, {"step": 2, "a": 0.5, "b": None}]
    assert curves_png(rows, [("b only", ["b"])]) is None
    png = curves_png(rows, [("a", ["a", "b"]), ("none", ["zzz"])])
    assert png.startswith(b"\x89PNG")


def test_report_is_self_contained(pipeline, tmp_path):
    path = write_report(tmp_path / "out", build_sections(pipeline), "Test report", subtitle="<pipeline>")
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 5  # curves of 4 stages and the win-rate bars
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no external requests
    assert "&lt;pipeline&gt;" in page and "maybe &lt;b&gt;." in page  # escaped
    assert "猫很小。" in page


@pytest.mark.browser
def test_report_renders_in_chromium(pipeline_with_models, tmp_path):
    pipeline = pipeline_with_models
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    path = write_report(tmp_path / "out", build_sections(pipeline), "MOSS-RLHF pipeline report",
                        subtitle=str(pipeline))
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 6 and all(w > 0 for w in widths), widths  # 4 stages, win rate, attention
            # what each stage added, 4 stages, RL compared, evaluation, attention
            assert page.locator("section").count() == 8
            first = page.locator("section").first
            assert "What each stage added" in first.locator("h2").inner_text()
            assert first.locator("table").count() == 3 and "7.50" in first.locator("table").first.inner_text()
            assert page.locator(".badge.missing").count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
