"""Reward sources: a reward model and Python reward functions combined with weights, functions called with the
prompt records' extra fields (or without, for two-parameter functions), their mistakes reported as one line that
names the function; the missing-EOS penalty and DAPO's soft overlong punishment against their definitions."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from moss_rlhf.config import ConfigError, UserError
from moss_rlhf.data.formats import PromptRecord, load_prompt_records
from moss_rlhf.rewards import RewardSources, load_reward_functions, reward_model_scores, shape_scores
from moss_rlhf.sampling import Rollout, decode_responses


@pytest.fixture()
def rewards_module(monkeypatch):
    """An importable module of reward functions, as a user's package would be."""
    module = types.ModuleType("user_rewards")

    def exact_match(prompts, responses, extras):
        return [float(r.strip() == e.get("answer", "")) for r, e in zip(responses, extras)]

    module.exact_match = exact_match
    module.length = lambda prompts, responses: [float(len(r)) for r in responses]
    module.too_few = lambda prompts, responses: [1.0]
    module.text = lambda prompts, responses: ["high"] * len(responses)
    module.broken = lambda prompts, responses: 1 / 0
    monkeypatch.setitem(sys.modules, "user_rewards", module)
    return module


def _rollout(tokenizer, texts: list[str], finished: list[bool]) -> Rollout:
    from moss_rlhf.data.collate import left_pad

    prompt_ids, prompt_mask = left_pad([tokenizer("hi")["input_ids"]] * len(texts), tokenizer.pad_token_id)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.full((len(texts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    return Rollout(prompt_ids, prompt_mask, ids, mask, torch.tensor(finished), torch.zeros(ids.shape))


def test_sources_combine_with_weights_and_functions_get_the_extras(rewards_module, tiny_model_dir, tmp_path):
    from moss_rlhf.models import load_scorer
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4", "level": 1}\n{"messages": [{"role": "user", "content": "1+1?"}],'
                    ' "answer": "2"}\n')
    records = load_prompt_records(str(path))
    assert records[0] == PromptRecord([{"role": "user", "content": "2+2?"}], {"answer": "4", "level": 1})
    rollout = _rollout(tokenizer, ["4", "3"], [True, True])
    texts = decode_responses(tokenizer, rollout)
    scorer = load_scorer(str(tiny_model_dir), tokenizer).eval()
    functions = load_reward_functions(["user_rewards:exact_match", "user_rewards:length"], [2.0, -0.5])
    sources = RewardSources(tokenizer, scorer, 0.25, functions, batch_size=1)
    total, parts = sources(rollout, records)
    model = reward_model_scores(scorer, rollout, 2)
    assert parts["user_rewards:exact_match"].tolist() == [float(texts[0].strip() == "4"), float(texts[1] == "2")]
    expected = 0.25 * model + 2.0 * parts["user_rewards:exact_match"] - 0.5 * torch.tensor([float(len(t))
                                                                                           for t in texts])
    torch.testing.assert_close(total, expected)
    assert sources.describe() == "0.25 × the reward model + 2 × user_rewards:exact_match + -0.5 × user_rewards:length"


@pytest.mark.parametrize("name, message", [
    ("too_few", "returned 1 values for 2 responses"), ("text", "returned 'high' for response 0; expected a number"),
    ("broken", "raised ZeroDivisionError")])
def test_a_bad_reward_function_is_one_line_naming_it(rewards_module, tiny_model_dir, name, message):
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    sources = RewardSources(tokenizer, functions=load_reward_functions([f"user_rewards:{name}"], []))
    with pytest.raises(UserError, match=f"--reward-fn user_rewards:{name} {message}"):
        sources(_rollout(tokenizer, ["a", "b"], [True, True]), [PromptRecord([])] * 2)


def test_reward_function_specs_and_weights_are_checked(rewards_module):
    with pytest.raises(ConfigError, match="expected package.module:function"):
        load_reward_functions(["user_rewards.length"], [])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_reward_functions(["no_such_module:f"], [])
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        load_reward_functions(["user_rewards:missing"], [])
    with pytest.raises(ConfigError, match="2 weights for 1 --reward-fn"):
        load_reward_functions(["user_rewards:length"], [1.0, 2.0])


def test_missing_eos_penalty_and_soft_overlong_punishment():
    lengths = [2, 6, 7, 8, 8]
    finished = [True, True, True, False, True]
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    rollout = Rollout(torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), torch.zeros(5, 8, dtype=torch.long),
                      mask, torch.tensor(finished), torch.zeros(5, 8))
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    shaped = shape_scores(scores, rollout, missing_eos_penalty=0.5, overlong_buffer=4, overlong_penalty=2.0,
                          max_new_tokens=8)
    # DAPO: L ≤ L_max − L_buffer → 0; then linear to −factor at L_max
    expected = [1.0 - 0.5 * (not f) - 2.0 * min(max(n - (8 - 4), 0) / 4, 1.0) for n, f in zip(lengths, finished)]
    assert shaped.tolist() == pytest.approx(expected)
    assert shape_scores(scores, rollout, 0.0, 0, 1.0, 8).tolist() == scores.tolist()
