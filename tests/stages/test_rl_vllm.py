"""``moss-rlhf rl --rollout-engine vllm``: PPO-max and GRPO on rollouts from a colocated vLLM engine, its weights
synced after every update, with the engine-vs-trainer mismatch measured every step and truncated importance
sampling. Skipped where vLLM is not installed (CI runs these in its vLLM environment); without vLLM the option
is refused in one line."""

from __future__ import annotations

import importlib.util

import pytest

from moss_rlhf.config import ConfigError
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import rl
from tests.stages.test_rl import config, even_majority, even_token_share, grpo_config, tiny  # noqa: F401

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_engine_is_refused_in_one_line(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"needs vLLM: pip install 'moss-rlhf\[vllm\]'"):
        rl.run(config(tiny, tmp_path / "run", rollout_engine="vllm", max_steps=1), reward_fn=even_token_share)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'moss-rlhf[vllm]')")
@pytest.mark.parametrize("recipe", ["ppo_max", "grpo"])
def test_rl_on_vllm_rollouts_follows_the_policy_and_logs_the_mismatch(tiny, tmp_path, recipe):  # noqa: F811
    """The policy moves (lr 1e-3) and the engine follows: after every sync the trainer's log-probs of the engine's
    samples equal the engine's own to rounding (a stale engine would be off by the update), so the TIS weights
    stay at 1 and nothing is capped."""
    if recipe == "ppo_max":
        cfg = config(tiny, tmp_path / recipe, rollout_engine="vllm", rollout_is="tis", max_steps=3, eval_every=3,
                     reward_model=str(tiny / "reward"), reward_model_weight=1.0)
        reward = even_token_share
    else:
        cfg = grpo_config(tiny, tmp_path / recipe, rollout_engine="vllm", rollout_is="tis", max_steps=3,
                          eval_every=3)
        reward = even_majority
    rl.run(cfg, reward_fn=reward)
    rows = read_metrics(cfg.out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["kl/per_token"] > 1e-3  # the policy moved away from the reference
    for row in rows:
        assert row["rollout/logprob_abs_diff"] < 1e-4, row["step"]
        assert row["rollout/kl_engine_trainer"] == pytest.approx(0.0, abs=1e-4)
        assert row["rollout/ratio_max"] == pytest.approx(1.0, abs=1e-3) and row["rollout/ratio_min"] > 0.999
        assert row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["rollout/is_capped_share"] == 0
    assert "val/reward" in rows[-1] and (tmp_path / recipe / "model" / "model.safetensors").exists()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'moss-rlhf[vllm]')")
def test_fsdp_on_one_process_with_an_engine_is_the_plain_run(tiny, tmp_path):  # noqa: F811
    """--parallel fsdp without a launcher: the models sharded over a group of one, which vLLM's in-process engine
    joins (and ends at its close); the engine synced from the gathered shards samples what the unsharded run's
    engine samples, step for step."""
    import functools

    from tests.conftest import run_in_processes

    common = dict(rollout_engine="vllm", max_steps=2, rollout_batch=8, group_size=4, mini_batch=32, ppo_epochs=2,
                  eval_every=2)
    for name, extra in (("plain", {}), ("fsdp", {"parallel": "fsdp"})):
        run_in_processes(functools.partial(rl.run, reward_fn=even_majority),
                         grpo_config(tiny, tmp_path / name, **common, **extra), world_size=1)
    plain, sharded = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in sharded] == [1, 2]
    for a, b in zip(plain, sharded, strict=True):
        keys = {k for k in a if not k.startswith("time/") and isinstance(a[k], float)}
        bad = [(k, a[k], b[k]) for k in sorted(keys) if b[k] != pytest.approx(a[k], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
        assert b["rollout/logprob_abs_diff"] < 1e-4


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'moss-rlhf[vllm]')")
def test_bf16_runs_a_bf16_engine_that_follows_the_policy(tiny, tmp_path):  # noqa: F811
    """--precision bf16: the engine runs in bfloat16, synced from the fp32 policy after every update; the
    trainer's log-probs of its samples differ from the engine's by bf16 rounding only (~1e-3), step after step."""
    cfg = grpo_config(tiny, tmp_path / "bf16", rollout_engine="vllm", precision="bf16", max_steps=3, eval_every=3)
    rl.run(cfg, reward_fn=even_majority)
    rows = read_metrics(cfg.out)
    assert rows[-1]["kl/per_token"] > 1e-3  # the policy moved
    for row in rows:
        assert 0 < row["rollout/logprob_abs_diff"] < 0.01, row["step"]


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'moss-rlhf[vllm]')")
def test_a_stale_engine_shows_in_the_mismatch_metrics(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The other side of the test above: an engine that keeps the first weights samples from the old policy, and
    the metrics say so from the second step on (so their being 0 above means the sync worked)."""
    from moss_rlhf.sampling.vllm import VLLMSampler

    first_sync = VLLMSampler.sync_weights

    def only_once(self, model):
        if not getattr(self, "synced", False):
            first_sync(self, model)
            self.synced = True

    monkeypatch.setattr(VLLMSampler, "sync_weights", only_once)
    cfg = config(tiny, tmp_path / "stale", rollout_engine="vllm", max_steps=3, reward_model=str(tiny / "reward"),
                 reward_model_weight=1.0)
    rl.run(cfg, reward_fn=even_token_share)
    rows = read_metrics(cfg.out)
    assert rows[0]["rollout/logprob_abs_diff"] < 1e-4  # step 1: the engine still has the policy's weights
    assert all(r["rollout/logprob_abs_diff"] > 1e-3 for r in rows[1:])


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'moss-rlhf[vllm]')")
@pytest.mark.parametrize("parallel, lora_r", [("ddp", 0), ("fsdp", 0), ("fsdp", 4)])
def test_an_engine_per_process_samples_as_one_engine(tiny, tmp_path, parallel, lora_r):  # noqa: F811
    """Under torchrun every process has an engine of its own (vLLM's external launcher, in the trainer's process
    group) that samples its share of the groups, each reply from its own seed: GRPO on two processes is the run of
    one process on the same global batch — statistics and final weights — and each engine follows its process's
    policy (with FSDP, synced from the gathered shards; with LoRA, each layer merged from gathered adapters)."""
    from tests.stages.test_rl import one_and_two_processes

    common = dict(rollout_engine="vllm", max_steps=3, rollout_batch=8, group_size=4, mini_batch=32, ppo_epochs=2,
                  eval_every=3, lora_r=lora_r)
    single = one_and_two_processes(grpo_config(tiny, tmp_path / "single", **common),
                                   grpo_config(tiny, tmp_path / "double", parallel=parallel, **common), even_majority)
    assert single[-1]["kl/per_token"] > 0
    for row in read_metrics(tmp_path / "double"):
        assert row["rollout/logprob_abs_diff"] < 1e-4, row["step"]
