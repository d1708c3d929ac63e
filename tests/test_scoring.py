"""Scorers: a reward-model scorer reads each reply at its turn end, batched or not; a ``package.module:function``
scorer is loaded by name and bad names are clear errors; validation samples with fixed seeds and reports the
training reward and each named scorer per prompt and on average."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.scoring import load_function, reward_model_scorer, text_scorer, validate
from moss_rlhf.tokenizer import load_tokenizer


def test_reward_model_scorer_is_batch_independent(tiny_model_dir):
    from moss_rlhf.models import load_scorer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_scorer(str(tiny_model_dir), tokenizer)
    torch.nn.init.normal_(model.score.weight, std=0.2, generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": q}] for q in ("Where did Lin go?", "Hi", "Where did Bo go?")]
    replies = ["Lin went to the park.", "Hello!", "Bo went to the river with Mei."]
    together = reward_model_scorer(model, tokenizer, batch_size=3)(prompts, replies)
    alone = reward_model_scorer(model, tokenizer, batch_size=1)(prompts, replies)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in together)) == 3


def test_functions_by_name_and_clear_errors(tiny_model_dir):
    gold = text_scorer("moss_rlhf.demo.judge:gold_scores", torch.device("cpu"))
    scores = gold([[{"role": "user", "content": "Translate to Chinese: The cat is small."}]] * 2,
                  ["猫很小。", "thank you thank you thank you"])
    assert scores[0] == 10.0 and scores[1] < 5.0
    assert load_function("math:sqrt", "--reward-fn")(9.0) == 3.0
    for spec, message in (("math", "expected package.module:function"), ("no_such_pkg:f", "cannot import"),
                          ("math:no_such_function", "has no function")):
        with pytest.raises(ConfigError, match=message):
            load_function(spec, "--reward-fn")
    with pytest.raises(ConfigError, match="--judge: .* does not exist"):
        text_scorer(str(tiny_model_dir / "missing"), torch.device("cpu"))


@pytest.mark.parametrize("fn, message", [
    (lambda conversations, replies: [1.0], "returned 1 values for 2 responses"),
    (lambda conversations, replies: ["high"] * len(replies), "returned 'high' for response 0; expected a number"),
    (lambda conversations, replies: [float("nan")] * len(replies), "returned nan for response 0; expected a finite"),
    (lambda conversations, replies, extras: [1.0] * len(replies), "raised TypeError: .* missing 1 required"),
    (lambda conversations, replies: 1 / 0, "raised ZeroDivisionError"),
])
def test_a_bad_judge_function_is_one_user_error_naming_it(monkeypatch, fn, message):
    """A ``--judge`` / ``--val-scorer`` function is held to what a reward function is (one number per reply, its
    failure named), and to finite scores: a NaN would pass silently into win rates and the best checkpoint."""
    import sys
    import types

    from moss_rlhf.config import UserError

    monkeypatch.setitem(sys.modules, "user_judges", types.SimpleNamespace(judge=fn))
    judge = text_scorer("user_judges:judge", torch.device("cpu"))
    with pytest.raises(UserError, match=f"--judge user_judges:judge {message}"):
        judge([[{"role": "user", "content": "hi"}]] * 2, ["a", "b"])


def test_validation_reports_each_scorer_with_fixed_seeds(tiny_model_dir):
    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.sampling import SamplingConfig
    from moss_rlhf.sampling.builtin import BuiltinSampler

    tokenizer = load_tokenizer(str(tiny_model_dir))
    sampler = BuiltinSampler(load_causal_lm(str(tiny_model_dir)), tokenizer)
    prompts = [[{"role": "user", "content": q}] for q in ("Where did Lin go?", "Hi", "Bo?", "Mei?", "Tom?")]

    def run():
        return validate(sampler, tokenizer, prompts, SamplingConfig(max_new_tokens=6), seed=4, batch_size=2,
                        max_prompt_len=32, reward=lambda r, rows: r.response_mask.sum(1).float(),
                        scorers={"chars": lambda c, r: [float(len(x)) for x in r]})

    metrics, rows = run()
    assert run() == (metrics, rows)  # fixed seeds: validations differ only when the policy does
    assert [r["prompt"] for r in rows] == ["Where did Lin go?", "Hi", "Bo?", "Mei?", "Tom?"]
    assert [r["chars"] for r in rows] == [float(len(r["response"])) for r in rows]
    assert metrics["val/chars"] == pytest.approx(sum(r["chars"] for r in rows) / 5)
    assert metrics["val/reward"] == pytest.approx(sum(r["length"] for r in rows) / 5) == metrics["val/length"]
