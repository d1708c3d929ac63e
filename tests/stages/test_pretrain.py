"""Pretraining: the loss falls far below the corpus's unigram entropy; exact resume; gradient-accumulation
equivalence; 2 processes (gloo) equal 1 process with the same global batch; the saved model loads in plain
transformers; the masked-LM objective trains."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moss_rlhf.data.formats import load_texts
from moss_rlhf.runs import RunDir, read_metrics
from moss_rlhf.stages import pretrain
from moss_rlhf.stages.pretrain import PretrainConfig
from tests.conftest import run_in_processes


def small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, name="run", **overrides) -> PretrainConfig:
    values = dict(out=str(tmp_path / name), data=[str(corpus_file)], eval_data=[str(eval_corpus_file)],
                  tokenizer=str(tokenizer_dir), model="tiny", seq_len=64, batch_size=8, grad_accum=1, max_steps=12,
                  warmup_steps=3, lr=3e-3, eval_every=0, save_every=0, log_every=1, progress=False, device="cpu")
    values.update(overrides)
    return PretrainConfig(**values)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def unigram_entropy(tokenizer, texts) -> float:
    counts = Counter(t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@pytest.mark.slow
def test_loss_falls_well_below_the_unigram_entropy(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    from moss_rlhf.tokenizer import load_tokenizer

    cfg = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, max_steps=60, eval_every=60)
    result = pretrain.run(cfg)
    entropy = unigram_entropy(load_tokenizer(str(tokenizer_dir)), load_texts(corpus_file))
    assert result.eval_loss < 0.5 * entropy, (result.eval_loss, entropy)
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_bf16_autocast_tracks_fp32_and_keeps_fp32_weights(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    """--precision bf16 (autocast; on CPU too): the loss curve follows the fp32 one within bf16 rounding, the master
    weights and the saved model stay float32."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, precision, precision=precision,
                           max_steps=10, eval_every=10)
        result = pretrain.run(cfg)
        runs[precision] = (losses(cfg.out), result.eval_loss)
    (fp32, fp32_eval), (bf16, bf16_eval) = runs["fp32"], runs["bf16"]
    assert bf16[1] == pytest.approx(fp32[1], rel=0.02)
    assert bf16[10] < 0.8 * bf16[1]
    assert bf16_eval == pytest.approx(fp32_eval, rel=0.05)
    assert {t.dtype for t in _weights(tmp_path / "bf16" / "model").values()} == {torch.float32}


def test_killed_run_resumes_exactly(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, monkeypatch):
    full = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "full", save_every=4)
    pretrain.run(full)

    broken = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "broken", save_every=4)
    real_log = RunDir.log

    def die_at_step_6(self, step, metrics):
        real_log(self, step, metrics)
        if step == 6:
            raise KeyboardInterrupt  # the process is killed after step 6; the last checkpoint is step 4

    monkeypatch.setattr(RunDir, "log", die_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(broken)
    monkeypatch.setattr(RunDir, "log", real_log)
    assert max(losses(broken.out)) == 6
    broken.resume = True
    pretrain.run(broken)

    expected, resumed = losses(full.out), losses(broken.out)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(5, 13):
        assert resumed[step] == expected[step], step  # exact, on CPU


def test_gradient_accumulation_gives_the_same_update(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    one = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "8x1", batch_size=8, grad_accum=1,
                       max_steps=3)
    four = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "2x4", batch_size=2, grad_accum=4,
                        max_steps=3)
    pretrain.run(one)
    pretrain.run(four)
    a, b = losses(one.out), losses(four.out)
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)
    wa = _weights(tmp_path / "8x1" / "model")
    wb = _weights(tmp_path / "2x4" / "model")
    # Adam divides by sqrt(v): where a gradient is near zero, a last-bit difference in the summation order moves that
    # weight by up to a few 1e-6 (3.7e-6 on an AVX2 EPYC); a wrong accumulation moves weights by ~lr = 3e-3
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-5)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    single = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "single", batch_size=8,
                          max_steps=4, eval_every=2, eval_batches=2)
    pretrain.run(single)
    double = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, "double", batch_size=4,
                          max_steps=4, eval_every=2, eval_batches=2)
    run_in_processes(pretrain.run, double)
    a, b = read_metrics(single.out), read_metrics(double.out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], abs=1e-5)
        if "eval/loss" in ra:
            assert ra["eval/loss"] == pytest.approx(rb["eval/loss"], abs=1e-5)
    assert not (tmp_path / "double" / "model").with_name("model-rank1").exists()


def test_saved_model_loads_in_plain_transformers_and_generates(tmp_path, corpus_file, eval_corpus_file,
                                                               tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pretrain.run(small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, max_steps=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    ids = tokenizer("Lin went to", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_masked_lm_objective_learns(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    cfg = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, objective="mlm", max_steps=25,
                       eval_every=25, lr=2e-3)
    result = pretrain.run(cfg)
    first = losses(cfg.out)[1]
    assert result.train_loss < 0.8 * first
    # the saved encoder is the trained one: it fills masks better than the same architecture freshly built
    from transformers import AutoModelForMaskedLM

    from moss_rlhf.data.collate import pack_texts
    from moss_rlhf.data.formats import load_texts
    from moss_rlhf.models import build_masked_lm
    from moss_rlhf.stages.pretrain import masked_data, masked_loss
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    batch = masked_data(pack_texts(tokenizer, load_texts(eval_corpus_file), 64), tokenizer, 0.15, 5).batch([0, 1, 2])
    n = batch.pop("n_targets")
    with torch.no_grad():
        trained = masked_loss(AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "model"), batch) / n
        fresh = masked_loss(build_masked_lm("tiny", tokenizer, seed=0), batch) / n
    assert trained < 0.8 * fresh


def test_a_nonfinite_loss_stops_the_run_and_nothing_nonfinite_is_saved(tmp_path, corpus_file, eval_corpus_file,
                                                                        tokenizer_dir):
    from safetensors.torch import load_file

    from moss_rlhf.config import NonFiniteError

    cfg = small_config(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir, lr=1e3, warmup_steps=0, save_every=1)
    with pytest.raises(NonFiniteError, match=r"pretrain: step \d+: .*nothing of this step was applied"):
        pretrain.run(cfg)
    assert not (tmp_path / "run" / "model").exists()
    saved = list((tmp_path / "run" / "checkpoints").glob("step-*/model/model.safetensors"))
    assert saved and all(torch.isfinite(t).all() for f in saved for t in load_file(str(f)).values())
