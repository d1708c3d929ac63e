"""Evaluation: the statistics on fixed inputs, then whole runs on tiny models (identical models tie with zero KL; the
reported KL is KL(A_T ‖ B_T) at the sampling temperature, whatever filters shaped the replies; a model trained on
the held-out text's distribution has the lower perplexity and drifts away from its start)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moss_rlhf.evaluate import (EvaluateConfig, bootstrap_interval, distinct_n, kl_summary, outcomes, perplexity,
                                run, win_rate_with_ties)
from tests.conftest import single_thread


def test_outcomes_count_ties_half():
    results = outcomes([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 4.9999999])
    assert results == [1.0, 0.5, 0.0, 0.5]
    assert win_rate_with_ties(results) == pytest.approx(0.5)
    assert win_rate_with_ties([1.0, 1.0, 0.5, 0.0]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="scores for A"):
        outcomes([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no comparisons"):
        win_rate_with_ties([])


def test_bootstrap_interval_is_deterministic_and_shrinks_with_data():
    rng = random.Random(0)
    small = [float(rng.random() < 0.7) for _ in range(40)]
    large = [float(rng.random() < 0.7) for _ in range(1000)]
    low, high = bootstrap_interval(small, seed=1)
    assert (low, high) == bootstrap_interval(small, seed=1)
    assert low < sum(small) / len(small) < high
    large_low, large_high = bootstrap_interval(large, seed=1)
    assert large_high - large_low < (high - low) / 3
    assert large_low < 0.7 < large_high
    assert bootstrap_interval([1.0] * 20) == (1.0, 1.0)  # no variation, no uncertainty
    median_low, median_high = bootstrap_interval([0.0, 1.0, 2.0, 3.0, 100.0], statistic=lambda v: sorted(v)[2],
                                                 n_resamples=500)
    assert median_high <= 100.0 and median_low >= 0.0
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_distinct_n_on_known_texts():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["the the the the"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["猫很小", "猫很大"], 1) == pytest.approx(4 / 6)  # CJK characters count as words
    assert distinct_n([""], 2) == 0.0


def test_kl_summary_and_perplexity():
    summary = kl_summary([2.0, 4.0], [4, 6])
    assert summary == {"per_sequence": 3.0, "per_token": 0.6}
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * 2.0, 10) == pytest.approx(torch.tensor(2.0).exp().item())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_prompts") / "prompts.jsonl"
    rows = [{"prompt": p, "task": t} for p, t in [("Hello!", "dialogue"), ("Thank you!", "dialogue"),
                                                  ("Where did Lin go?", "facts"), ("Where did Bo go?", "facts"),
                                                  ("Where did Mei go?", "facts"), ("Good morning!", "dialogue")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, corpus_file, tmp_path_factory):
    """The conftest's random tiny model after 30 quick steps on the corpus that the held-out file resembles."""
    from moss_rlhf.data.collate import pack_texts
    from moss_rlhf.data.formats import load_texts
    from moss_rlhf.losses import lm_loss_sum
    from moss_rlhf.models import load_causal_lm, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    rows = pack_texts(tokenizer, load_texts(corpus_file), 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    with single_thread():
        for _ in range(30):
            batch = rows[torch.randint(len(rows), (8,), generator=generator)]
            loss_sum, n = lm_loss_sum(model(input_ids=batch).logits, batch)
            (loss_sum / n).backward()
            optimizer.step()
            optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained_model")
    save_model(model, tokenizer, path)
    return path


def _config(a, b, prompts, out, **kw) -> EvaluateConfig:
    defaults = dict(model_a=str(a), model_b=str(b), prompts=str(prompts), out=str(out), max_new_tokens=12,
                    bootstrap=200, device="cpu", batch_size=8, judge="gold")
    defaults.update(kw)
    return EvaluateConfig(**defaults)


def test_identical_models_tie_with_zero_kl(tiny_model_dir, prompts_file, eval_corpus_file, tmp_path, capsys):
    out = tmp_path / "eval" / "same.json"
    report = run(_config(tiny_model_dir, tiny_model_dir, prompts_file, out, name_a="x", name_b="x",
                         perplexity_data=str(eval_corpus_file), perplexity_docs=20))
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report))
    assert saved["n_prompts"] == 6
    win = saved["win_rate"]
    assert win["ties"] == 6 and win["win_rate"] == 0.5 and win["ci_low"] == win["ci_high"] == 0.5
    assert abs(saved["kl"]["per_token"]) < 1e-5 and abs(saved["kl"]["per_sequence"]) < 1e-4
    assert saved["kl"]["temperature"] == 0.7
    (a, b) = saved["models"].values()
    assert a["perplexity"] == pytest.approx(b["perplexity"])
    assert set(saved["by_task"]) == {"dialogue", "facts"} and saved["by_task"]["facts"]["n"] == 3
    assert saved["samples"][0]["a"] == saved["samples"][0]["b"]
    printed = capsys.readouterr().out
    assert "win rate" in printed and "x (A)" in printed


