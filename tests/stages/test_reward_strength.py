"""Preference strength and reward-model evaluation (Secrets of RLHF Part II): the members' splits are what they say,
the ensemble's strength finds the flipped labels, its file round-trips through the loaders, a second run reuses the
trained members and parallel training gives the same strengths; the evaluation's statistics equal plain references,
and `reward eval` reports accuracy by strength, calibration, length bias and agreement with a judge."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest

from moss_rlhf.cli import main
from moss_rlhf.config import ConfigError
from moss_rlhf.data.formats import load_preferences
from moss_rlhf.stages import reward_eval, reward_strength
from moss_rlhf.stages.reward_strength import StrengthConfig, member_pairs
from tests.conftest import HH_FILE, write_jsonl
from tests.stages.test_reward import preference_rows


def flipped_rows(n: int, every: int = 5) -> list[dict]:
    """Polite-vs-rude pairs with every ``every``-th label flipped (a known wrong label)."""
    rows = preference_rows(n)
    for i in range(0, n, every):
        rows[i] = {**rows[i], "chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
    return rows


def polite_judge(conversations, replies) -> list[float]:
    """The test world's truth: a polite, on-topic reply ("X went to Y.") is good, a rude one bad."""
    return [1.0 if "went to" in r else 0.0 for r in replies]


def strength_config(out, model_dir, data, **overrides) -> StrengthConfig:
    values = dict(out=str(out), model=str(model_dir), data=[str(data)], members=3, max_steps=20, batch_size=8,
                  lr=3e-3, warmup_steps=2, eval_every=0, log_every=5, save_every=0, progress=False, device="cpu",
                  max_len=64)
    values.update(overrides)
    return StrengthConfig(**values)


def test_member_splits():
    boot = member_pairs(50, 4, "bootstrap", seed=1)
    for train, held_out in boot:
        assert len(train) == 50 and held_out and not set(train) & set(held_out)
    assert boot == member_pairs(50, 4, "bootstrap", seed=1) and boot != member_pairs(50, 4, "bootstrap", seed=2)
    disjoint = member_pairs(50, 4, "disjoint", seed=1)
    assert sorted(i for train, _ in disjoint for i in train) == list(range(50))
    assert all(held == disjoint[(k + 1) % 4][0] for k, (_, held) in enumerate(disjoint))
    assert member_pairs(10, 3, "seeds", 0) == [(list(range(10)), [])] * 3


def test_statistics_match_plain_references():
    diffs = [2.0, -1.0, 0.0, 0.5, 3.0, -0.2]
    assert reward_eval.pairwise_accuracy(diffs) == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 0) / 6)
    # ECE by hand, 2 bins over [0.5, 1]: confidence max(σ(d), 1 − σ(d)); "correct" when d > 0 (a tie half)
    sig = [1 / (1 + math.exp(-d)) for d in diffs]
    conf = [max(p, 1 - p) for p in sig]
    correct = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs]
    bins = [[i for i in range(6) if conf[i] < 0.75], [i for i in range(6) if conf[i] >= 0.75]]
    expected = sum(len(b) / 6 * abs(statistics.mean(correct[i] for i in b) - statistics.mean(conf[i] for i in b))
                   for b in bins if b)
    assert reward_eval.expected_calibration_error(diffs, bins=2) == pytest.approx(expected)
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 7.0]
    assert reward_eval.pearson(x, y) == pytest.approx(statistics.correlation(x, y))
    assert math.isnan(reward_eval.pearson(x, [1.0] * 5))
    assert reward_eval.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    tied = [1.0, 2.0, 2.0, 5.0]
    assert reward_eval.spearman(tied, [4.0, 3.0, 1.0, 0.0]) == pytest.approx(
        statistics.correlation([1.0, 2.5, 2.5, 4.0], [4.0, 3.0, 2.0, 1.0]))
    buckets = reward_eval.accuracy_by_strength([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0], [-1, -1, 1, 1, 1, -1], 3)
    assert [(b["pairs"], b["accuracy"]) for b in buckets] == [(2, 0.0), (2, 1.0), (2, 0.5)]
    assert buckets[0]["low"] == -2.0 and buckets[2]["high"] == 3.0
    found = reward_eval.detection([True, True, False, False], [True, False, True, False])
    assert (found["precision"], found["recall"]) == (0.5, 0.5)


