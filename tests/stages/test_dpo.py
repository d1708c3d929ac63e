"""DPO and its family, and KTO: the policy learns the preference from pairs alone (the first loss is exactly log 2:
the policy starts as the reference) or from unpaired labelled replies (KTO's first loss is exactly 1/2), the reply
log-probs equal a plain padded reference, gradient accumulation and 2 processes give the one-batch run (KTO's
reference point included), a killed run resumes exactly, every loss trains, the reference-free ones never load a
reference, the KL monitor reads 0 for the reference itself, precomputed reference log-probs are reused only when they
match, LoRA saves a merged model, and bad input is a clear error."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from moss_rlhf.config import ConfigError
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


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    """Unpaired records: the polite replies desirable, the rude ones undesirable (odd and even records), with replies
    of different lengths."""
    rows = []
    for i, row in enumerate(varied_rows(n)):
        good = i % 2 == 0
        rows.append({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"], "label": good})
    return rows


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


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_gradient_accumulation_and_resume_are_exact(tmp_path, tiny_model_dir, loss):
    """KTO's reference point is a statistic of the whole global batch, computed before its first backward: 2 × 4
    accumulated replies give the 8-reply step exactly, as the pairs of DPO do."""
    rows = kto_rows(80) if loss == "kto" else varied_rows(80)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    losses = {}
    for name, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        dpo.run(config(tmp_path / name, tiny_model_dir, data, batch_size=batch, grad_accum=accum, max_steps=3,
                       eval_every=0, kl_prompts=0, loss=loss, lr=2e-2 if loss == "kto" else 2e-3))
        losses[name] = [r["train/loss"] for r in read_metrics(tmp_path / name)]
    assert losses["8x1"] == pytest.approx(losses["2x4"], abs=1e-5)
    assert len(set(losses["8x1"])) == 3  # the steps did learn: the reference point and loss moved

    out = tmp_path / "resumed"
    common = dict(max_steps=6, save_every=3, keep_checkpoints=5, eval_every=3, loss=loss, kl_prompts=4)
    dpo.run(config(out, tiny_model_dir, data, **common))
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if killed after the step-3 checkpoint
    dpo.run(config(out, tiny_model_dir, data, resume=True, **common))
    assert steady(read_metrics(out)) == steady(uninterrupted)


@pytest.mark.parametrize("loss, extra", [("robust", {"label_smoothing": 0.1}), ("sigmoid", {"label_smoothing": 0.1}),
                                         ("ipo", {}), ("hinge", {}),
                                         ("simpo", {"reference": "/nonexistent", "kl_prompts": 0}),
                                         ("orpo", {"reference": "/nonexistent", "kl_prompts": 0})])
def test_every_loss_learns_the_preference(tmp_path, tiny_model_dir, loss, extra):
    """A few steps of each loss raise the held-out margin; simpo and orpo are reference-free (without the KL monitor
    a missing reference path is never opened)."""
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
        main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--loss", "kt0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "sigmoid" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_two_processes_match_one_process(tmp_path, tiny_model_dir, loss):
    """2 processes × 4 records give the run of 1 process × 8 records: the policy runs through DDP's forward, the loss
    is divided by the global record count, KTO's reference point and held-out metrics (the sampled KL included:
    each prompt is sampled with its own seed) are reduced over processes."""
    data = write_jsonl(tmp_path / "data.jsonl", kto_rows(120) if loss == "kto" else varied_rows(120))
    common = dict(max_steps=4, eval_every=2, loss=loss, kl_prompts=6)
    dpo.run(config(tmp_path / "single", tiny_model_dir, data, batch_size=8, **common))
    run_in_processes(dpo.run, config(tmp_path / "double", tiny_model_dir, data, batch_size=4, **common))
    single, double = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")
    assert [r["step"] for r in single] == [r["step"] for r in double]
    for a, b in zip(single, double):
        for key in a:
            if key.startswith(("train/loss", "eval/")):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_kto_learns_from_unpaired_replies(tmp_path, tiny_model_dir, capsys):
    """KTO on {prompt, completion, label} records alone: the first loss is exactly 1/2 (policy = reference: every
    implicit reward and the reference point are 0), and training puts desirable replies above the reference point
    and undesirable ones below it, while the policy moves away from the reference (sampled KL > 0)."""
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(240))
    result = dpo.run(config(tmp_path / "run", tiny_model_dir, data, loss="kto", lr=2e-3, max_steps=30,
                            kl_prompts=8))
    out = capsys.readouterr().out
    counts = re.search(r"kto: (\d+) desirable, (\d+) undesirable replies", out)
    assert counts and int(counts[1]) + int(counts[2]) == 216  # 240 less the 10% held out
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    m = result.eval_metrics
    assert m["eval/accuracy"] > 0.8 and m["eval/margin"] > 0
    assert m["eval/chosen_reward"] > 0 > m["eval/rejected_reward"]
    assert m["eval/reference_point"] >= 0 and m["eval/kl_per_reply"] > 0


def test_kto_reads_pairs_as_two_labelled_replies(tmp_path, tiny_model_dir):
    """A preference file trains KTO too: chosen desirable, rejected undesirable; held-out data splits by record."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(60))
    result = dpo.run(config(tmp_path / "run", tiny_model_dir, data, loss="kto", lr=2e-3, max_steps=12,
                            eval_every=12, kl_prompts=0))
    assert result.eval_metrics["eval/accuracy"] > 0.8
    train, held_out = dpo.load_data(config(tmp_path / "x", tiny_model_dir, data, loss="kto"),
                                    load_tokenizer(str(tiny_model_dir)))
    assert (len(train), len(held_out)) == (108, 12)  # 54 + 6 pairs, two replies each
    assert int(held_out.desirable.sum()) == 6