@pytest.mark.slow
def test_training_shows_in_perplexity_and_kl(trained_model_dir, tiny_model_dir, prompts_file, eval_corpus_file,
                                             tmp_path):
    report = run(_config(trained_model_dir, tiny_model_dir, prompts_file, tmp_path / "e.json",
                         perplexity_data=str(eval_corpus_file), perplexity_docs=20, max_new_tokens=16))
    trained, untrained = report["models"].values()
    assert trained["perplexity"] < untrained["perplexity"] / 3
    assert report["kl"]["per_token"] > 0.1  # the trained model's samples are far likelier under itself
    assert 0.0 <= report["win_rate"]["ci_low"] <= report["win_rate"]["win_rate"] <= report["win_rate"]["ci_high"]


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.3, 1.0)])
def test_kl_is_the_divergence_at_the_sampling_temperature(trained_model_dir, tiny_model_dir, tmp_path, temperature,
                                                         top_p):
    """One-token replies, so KL(A_T ‖ B_T) has an exact value: Σ_v A_T(v) log(A_T(v) / B_T(v)) at the reply's first
    position, A_T = softmax(logits_A / T). The reported estimate must agree within 4 standard errors, even with
    top-p shaping the replies, and must not be the (very different) divergence at temperature 1."""
    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.tokenizer import encode_chat, load_tokenizer

    questions = ["Where did Lin go?", "Hello!"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions * 500), encoding="utf-8")
    report = run(_config(trained_model_dir, tiny_model_dir, path, tmp_path / "kl.json", max_prompts=0,
                         max_new_tokens=1, temperature=temperature, top_p=top_p, batch_size=250))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    a, b = load_causal_lm(str(trained_model_dir)), load_causal_lm(str(tiny_model_dir))

    def exact(t: float) -> tuple[float, float]:
        kls, second = [], []
        for q in questions:
            ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": q}], True)])
            with torch.no_grad():
                la, lb = (torch.log_softmax(m(input_ids=ids).logits[0, -1].double() / t, -1) for m in (a, b))
            ratio = la - lb
            kls.append(float((la.exp() * ratio).sum()))
            second.append(float((la.exp() * ratio ** 2).sum()))
        mean_kl = sum(kls) / 2
        return mean_kl, (sum(second) / 2 - mean_kl ** 2) ** 0.5

    kl, spread = exact(temperature)
    standard_error = spread / len(questions * 500) ** 0.5
    assert report["kl"]["temperature"] == temperature
    assert report["kl"]["per_sequence"] == pytest.approx(kl, abs=4 * standard_error)
    assert abs(exact(1.0)[0] - kl) > 8 * standard_error  # the test tells the two temperatures apart


def test_reward_model_judge(tiny_model_dir, prompts_file, tmp_path):
    """A reward model judges by its score at each reply's turn end; a causal LM is refused as a judge (its fresh zero
    head would score every reply 0 and report a 50% tie)."""
    from moss_rlhf.config import ConfigError
    from moss_rlhf.models import load_scorer, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(scorer, tokenizer, tmp_path / "rm")
    report = run(_config(tiny_model_dir, tiny_model_dir, prompts_file, tmp_path / "rm.json", judge=str(tmp_path / "rm"),
                         temperature=1.0))
    assert report["judge"] == str(tmp_path / "rm")
    assert report["perplexity_data"] is None  # user prompts, a reward model, no perplexity file: skipped
    assert len({round(s["score_a"], 5) for s in report["samples"]}) > 3  # the replies are told apart
    with pytest.raises(ConfigError, match="is not a reward model"):
        run(_config(tiny_model_dir, tiny_model_dir, prompts_file, tmp_path / "lm.json", judge=str(tiny_model_dir)))


def test_gold_judge_scores_are_on_its_scale(tiny_model_dir, prompts_file, eval_corpus_file, tmp_path):
    report = run(_config(tiny_model_dir, tiny_model_dir, prompts_file, tmp_path / "g.json", seed=3,
                         perplexity_data=str(eval_corpus_file), perplexity_docs=5))
    assert all(0.0 <= s["score_a"] <= 10.0 for s in report["samples"])
    assert report["perplexity_data"] == str(eval_corpus_file)


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    from moss_rlhf.cli import main

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    assert main(["evaluate", str(tiny_model_dir), str(tiny_model_dir), "--judge", "gold"]) == 2
    assert "give --prompts" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), str(tiny_model_dir), "--prompts", str(good),
                 "--judge", "gold"]) == 2
    err = capsys.readouterr().err
    assert "--model-a" in err and "does not exist" in err and "Traceback" not in err
    assert main(["evaluate", "--model-a", str(tmp_path), "--model-b", str(tiny_model_dir), "--prompts", str(good),
                 "--judge", "gold"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model_dir), str(tiny_model_dir), "--prompts", str(good), "--judge",
                 "no_such_module:score", "--device", "cpu"]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": 3}\n', encoding="utf-8")
    assert main(["evaluate", str(tiny_model_dir), str(tiny_model_dir), "--prompts", str(bad), "--device", "cpu",
                 "--judge", "gold", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "prompt" in err