@pytest.mark.slow
def test_strength_finds_flipped_labels_and_eval_reports_it(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", flipped_rows(120))
    summary = reward_strength.run(strength_config(tmp_path / "strength", tiny_model_dir, data))
    scored = load_preferences(tmp_path / "strength" / "strength.jsonl")  # round-trips through the loader
    assert len(scored) == 120 and all(p.strength_mean is not None and p.strength_std >= 0 for p in scored)
    flipped = [p.strength_mean for i, p in enumerate(scored) if i % 5 == 0]
    kept = [p.strength_mean for i, p in enumerate(scored) if i % 5]
    assert max(flipped) < 0 < min(kept)  # the ensemble, trained on the other labels, disagrees with the flipped ones
    assert summary["negative_share"] == pytest.approx(0.2)
    assert (tmp_path / "strength" / "strength.png").stat().st_size > 1000
    row = json.loads((tmp_path / "strength" / "strength.jsonl").read_text().splitlines()[0])
    assert len(row["strength_members"]) == 3

    capsys.readouterr()
    again = reward_strength.run(strength_config(tmp_path / "strength", tiny_model_dir, data))
    assert capsys.readouterr().out.count("trained already") == 3 and again == summary
    with pytest.raises(ConfigError, match="other max_steps"):  # never a stale member silently reused
        reward_strength.run(strength_config(tmp_path / "strength", tiny_model_dir, data, max_steps=21))
    other = write_jsonl(tmp_path / "other.jsonl", flipped_rows(120, every=4))
    with pytest.raises(ConfigError, match="other pairs"):
        reward_strength.run(strength_config(tmp_path / "strength", tiny_model_dir, other))

    model = tmp_path / "strength" / "members" / "0" / "model"
    out = tmp_path / "eval.json"
    assert main(["reward", "eval", str(model), "--data", str(tmp_path / "strength" / "strength.jsonl"), "--judge",
                 "tests.stages.test_reward_strength:polite_judge", "--buckets", "5", "--out", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["pairs"] == 120 and 0.7 < report["accuracy"] < 0.9  # it learned the truth, not the flipped labels
    assert report["by_strength"][0]["accuracy"] < 0.2 < 0.9 < report["by_strength"][-1]["accuracy"]
    judge = report["judge"]
    assert judge["label_agreement"] == pytest.approx(0.8) and judge["model_agreement"] > 0.9
    assert judge["spearman"] > 0.7 and 0 <= report["ece"] <= 0.5
    assert judge["noisy_label_detection"]["precision"] == 1.0 and judge["noisy_label_detection"]["recall"] == 1.0
    assert "negative strength as a detector" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_members_give_the_same_strengths(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", flipped_rows(60))
    common = dict(members=2, max_steps=6, split="disjoint")
    reward_strength.run(strength_config(tmp_path / "one", tiny_model_dir, data, **common))
    reward_strength.run(strength_config(tmp_path / "two", tiny_model_dir, data, jobs=2, **common))
    one = load_preferences(tmp_path / "one" / "strength.jsonl")
    two = load_preferences(tmp_path / "two" / "strength.jsonl")
    assert [p.strength_mean for p in one] == pytest.approx([p.strength_mean for p in two], abs=1e-4)


def test_reward_still_trains_without_the_subcommand_and_bad_strength_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(20))
    assert main(["reward", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "rm"),
                 "--max-steps", "1", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "rm" / "model" / "config.json").exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**preference_rows(1)[0], "strength_mean": 0.3,
                                                "strength_std": -1.0}])
    assert main(["reward", "eval", str(tmp_path / "rm" / "model"), "--data", str(bad), "--out",
                 str(tmp_path / "e.json")]) == 2
    assert "bad.jsonl:1: strength_std: expected finite numbers" in capsys.readouterr().err
    assert main(["reward", "strength", "--model", str(tiny_model_dir), "--data", str(data), "--members", "1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--members" in capsys.readouterr().err


def scored_rows(strengths: list[float]) -> list[dict]:
    return [{**row, "strength_mean": s, "strength_std": 0.1} for row, s in zip(preference_rows(len(strengths)),
                                                                                strengths)]


def test_strength_treatments_drop_flip_and_keep_the_order(tmp_path):
    from moss_rlhf.stages.reward import RewardConfig, treat_by_strength

    prefs = load_preferences(write_jsonl(tmp_path / "s.jsonl", scored_rows([0.5, -2.0, 1.5, -0.3, 0.1, 2.0])))
    cfg = RewardConfig(data=["x"], drop_weakest=1 / 3, flip_below=0.0)
    treated, counts = treat_by_strength(prefs, cfg)
    assert counts == {"dropped": 2, "flipped": 0}  # -2.0 and -0.3 left out first: none is left below 0 to flip
    assert [p.strength_mean for p in treated] == [0.5, 1.5, 0.1, 2.0]
    flipped, counts = treat_by_strength(prefs, RewardConfig(data=["x"], flip_below=0.2))
    assert counts == {"dropped": 0, "flipped": 3}
    assert [p.strength_mean for p in flipped] == [0.5, 2.0, 1.5, 0.3, -0.1, 2.0]
    assert flipped[1].chosen == prefs[1].rejected and flipped[1].rejected == prefs[1].chosen
    plain = load_preferences(write_jsonl(tmp_path / "p.jsonl", preference_rows(3)))
    with pytest.raises(ConfigError, match="3 of 3 pairs have none"):
        treat_by_strength(plain, RewardConfig(data=["x"], soft_labels=True))


def test_soft_labels_adaptive_margin_and_weights_match_the_formula(tmp_path, tiny_model_dir):
    """Each pair's loss is w · [−p log σ(d) − (1 − p) log σ(−d)], d = r_c − r_r − (m + λ max(s, 0)), with the soft
    target p = σ(s) smoothed by ε and the weight w = |2σ(s) − 1| normalised to mean 1 — against plain floats."""
    import torch

    from moss_rlhf.models import load_scorer
    from moss_rlhf.stages.reward import RewardConfig, RewardLoss, pair_data
    from moss_rlhf.tokenizer import load_tokenizer

    strengths = [1.2, -0.4, 0.05, 3.0]
    prefs = load_preferences(write_jsonl(tmp_path / "s.jsonl", scored_rows(strengths)))
    cfg = RewardConfig(data=["x"], soft_labels=True, adaptive_margin=0.5, reweight=True, label_smoothing=0.1,
                       max_len=64)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    batch = pair_data(tokenizer, prefs, cfg).batch([0, 1, 2, 3])
    loss_fn = RewardLoss(cfg, None)
    with torch.no_grad():
        loss = float(loss_fn(scorer, batch))
        chosen, rejected, _, _ = loss_fn.forward(scorer, batch)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    confidence = [abs(2 * sig(s) - 1) for s in strengths]
    expected = 0.0
    for i, s in enumerate(strengths):
        d = float(chosen[i] - rejected[i]) - (0.5 + 0.5 * max(s, 0.0))  # the rows' margin is 0.5
        p = 0.1 + 0.8 * sig(s)  # σ(s) smoothed by ε = 0.1: (1 − ε) p + ε (1 − p)
        w = confidence[i] / (sum(confidence) / 4)
        expected += w * (-p * math.log(sig(d)) - (1 - p) * math.log(sig(-d)))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_per_pair_label_smoothing_is_checked():
    import torch

    from moss_rlhf.losses import bradley_terry_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="per-pair"):
        bradley_terry_loss(x, x, None, torch.tensor([0.2, 1.5]))
    d = torch.tensor([1.0, -2.0])
    loss = bradley_terry_loss(d, torch.zeros(2), None, torch.tensor([0.25, 1.0]), reduction="none")
    assert loss.tolist() == pytest.approx([-(0.75 * math.log(1 / (1 + math.exp(-1.0))) +
                                            0.25 * math.log(1 / (1 + math.exp(1.0)))),
                                           -math.log(1 / (1 + math.exp(-2.0)))])


@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data/hh-rlhf is not present (it is in CI)")
def test_strength_and_eval_on_a_slice_of_real_hh_rlhf(tmp_path, tiny_model_dir):
    """Real human pairs (a slice of HH-RLHF harmless-base): every pair gets a strength, the scored file trains a
    reward model with the treatments on, and the evaluation's buckets cover every pair in strength order."""
    from moss_rlhf.data.formats import preference_record
    from moss_rlhf.stages import reward

    pairs = load_preferences(HH_FILE)[:80]
    data = write_jsonl(tmp_path / "hh.jsonl", [preference_record(p) for p in pairs])
    summary = reward_strength.run(strength_config(tmp_path / "s", tiny_model_dir, data, members=2, max_steps=8,
                                                  max_len=128, split="disjoint"))
    scored = load_preferences(tmp_path / "s" / "strength.jsonl")
    assert [(p.chosen, p.rejected) for p in scored] == [(p.chosen, p.rejected) for p in pairs]
    assert 0 <= summary["negative_share"] <= 1 and all(p.strength_std >= 0 for p in scored)
    result = reward.run(reward.RewardConfig(out=str(tmp_path / "rm"), model=str(tiny_model_dir),
                                            data=[str(tmp_path / "s" / "strength.jsonl")], flip_below=0.0,
                                            soft_labels=True, max_steps=4, batch_size=8, max_len=128,
                                            eval_every=0, progress=False, device="cpu"))
    assert math.isfinite(result.train_loss)
    report = reward_eval.run(reward_eval.RewardEvalConfig(model=str(tmp_path / "rm" / "model"),
                                                          data=[str(tmp_path / "s" / "strength.jsonl")], buckets=4,
                                                          max_len=128, out=str(tmp_path / "e.json"), device="cpu"))
    buckets = report["by_strength"]
    assert sum(b["pairs"] for b in buckets) == 80 and all(a["high"] <= b["low"] for a, b in zip(buckets, buckets[1:]))


def dropout_views_of_the_difference(scorer, batch, p: float, seed: int):
    """The contrastive terms' two views, recomputed: the final hidden states at each reply's last token, chosen minus
    rejected, through two feature-dropout masks drawn after ``torch.manual_seed(seed)``."""
    import torch

    from moss_rlhf.models import final_hidden_states

    hidden = final_hidden_states(scorer, batch["input_ids"], batch["attention_mask"]).detach()
    last = batch["attention_mask"].sum(-1) - 1
    at_score = hidden[torch.arange(hidden.shape[0]), last]
    n = hidden.shape[0] // 2
    torch.manual_seed(seed)
    return [torch.nn.functional.dropout(at_score[:n] - at_score[n:], p, training=True) for _ in range(2)]


def test_contrastive_term_is_info_nce_of_two_dropout_views_of_the_difference(tmp_path, tiny_model_dir):
    """The loss with --contrastive-weight w is the plain loss plus w × InfoNCE of two feature-dropout views of the
    pairs' difference representations (same RNG state: the same masks), and a run with it on learns the preference."""
    import torch

    from moss_rlhf.losses import info_nce
    from moss_rlhf.models import load_scorer
    from moss_rlhf.stages import reward
    from moss_rlhf.stages.reward import RewardConfig, RewardLoss, pair_data
    from moss_rlhf.tokenizer import load_tokenizer

    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", preference_rows(6)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    cfg = RewardConfig(data=["x"], contrastive_weight=0.3, contrastive_temperature=0.1, contrastive_dropout=0.2,
                       max_len=64)
    batch = pair_data(tokenizer, prefs, cfg).batch(list(range(6)))
    plain = float(RewardLoss(RewardConfig(data=["x"], max_len=64), None)(scorer, batch).detach())
    torch.manual_seed(7)
    with_term = float(RewardLoss(cfg, None)(scorer, batch).detach())
    views = dropout_views_of_the_difference(scorer, batch, 0.2, seed=7)
    assert with_term == pytest.approx(plain + 0.3 * float(info_nce(*views, 0.1).sum()), rel=1e-5)

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    result = reward.run(RewardConfig(out=str(tmp_path / "rm"), model=str(tiny_model_dir), data=[str(data)],
                                     contrastive_weight=0.1, max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2,
                                     eval_every=0, progress=False, device="cpu", max_len=64))
    assert result.eval_metrics["eval/accuracy"] > 0.9