def test_kto_needs_both_kinds_of_reply(tmp_path, tiny_model_dir):
    rows = [r for r in kto_rows(40) if r["label"]]
    with pytest.raises(ConfigError, match="0 undesirable"):
        dpo.run(config(tmp_path / "run", tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), loss="kto"))


def test_kl_monitor_reads_zero_for_the_reference_itself(tmp_path, tiny_model_dir):
    """The sampled KL of a policy to itself (a separate copy; or its LoRA form with zero adapters, whose reference
    is the base with adapters off) is exactly 0; a changed policy reads above 0."""
    from moss_rlhf import distributed
    from moss_rlhf.models import LoraOptions, apply_lora, load_causal_lm

    from moss_rlhf.evaluate import kl_on_prompts

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": f"Where did Ann go {i}?"}] for i in range(5)]
    dist = distributed.init("cpu")

    def kl(policy, reference):
        return kl_on_prompts(policy, reference, tokenizer, prompts, max_new_tokens=12, max_len=64, batch_size=2,
                             seed=0, dist=dist)

    policy, reference = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    assert kl(policy, reference)["eval/kl_per_reply"] == 0.0
    lora = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraOptions(4, 16))
    assert kl(lora, None)["eval/kl_per_reply"] == 0.0
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = kl(policy, reference)
    assert moved["eval/kl_per_reply"] > 0 and moved["eval/kl_per_token"] > 0


def test_precomputed_reference_log_probs_are_reused_only_when_they_match(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    cache = tmp_path / "ref.pt"
    common = dict(max_steps=3, eval_every=0, kl_prompts=0, precompute_ref=str(cache))
    dpo.run(config(tmp_path / "a", tiny_model_dir, data, **common))
    assert cache.exists() and "read from" not in capsys.readouterr().out
    dpo.run(config(tmp_path / "b", tiny_model_dir, data, **common))
    assert "reference log-probs read from" in capsys.readouterr().out
    assert steady(read_metrics(tmp_path / "a")) == steady(read_metrics(tmp_path / "b"))
    other = write_jsonl(tmp_path / "other.jsonl", preference_rows(40, seed=5))
    dpo.run(config(tmp_path / "c", tiny_model_dir, other, **common))
    assert "other data's log-probs: scoring again" in capsys.readouterr().out
    cache.write_bytes(b"not a torch file")  # a file of the user's, given by mistake: refused, never written over
    with pytest.raises(ConfigError, match="ref.pt: exists and is not a file of reference log-probs"):
        dpo.run(config(tmp_path / "d", tiny_model_dir, other, **common))
    assert cache.read_bytes() == b"not a torch file"
    cache.unlink()
    dpo.run(config(tmp_path / "d", tiny_model_dir, other, **common, overwrite=True))
    assert steady(read_metrics(tmp_path / "c")) == steady(read_metrics(tmp_path / "d"))
