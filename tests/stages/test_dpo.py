"""DPO and its family: the policy learns the preference from pairs alone (the first loss is exactly log 2: the policy
starts as the reference), the reply log-probs equal a plain padded reference, gradient accumulation and 2 processes
give the one-batch run, a killed run resumes exactly, every loss trains, the reference-free ones never load a
reference, LoRA saves a merged model, and bad input is a clear error."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from moss_rlhf.data.formats import load_preferences
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import dpo
from moss_rlhf.stages.dpo import DPOConfig, PairData, reply_logprobs
from moss_rlhf.tokenizer import load_tokenizer
from tests.conftest import run_in_processes, write_jsonl
from tests.stages.test_reward import preference_rows, varied_rows


def config(out, model_dir, data, **overrides) -> DPOConfig:
    values = dict(out=str(out), model=str(model_dir), data=[str(data)], max_steps=30, batch_size=8, lr=2e-3,
                  beta=0.5, warmup_steps=2, eval_every=15, log_every=1, save_every=0, progress=False, device="cpu",
                  max_len=64)
    values.update(overrides)
    return DPOConfig(**values)


def steady(rows):
    return [{k: v for k, v in r.items() if "per_s" not in k} for r in rows]


def test_dpo_learns_the_preference_from_pairs_alone(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(240))
    result = dpo.run(config(tmp_path / "run", tiny_model_dir, data))
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: h = 0
    m = result.eval_metrics
    assert m["eval/accuracy"] > 0.9 and m["eval/margin"] > 0
    assert m["eval/chosen_reward"] > m["eval/rejected_reward"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # plain transformers loads it
    tokenizer = load_tokenizer(str(tmp_path / "run" / "model"))
    prefs = load_preferences(data)[:16]
    pairs = PairData(tokenizer, prefs, 64)
    with torch.no_grad():
        sums, _ = reply_logprobs(loaded, pairs.batch(list(range(16))))
    assert (sums[:16] > sums[16:]).float().mean() > 0.9  # the saved policy prefers the chosen replies


def test_reply_logprobs_are_the_reply_tokens_log_probs(tiny_model_dir, tmp_path):
    """Summed over the reply's tokens only (prompt and padding left out), equal to a padded full-logits reference;
    chosen and rejected of different lengths share one padded batch."""
    from moss_rlhf.models import load_causal_lm

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", varied_rows(4)))
    pairs = PairData(tokenizer, prefs, 64)
    model = load_causal_lm(str(tiny_model_dir)).eval()
    batch = pairs.batch([0, 1, 2, 3])
    with torch.no_grad():
        sums, counts = reply_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row in range(8):
        expected, n = 0.0, 0
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][row, t])
            if label != -100:
                expected += float(torch.log_softmax(logits[row, t - 1].double(), -1)[label])
                n += 1
        assert sums[row].item() == pytest.approx(expected, rel=1e-5) and int(counts[row]) == n > 0
    assert len(set(counts.tolist())) > 1


def test_gradient_accumulation_and_resume_are_exact(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", varied_rows(80))
    losses = {}
    for name, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        dpo.run(config(tmp_path / name, tiny_model_dir, data, batch_size=batch, grad_accum=accum, max_steps=3,
                       eval_every=0))
        losses[name] = [r["train/loss"] for r in read_metrics(tmp_path / name)]
    assert losses["8x1"] == pytest.approx(losses["2x4"], abs=1e-5)

    out = tmp_path / "resumed"
    dpo.run(config(out, tiny_model_dir, data, max_steps=6, save_every=3, keep_checkpoints=5, eval_every=3))
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if killed after the step-3 checkpoint
    dpo.run(config(out, tiny_model_dir, data, max_steps=6, save_every=3, keep_checkpoints=5, eval_every=3,
                   resume=True))
    assert steady(read_metrics(out)) == steady(uninterrupted)


@pytest.mark.parametrize("loss, extra", [("robust", {"label_smoothing": 0.1}), ("sigmoid", {"label_smoothing": 0.1}),
                                         ("ipo", {}), ("hinge", {}), ("simpo", {"reference": "/nonexistent"}),
                                         ("orpo", {"reference": "/nonexistent"})])
def test_every_loss_learns_the_preference(tmp_path, tiny_model_dir, loss, extra):
    """A few steps of each loss raise the held-out margin; simpo and orpo are reference-free (a missing reference
    path is never opened)."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    result = dpo.run(config(tmp_path / "run", tiny_model_dir, data, loss=loss, max_steps=12, eval_every=12,
                            **extra))
    assert result.eval_metrics["eval/accuracy"] > 0.8, loss
    assert math.isfinite(result.train_loss)


def test_lora_policy_saves_a_merged_model(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(60))
    dpo.run(config(tmp_path / "run", tiny_model_dir, data, lora_r=4, max_steps=4, lr=1e-2, eval_every=0))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all("lora" not in k for k in after) and any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_input_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    from moss_rlhf.cli import main

    assert main(["dpo", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(20))
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--beta", "0",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--beta" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses an unknown --loss, naming the choices
        main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--loss", "kto", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "sigmoid" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    """2 processes × 4 pairs give the run of 1 process × 8 pairs: the policy runs through DDP's forward, the loss is
    divided by the global pair count, held-out metrics are reduced over processes."""
    data = write_jsonl(tmp_path / "prefs.jsonl", varied_rows(120))
    common = dict(max_steps=4, eval_every=2)
    dpo.run(config(tmp_path / "single", tiny_model_dir, data, batch_size=8, **common))
    run_in_processes(dpo.run, config(tmp_path / "double", tiny_model_dir, data, batch_size=4, **common))
    single, double = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")
    assert [r["step"] for r in single] == [r["step"] for r in double]
    for a, b in zip(single, double):
        for key in a:
            if key.startswith(("train/loss", "eval/")):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