def test_swav_term_is_swapped_prediction_over_trained_prototypes(tmp_path, tiny_model_dir):
    """--contrastive-method swav: the loss is the plain loss plus w × SwAV's loss of two dropout views of the pairs'
    difference representations against the prototypes; a run trains the prototypes with the model (they move, and a
    resumed run restores them), learns the preference, and its model loads in plain transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from moss_rlhf.losses import swav_loss
    from moss_rlhf.models import load_scorer
    from moss_rlhf.stages import reward
    from moss_rlhf.stages.reward import RewardConfig, RewardLoss, pair_data
    from moss_rlhf.tokenizer import load_tokenizer

    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", preference_rows(6)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    prototypes = torch.nn.Parameter(torch.randn(4, scorer.config.hidden_size))
    scorer.register_parameter("swav_prototypes", prototypes)
    cfg = RewardConfig(data=["x"], contrastive_weight=0.3, contrastive_method="swav", contrastive_temperature=0.1,
                       contrastive_dropout=0.2, swav_epsilon=0.05, max_len=64)
    batch = pair_data(tokenizer, prefs, cfg).batch(list(range(6)))
    plain = float(RewardLoss(RewardConfig(data=["x"], max_len=64), None)(scorer, batch).detach())
    torch.manual_seed(7)
    with_term = RewardLoss(cfg, None, prototypes)(scorer, batch)
    views = dropout_views_of_the_difference(scorer, batch, 0.2, seed=7)
    expected = plain + 0.3 * float(swav_loss(*views, prototypes.detach(), 0.1, 0.05).sum())
    assert float(with_term.detach()) == pytest.approx(expected, rel=1e-5)
    with_term.backward()
    assert prototypes.grad is not None and prototypes.grad.abs().sum() > 0

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    args = dict(out=str(tmp_path / "rm"), model=str(tiny_model_dir), data=[str(data)], contrastive_weight=0.1,
                contrastive_method="swav", swav_prototypes=8, max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2,
                eval_every=0, save_every=10, progress=False, device="cpu", max_len=64)
    result = reward.run(RewardConfig(**args))
    assert result.eval_metrics["eval/accuracy"] > 0.9
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "rm" / "model" / "model.safetensors"))
    initial = torch.randn(8, scorer.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert saved["swav_prototypes"].shape == (8, scorer.config.hidden_size)
    assert not torch.allclose(saved["swav_prototypes"], initial)  # trained with the model
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert loaded.score.weight.shape[0] == 1
    # resumed from the step-10 checkpoint: the prototypes come back with the model, and the run ends where it did
    shutil.copytree(tmp_path / "rm", tmp_path / "rm2")
    checkpoints = sorted(p for p in (tmp_path / "rm2" / "checkpoints").iterdir() if p.is_dir())
    shutil.rmtree(checkpoints[-1])
    resumed = reward.run(RewardConfig(**{**args, "out": str(tmp_path / "rm2"), "resume": True}))
    assert resumed.train_loss == pytest.approx(result.train_loss, rel=1e-5)
    again = load_file(str(tmp_path / "rm2" / "model" / "model.safetensors"))
    assert torch.equal(again["swav_prototypes"], saved["swav_prototypes"])
