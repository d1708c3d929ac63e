"""The built-in sampler: a batched loop over the model's forward pass with a KV cache (``sampling.decoders``).

Why our own loop rather than ``model.generate``: for the small models this project trains on CPUs, the per-token
overhead of the generic ``generate`` (logits-processor lists, stopping criteria, cache bookkeeping) dominates the
arithmetic; a plain loop of one forward per token does the same sampling with less work per token and
returns exactly what RL needs (tokens, masks, sampling log-probs). Prompts are left-padded, positions count real
tokens only, a finished row keeps emitting padding, and the repetition penalty sees only real tokens (never the
padding, which may share its id with the end token).

Every row draws its random numbers from a generator of its own (one uniform per token, inverted through the CDF),
so a reply is a function of its prompt, its seed and the weights alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moss_rlhf.config import NonFiniteError, UserError
from moss_rlhf.sampling import Rollout, SamplingConfig, fresh_seeds


class BuiltinSampler:
    """Samples from ``model`` itself: :meth:`sync_weights` only points the sampler at the model to use, since there
    is no second copy of the weights to update — except for a model sharded by FSDP, whose forward is a collective
    that processes sampling different lengths cannot run in step, and with a ``dtype`` other than the model's (RL's
    bf16 rollouts from fp32 master weights: half the bytes per generated token): the sampler then keeps a whole
    copy of its weights (``distributed.plain_copy``), which :meth:`sync_weights` refreshes (from the shards, every
    process calling it)."""

    def __init__(self, model, tokenizer=None, stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
                 dtype: torch.dtype | None = None, compiled: bool = False):
        from moss_rlhf.tokenizer import stop_token_ids

        if tokenizer is not None:
            from moss_rlhf.models import check_vocabulary

            check_vocabulary(model, tokenizer)
        elif stop_ids is None or pad_id is None:
            raise TypeError("BuiltinSampler needs a tokenizer, or both stop_ids and pad_id")
        from moss_rlhf.distributed import plain_copy

        self.model = plain_copy(model, dtype)
        self.copies = self.model is not model
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
        self.pad_id = pad_id if pad_id is not None else tokenizer.pad_token_id
        self.compiled = compiled  # a Llama-family model's decode step through torch.compile (sampling.decoders)

    def sync_weights(self, model) -> None:
        from moss_rlhf.distributed import copy_weights

        if self.copies:
            copy_weights(model, self.model)
        else:
            self.model = model

    def release(self) -> None:
        """Nothing to free: the sampler holds no memory of its own between rollouts."""

    def close(self) -> None:
        """Nothing to shut down (a sharded policy's whole copy goes with the sampler)."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, seeds: Sequence[int] | None = None,
                 on_token=None) -> Rollout:
        """Sample up to ``cfg.max_new_tokens`` for each prompt; a row stops at any stop token. ``on_token(step,
        tokens[B])`` is called after each step (streaming; it may raise to end generation early)."""
        from moss_rlhf.data.collate import left_pad
        from moss_rlhf.models import context_length

        model = self.model
        context = context_length(model)
        longest = max((len(p) for p in prompts), default=0)
        if context and longest + cfg.max_new_tokens > context:
            raise UserError(f"a prompt of {longest} tokens plus --max-new-tokens {cfg.max_new_tokens} exceeds the "
                            f"model's context of {context} tokens")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # sampling never wants dropout
        try:
            ids, mask = left_pad(prompts, self.pad_id)
            seeds = list(seeds) if seeds is not None else fresh_seeds(len(prompts))
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            uniforms = torch.stack([torch.rand(cfg.max_new_tokens, generator=torch.Generator().manual_seed(s),
                                               dtype=torch.float64) for s in seeds]) if cfg.temperature > 0 else None
            return _sample(model, ids.to(device), mask.to(device), cfg, self.stop_ids, self.pad_id,
                           None if uniforms is None else uniforms.to(device), on_token, self.compiled)
        finally:
            model.train(was_training)


def _sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: SamplingConfig, stop_ids: list[int],
            pad_id: int, uniforms: torch.Tensor | None, on_token, compiled: bool = False) -> Rollout:
    from moss_rlhf.models import position_ids_of
    from moss_rlhf.sampling.decoders import decoder_for

    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    stop = torch.tensor(stop_ids, device=device, dtype=torch.long)
    positions = position_ids_of(prompt_mask)
    decoder = decoder_for(model, prompt_ids.shape[1] + cfg.max_new_tokens, compiled)
    logits = decoder.start(prompt_ids, prompt_mask, positions, cfg.max_new_tokens)
    vocab = logits.shape[-1]
    seen = None
    if cfg.repetition_penalty != 1.0:
        # presence of every real token, with one extra column that padding is written to (and then ignored)
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(prompt_mask.bool(), prompt_ids, vocab), True)
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, cfg.max_new_tokens), dtype=torch.float32, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for t in range(cfg.max_new_tokens):
        scores = filter_logits(logits, cfg, None if seen is None else seen[:, :vocab])
        if uniforms is not None:  # one pass over the logits: the draw's probabilities are exp(log-probs)
            logp = torch.log_softmax(scores, -1)
            choice = invert_cdf(logp.exp(), uniforms[:, t])
        else:
            logp, choice = torch.log_softmax(logits, -1), scores.argmax(-1)
        picked = logp.gather(1, choice[:, None])[:, 0]
        # a NaN logit makes its row's log-softmax NaN: checked on [B] picked values, not [B, V] logits
        if torch.isnan(picked).any():
            raise NonFiniteError("the model's logits are NaN (its weights are not finite, or its input "
                                 "overflowed): nothing can be sampled from it")
        choice = torch.where(alive, choice, torch.full_like(choice, pad_id))
        tokens[:, t] = choice
        logprobs[:, t] = torch.where(alive, picked, 0.0)
        if seen is not None:
            seen.scatter_(1, torch.where(alive, choice, vocab)[:, None], True)
        lengths += alive.long()
        hit_stop = alive & torch.isin(choice, stop)
        finished |= hit_stop
        alive &= ~hit_stop
        if on_token is not None:
            on_token(t, choice)
        if not alive.any() or t == cfg.max_new_tokens - 1:
            break
        logits = decoder.step(choice, next_position)
        next_position = next_position + 1
    width = max(int(lengths.max()) if batch else 0, 1)
    response_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    return Rollout(prompt_ids, prompt_mask.long(), tokens[:, :width], response_mask, finished,
                   logprobs[:, :width])


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty (on the tokens marked in the ``[B, V]`` boolean ``seen``), temperature, top-k and top-p
    on ``[B, V]`` float logits."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``probs [B, V]`` given one uniform in [0, 1) per row: the same distribution as
    ``torch.multinomial``, ~10× faster on CPU (multinomial draws random numbers for the whole vocabulary), and
    reproducible from the row's own random stream."""
    cdf = probs.double().cumsum(-1)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
