"""Pure loss and RL math shared by every MOSS-RLHF training stage.

What lives here (no model, no data, no I/O):

* masked reductions: ``masked_sum/mean`` over ``[B, T]`` tensors with a 0/1 mask, the
  building block of every token-level loss (whitening over every process is
  ``distributed.global_whiten``);
* language modelling: ``token_logprobs``, ``entropy_from_logits``, ``logits_logprobs`` (both at once from the logits,
  with a fused backward), ``linear_logprobs`` (both from the hidden states and the output projection, block by
  block, never holding the ``[N, V]`` logits), ``lm_loss_sum``
  (next-token cross-entropy returned as *sum and count* so that gradient
  accumulation over micro-batches is exactly equivalent to one big batch);
* reward modelling: the Bradley-Terry pairwise loss with an optional margin and the
  label smoothing (or per-pair soft labels) of "Secrets of RLHF in Large Language
  Models Part II" (Wang et al. 2024), the two terms of its contrastive variant (SimCSE's InfoNCE, SwAV's swapped
  prediction of Sinkhorn codes) and MetaRM's difference objective (Dou et al. 2024);
* offline preference optimisation: DPO and its family (cDPO, robust DPO, IPO, SLiC hinge, SimPO, ORPO's odds
  ratio) from summed reply log-probs, and KTO's loss for unpaired desirable / undesirable replies;
* PPO-max (Zheng et al. 2023, "Secrets of RLHF ... Part I: PPO", arXiv 2307.04964):
  per-token KL estimators (J. Schulman, "Approximating KL Divergence", 2020),
  the KL-penalised per-token reward, the clipped policy loss (with DAPO's
  asymmetric clip-higher) and value loss, the loss aggregation modes of GRPO,
  DAPO and Dr.GRPO, running reward moments for reward
  normalisation + clipping (exactly merged across ``torch.distributed`` ranks with
  Chan et al.'s parallel algorithm), and the fixed / adaptive KL controllers of
  Ziegler et al. 2019.

Conventions: tensors are batch-first ``[B, T]``; masks are float or bool ``[B, T]``
with 1 for tokens that count.  Masked-out entries are *selected away* (``torch.where``)
rather than multiplied by zero, so NaN/inf garbage in padding cannot leak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- masked ops


def _zero_where_masked(x: Tensor, mask: Tensor) -> Tensor:
    # where() instead of x * mask: 0 * nan = nan, and padding may hold anything.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is set (over ``dim``, or everything)."""
    x = _zero_where_masked(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over counted entries; a slice with no counted entries gives 0 (not NaN)."""
    count = mask.to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


# ----------------------------------------------------------------------------- LM heads


def _upcast(x: Tensor) -> Tensor:
    # softmax in bf16/fp16 loses ~3 significant digits; float64 inputs stay float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[b, t, tokens[b, t]]`` in float32 -> ``[B, T]``.

    No shift is applied: for causal LMs pass ``logits[:, :-1]`` and ``tokens[:, 1:]``.
    Computed one row at a time as ``logit[token] - logsumexp(logits)`` so at most one
    ``[T, V]`` float32 copy exists (a full ``log_softmax`` of bf16 ``[B, T, V]`` logits would
    materialise a float32 tensor twice the size of the logits).
    """
    rows = []
    for lg, tk in zip(logits, tokens):
        lg = _upcast(lg)
        picked = lg.gather(-1, tk.long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(lg, dim=-1))
    if not rows:
        return _upcast(logits.new_zeros(tokens.shape))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum_v p log p`` of the softmax at every position -> ``[B, T]`` float32.

    Uses ``H = logsumexp(l) - sum_v softmax(l)_v * l_v``, which avoids ``0 * log 0``.
    """
    rows = []
    for lg in logits:
        lg = _upcast(lg)
        rows.append(torch.logsumexp(lg, -1) - (torch.softmax(lg, -1) * lg).sum(-1))
    if not rows:
        return _upcast(logits.new_zeros(logits.shape[:-1]))
    return torch.stack(rows)


# Rows of logits whose probabilities are formed at once for the entropy: 2¹⁸ floats (1 MiB) fit a core's cache, so
# ``exp`` and the product never write a [N, V] tensor to memory.
ENTROPY_BLOCK_ELEMENTS = 2 ** 18


class _LogitsLogprobs(torch.autograd.Function):
    """``log softmax(T⁻¹ z)`` at the target tokens and the softmax's entropy from ``[N, V]`` logits, with one pass
    that writes a ``[N, V]`` tensor (the fused ``log_softmax``): the entropy ``−Σ p·log p`` is summed block by block
    of rows that fit the cache, and backward turns the kept log-probs into the gradient in place
    (``dlog p_y/dz = onehot(y) − p``, ``dH/dz = −p ⊙ (log p + H)``). At the GRPO benchmark's 2,048 × 2,048 logits
    (16 MiB) a pass that writes a fresh tensor cost 5–7 ms inside an update step, one in place under 1 ms: profiled
    there, an ``exp``-and-sum form with an elementwise entropy product spent about 21 ms in its passes over the
    logits, forward and backward, this form about 15 (autograd through ``logsumexp``, ``gather`` and a second
    softmax made about twice the passes of that form)."""

    @staticmethod
    def forward(ctx, logits, targets, scale, with_entropy, entropy_grad, backward):
        z = _upcast(logits)
        logp = torch.log_softmax(z * scale if scale != 1.0 else z, -1)
        logprobs = logp.gather(1, targets[:, None])[:, 0]
        entropy = None
        if with_entropy:
            entropy = logp.new_empty(logp.shape[0])
            rows = max(1, ENTROPY_BLOCK_ELEMENTS // max(logp.shape[1], 1))
            for start in range(0, logp.shape[0], rows):
                block = logp[start:start + rows]
                entropy[start:start + rows] = -(block.exp() * block).sum(-1)
        ctx.save_for_backward(logp if backward else None, targets, entropy if entropy_grad else None)
        ctx.scale = scale
        if not entropy_grad and entropy is not None:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)  # an output nobody differentiates costs nothing
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        # the kept log-probs become the gradient in place: a second backward through this graph is refused by
        # autograd (they were modified), as for any graph freed by backward
        logp, targets, entropy = ctx.saved_tensors
        if grad_entropy is not None and entropy is not None:  # −g_H · p ⊙ (log p + H)
            probs = logp.exp()
            grad = logp.add_(entropy[:, None]).mul_(probs).mul_(-grad_entropy[:, None])
            if grad_logprobs is not None:
                grad.addcmul_(probs, grad_logprobs[:, None], value=-1.0)
        elif grad_logprobs is not None:
            grad = logp.exp_().mul_(-grad_logprobs[:, None])
        else:
            return None, None, None, None, None, None
        if grad_logprobs is not None:  # g · (onehot(y) − p): the onehot part
            grad.scatter_add_(1, targets[:, None], grad_logprobs[:, None])
        if ctx.scale != 1.0:
            grad.mul_(ctx.scale)
        return grad, None, None, None, None, None


def logits_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False,
                    entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[N]`` of ``targets [N]`` under ``softmax(logits / T)`` for ``logits [N, V]`` (float32, float64
    for float64 inputs), and the entropies ``[N]`` when asked (differentiable only with ``entropy_grad``) — what
    ``token_logprobs`` and ``entropy_from_logits`` give, in one fused pass forward and one backward."""
    # whether a backward will come (forward runs with gradients off, whatever the caller's mode)
    backward = torch.is_grad_enabled() and logits.requires_grad
    return _LogitsLogprobs.apply(logits, targets.long(), 1.0 / temperature, with_entropy,
                                 with_entropy and entropy_grad and backward, backward)


# The most logits ``linear_logprobs`` holds at once (256 MiB in float32), and the size of the [N, V] logits above
# which the RL update computes its log-probs that way (``packing.packed_logprobs``). Below it one GEMM and a fused
# softmax over all the logits were as fast or faster on a CPU (N·V = 4M: 106–123 ms against 116–172 ms for blocks
# of 32K–8M elements, forward and backward); above it the logits, their softmax and their gradient would each be a
# tensor of N·V floats — 10 GB at 16K response tokens of a 150K vocabulary. Smaller blocks cost time: at N 2,048 ×
# V 152K, blocks of 2²⁴ took 1.40× the whole logits' time, blocks of 2²⁶ 0.84–0.92× (benchmarks/head_memory.py).
HEAD_BLOCK_ELEMENTS = 2 ** 26


def _scaled_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    logits = _upcast(F.linear(hidden, weight, bias))
    return logits if scale == 1.0 else logits.mul_(scale)


def _head_chunks(hidden: Tensor, vocab: int) -> range:
    return range(0, hidden.shape[0], max(1, HEAD_BLOCK_ELEMENTS // max(vocab, 1)))


class _LinearLogprobs(torch.autograd.Function):
    """``log softmax((h Wᵀ + b) / T)`` at the target tokens, and the softmax's entropy, without the ``[N, V]`` logits:
    both are computed one block of rows at a time, and backward recomputes each block's logits from ``h`` and ``W``
    (one extra head GEMM) instead of keeping them. ``dlog p_y/dz = onehot(y) − p``; ``dH/dz = −p ⊙ (z − Σ p z)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        scale = 1.0 / temperature
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprobs, entropy, lse = (hidden.new_empty(n, dtype=dtype) for _ in range(3))
        chunks = _head_chunks(hidden, weight.shape[0])
        for start in chunks:
            rows = slice(start, start + chunks.step)
            z = _scaled_logits(hidden[rows], weight, bias, scale)
            lse[rows] = torch.logsumexp(z, -1)
            logprobs[rows] = z.gather(1, targets[rows, None])[:, 0] - lse[rows]
            entropy[rows] = lse[rows] - (torch.softmax(z, -1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.scale = scale
        ctx.autocast = (hidden.device.type, torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        ctx.set_materialize_grads(False)  # an output nobody differentiates (often the entropy) costs nothing
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros_like(bias, dtype=accumulate)
                     if bias is not None and ctx.needs_input_grad[2] else None)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        chunks = _head_chunks(hidden, weight.shape[0])
        with torch.autocast(device_type, autocast_dtype, enabled=autocast_on):
            for start in chunks:
                rows = slice(start, start + chunks.step)
                h = hidden[rows]
                z = _scaled_logits(h, weight, bias, ctx.scale)
                p = (z - lse[rows, None]).exp_()
                g = grad_logprobs[rows, None].to(z.dtype) if grad_logprobs is not None else None
                if grad_entropy is not None:  # −g_H · p ⊙ (z − Σ p z), with Σ p z = lse − H
                    grad_z = (z - (lse[rows] - entropy[rows])[:, None]).mul_(p)
                    grad_z.mul_(-grad_entropy[rows, None].to(z.dtype))
                    if g is not None:
                        grad_z.addcmul_(p, g, value=-1.0)
                else:
                    grad_z = p.mul_(-g)
                if g is not None:  # g · (onehot(y) − p): the onehot part
                    grad_z.scatter_add_(1, targets[rows, None], g)
                grad_z.mul_(ctx.scale)  # under autocast the two GEMMs below run in its dtype, as the forward's
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += grad_z.T.to(h.dtype) @ h
                if grad_bias is not None:
                    grad_bias += grad_z.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probs ``[N]`` of ``targets [N]`` and entropies ``[N]`` (float32, float64 for float64 inputs) of
    ``softmax((hidden Wᵀ + b) / T)`` for ``hidden [N, d]`` and an output projection ``weight [V, d]`` — as
    ``token_logprobs`` and ``entropy_from_logits`` on the logits, differentiable in ``hidden``, ``weight`` and
    ``bias``, with at most one block of rows' logits in memory (forward and backward). Why: a policy's ``[N, V]``
    float32 logits are the update's largest tensor (N response tokens × a vocabulary of 10⁴–10⁵), held with their
    softmax and their gradient; veRL's fused log-prob kernels and Liger's fused linear cross-entropy avoid them for
    the same reason."""
    return _LinearLogprobs.apply(hidden, weight, bias, targets.long(), float(temperature))


def lm_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and the number of counted tokens.

    Logits at position t predict ``labels[:, t + 1]``; labels equal to ``ignore_index``
    (prompt tokens in SFT, padding) do not count.  Divide the sum of ``loss_sum`` over all
    micro-batches by the sum of ``n_tokens`` to get exactly the big-batch mean.
    """
    shift_logits = _upcast(logits[:, :-1].reshape(-1, logits.shape[-1]))
    shift_labels = labels[:, 1:].reshape(-1).long()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (shift_labels != ignore_index).sum()


# ----------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    margin: Tensor | float | None = None,
    label_smoothing: float | Tensor = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Pairwise reward-model loss ``-(1-e) log s(d) - e log s(-d)``, ``d = r_c - r_r - margin``.

    ``e = label_smoothing`` treats a fraction e of the human labels as flipped (Secrets of
    RLHF Part II), which keeps the reward from growing without bound on easy pairs. A
    tensor ``e`` gives each pair its own share in [0, 1] (soft labels: the target
    probability that the chosen reply wins is ``1 - e``).
    ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if isinstance(label_smoothing, Tensor):
        if not bool(((label_smoothing >= 0) & (label_smoothing <= 1)).all()):
            raise ValueError("per-pair label_smoothing must be in [0, 1]")
    elif not 0.0 <= label_smoothing <= 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5]")
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d)  # logsigmoid is stable for large |d|, unlike log(sigmoid(d))
    if isinstance(label_smoothing, Tensor) or label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-d)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def info_nce(view_a: Tensor, view_b: Tensor, temperature: float) -> Tensor:
    """Per-row InfoNCE of two views ``[N, H]`` (SimCSE, Gao et al. 2021): row i of ``view_a`` should be most similar
    (cosine, divided by ``temperature``) to row i of ``view_b`` among all rows of ``view_b``:
    ``-log softmax_j(cos(a_i, b_j) / τ)[i]``. One row has no negative and gives 0."""
    a, b = F.normalize(view_a.float(), dim=-1), F.normalize(view_b.float(), dim=-1)
    logits = a @ b.T / temperature
    return -torch.log_softmax(logits, dim=-1).diagonal()


def sinkhorn_codes(scores: Tensor, epsilon: float, iterations: int = 3) -> Tensor:
    """SwAV's codes (Caron et al. 2020): a soft assignment ``[N, K]`` of N rows to K prototypes from their scores
    ``[N, K]``, ``exp(scores / ε)`` rescaled by Sinkhorn–Knopp so that the prototypes share the batch equally (each
    column sums to about N/K) and each row sums to 1 — the equal partition that keeps every row from collapsing
    onto one prototype. No gradient flows through it."""
    with torch.no_grad():
        scores = _upcast(scores)
        q = torch.exp((scores - scores.max()) / epsilon).T  # [K, N]
        q /= q.sum()
        k, n = q.shape
        for _ in range(iterations):
            q /= q.sum(dim=1, keepdim=True) * k  # each prototype: mass 1/K
            q /= q.sum(dim=0, keepdim=True) * n  # each row: mass 1/N
        return (q * n).T


def swav_loss(view_a: Tensor, view_b: Tensor, prototypes: Tensor, temperature: float, epsilon: float = 0.05,
              iterations: int = 3) -> Tensor:
    """Per-row SwAV loss ``[N]`` of two views ``[N, H]`` and prototypes ``[K, H]`` (all compared by cosine): each
    view predicts the other's Sinkhorn codes, ``-½ Σ_k (q_b log p_a + q_a log p_b)`` with
    ``p = softmax(cos(z, c_k) / τ)`` — a cluster-level contrast, where InfoNCE contrasts single rows."""
    a, b, c = (F.normalize(_upcast(x), dim=-1) for x in (view_a, view_b, prototypes))
    scores_a, scores_b = a @ c.T, b @ c.T
    q_a, q_b = sinkhorn_codes(scores_a, epsilon, iterations), sinkhorn_codes(scores_b, epsilon, iterations)
    return -0.5 * ((q_b * torch.log_softmax(scores_a / temperature, -1)).sum(-1)
                   + (q_a * torch.log_softmax(scores_b / temperature, -1)).sum(-1))


def reward_difference_objective(rewards: Tensor, group_sizes: list[int]) -> Tensor:
    """MetaRM's difference objective J (Dou et al. 2024, "MetaRM: Shifted Distributions Alignment via
    Meta-Learning"): over groups of replies to one prompt (``rewards`` ``[Σ sizes]``, group after group), the mean
    over the group's pairs of ``σ(|r_i − r_j|)``, averaged over the groups. It grows as the reward model tells
    replies of the same prompt apart; MetaRM takes a gradient *ascent* step on it."""
    terms, start = [], 0
    for size in group_sizes:
        r = _upcast(rewards[start:start + size])
        start += size
        i, j = torch.triu_indices(size, size, offset=1, device=r.device)
        terms.append(torch.sigmoid((r[i] - r[j]).abs()).mean())
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- offline preference optimisation

DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")


def dpo_loss(loss_type: str, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
             beta: float, *, chosen_len: Tensor | None = None, rejected_len: Tensor | None = None,
             label_smoothing: float = 0.0, gamma: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair preference loss ``[N]`` and the implicit reward margin ``[N]`` from the policy's summed reply
    log-probs (``chosen``, ``rejected``) and the reference's (``ref_*``; unused by simpo and orpo):

    * ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(h)``, ``h = β[(π_c - ref_c) - (π_r - ref_r)]``; with
      ``label_smoothing`` ε the conservative cDPO ``-(1-ε) log σ(h) - ε log σ(-h)`` (Mitchell 2023);
    * ``robust`` (Chowdhury et al. 2024): the unbiased estimator under label noise ε,
      ``(-(1-ε) log σ(h) + ε log σ(-h)) / (1 - 2ε)``;
    * ``ipo`` (Azar et al. 2023): ``(Δ - 1/(2β))²`` with Δ the log-ratio difference of length-averaged log-probs;
    * ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - h)``;
    * ``simpo`` (Meng et al. 2024, reference-free): ``-log σ(β(π_c/|c| - π_r/|r|) - γ)`` (label smoothing as sigmoid);
    * ``orpo`` (Hong et al. 2024, reference-free): ``-log σ(log odds_c - log odds_r)`` with ``odds = p / (1 - p)``
      of the length-averaged probability ``p``, weighted by ``beta`` (λ); the stage adds the SFT term.

    The margin returned is ``h / β`` for the reference-based losses, the length-normalised log-prob difference
    for simpo and orpo (what "reward accuracy" counts)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown preference loss {loss_type!r} ({', '.join(DPO_LOSSES)})")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    chosen, rejected = chosen.float(), rejected.float()
    if loss_type in ("simpo", "orpo", "ipo"):
        if chosen_len is None or rejected_len is None:
            raise ValueError(f"{loss_type} needs the replies' lengths")
        avg_c, avg_r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    if loss_type == "simpo":
        h = beta * (avg_c - avg_r) - gamma
        return _smoothed_logsigmoid(h, label_smoothing), avg_c - avg_r
    if loss_type == "orpo":
        # log odds = log p - log(1 - p), with log(1 - p) = log(-expm1(log p)) (stable for p near 1)
        log_odds = (avg_c - torch.log(-torch.expm1(avg_c))) - (avg_r - torch.log(-torch.expm1(avg_r)))
        return -beta * F.logsigmoid(log_odds), avg_c - avg_r
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"{loss_type} needs the reference model's log-probs")
    if loss_type == "ipo":
        delta = (avg_c - ref_chosen.float() / chosen_len.clamp(min=1)) - \
            (avg_r - ref_rejected.float() / rejected_len.clamp(min=1))
        return (delta - 1 / (2 * beta)) ** 2, delta
    margin = (chosen - ref_chosen.float()) - (rejected - ref_rejected.float())
    h = beta * margin
    if loss_type == "sigmoid":
        return _smoothed_logsigmoid(h, label_smoothing), margin
    if loss_type == "robust":
        loss = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / \
            (1 - 2 * label_smoothing)
        return loss, margin
    return torch.relu(1 - h), margin  # hinge


def _smoothed_logsigmoid(h: Tensor, label_smoothing: float) -> Tensor:
    loss = -F.logsigmoid(h)
    return (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h) if label_smoothing else loss


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, reference_point: Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): per-reply loss
    ``[N]`` and implicit reward ``r = log π − log π_ref`` ``[N]`` of unpaired replies, from summed reply log-probs.

    With ``z0`` the reference point (:func:`kto_reference_point`, held constant: no gradient flows through it)::

        desirable:    λ_D (1 − σ(β (r − z0)))
        undesirable:  λ_U (1 − σ(β (z0 − r)))

    A desirable reply gains by rising above the reference point, an undesirable one by falling below it; the
    sigmoid saturates both ways (prospect theory's value function), so replies already far on the right side stop
    pulling."""
    r = logps.float() - ref_logps.float()
    z0 = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device).detach()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return loss, r


def kto_reference_point(kl_logps_sum: Tensor, kl_ref_logps_sum: Tensor, count: Tensor | float) -> Tensor:
    """KTO's ``z0 = max(0, mean KL)``, estimated as the paper does on mismatched pairs (each prompt with another
    example's reply): from the sums over ``count`` such pairs of the policy's and the reference's reply log-probs.
    Sums rather than means, so that callers can add them up over micro-batches and processes first. Detached."""
    mean = (kl_logps_sum.double() - kl_ref_logps_sum.double()) / max(float(count), 1.0)
    return mean.clamp(min=0.0).float().detach()


# ----------------------------------------------------------------------------- PPO


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1", clamp: float = 10.0) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, clamped to ``[-clamp, clamp]``.

    With ``log_r = log pi - log pi_ref`` (Schulman, "Approximating KL Divergence"):
    k1 = log_r (unbiased, can be negative), k2 = log_r^2 / 2 (biased, low variance, >= 0),
    k3 = exp(-log_r) - 1 + log_r (unbiased and >= 0). Every estimate is clamped, as OpenRLHF and veRL do: one
    token the policy made far less likely than the reference (log_r = -15) would otherwise give k3 = 3e6 and its
    penalty would swamp the whole batch's whitened advantages. ``clamp`` 0 disables it.
    """
    log_r = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_r
    elif estimator == "k2":
        kl = 0.5 * log_r**2
    elif estimator == "k3":
        kl = torch.expm1(-log_r.clamp(min=-50.0, max=50.0)) + log_r  # the inner clamp only keeps exp finite
    else:
        raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")
    return kl.clamp(-clamp, clamp) if clamp else kl


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last counted token of each row (-1 for rows with none) -> ``[B]``."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(-1)


def per_token_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
    kl_clamp: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """PPO reward ``r_t = -kl_coef * KL_t`` plus the sequence ``score[b]`` on the last counted token.

    Returns ``(rewards, kl)``, both ``[B, T]`` and 0 where masked out.  Rows with no counted
    token get no score.  Call under ``torch.no_grad()``: these are targets, not losses.
    """
    kl = _zero_where_masked(kl_penalty(logprobs, ref_logprobs, estimator, kl_clamp), mask)
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    has_tok = last >= 0
    bonus = torch.zeros_like(rewards)
    bonus.scatter_(1, last.clamp_min(0).unsqueeze(1), torch.where(has_tok, score.to(rewards.dtype), 0.0).unsqueeze(1))
    return rewards + bonus, kl


def _reduce(loss: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return masked_mean(loss, mask)
    if reduction == "sum":  # pair with stats["n_tokens"] for exact gradient accumulation
        return masked_sum(loss, mask)
    if reduction == "none":  # per token, 0 where masked out: for aggregate()
        return _zero_where_masked(loss, mask)
    raise ValueError(f"unknown reduction {reduction!r} (mean, sum, none)")


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(per_token: Tensor, mask: Tensor, mode: str) -> Tensor:
    """The numerator of a loss aggregated over a (mini-)batch, for one micro-batch of it; divide the sum over the
    micro-batches and processes by :func:`aggregation_denominator`.

    * ``token_mean`` (DAPO): every token of the batch weighs the same — ``Σ_bt L / Σ_bt 1``;
    * ``seq_mean_token_mean`` (the original GRPO): each sequence's token mean, averaged over sequences —
      ``Σ_b (Σ_t L / T_b) / B`` (a short reply's tokens weigh more);
    * ``seq_mean_token_sum_norm`` (Dr.GRPO): token sums over a constant — ``Σ_bt L / (B · T_max)`` (no length
      bias either way).
    """
    m = mask.bool()
    if mode == "seq_mean_token_mean":
        return (masked_sum(per_token, m, dim=1) / m.sum(1).clamp_min(1)).sum()
    if mode in ("token_mean", "seq_mean_token_sum_norm"):
        return masked_sum(per_token, m)
    raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(AGGREGATIONS)})")


def aggregation_denominator(mode: str, n_tokens: float, n_sequences: float, max_len: int) -> float:
    """What :func:`aggregate`'s numerators are divided by: the batch's tokens, its sequences, or sequences × the
    longest allowed reply."""
    return {"token_mean": n_tokens, "seq_mean_token_mean": n_sequences,
            "seq_mean_token_sum_norm": n_sequences * max_len}[mode]


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    reduction: str = "mean",
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, to be *minimised*: ``max(-A r, -A clip(r, 1-eps, 1+eps_high))``.

    ``r = exp(logprobs - old_logprobs)``; ``advantages`` and ``old_logprobs`` are constants.
    ``clip_eps_high`` (DAPO's clip-higher; default ``clip_eps``) lets unlikely tokens with a positive advantage rise
    further. ``reduction="mean"`` is the masked token mean; ``"sum"`` the masked sum (divide the total over
    micro-batches by the total ``stats["n_tokens"]``); ``"none"`` per token (for :func:`aggregate`). Stats
    (detached): ``clipfrac`` = fraction of tokens where the clipped branch is active (their gradient is 0),
    ``approx_kl`` = k3 estimate ``mean((r - 1) - log r)`` of KL(pi_old || pi), ``ratio_mean``, ``n_tokens``.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, reduction)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "n_tokens": mask.bool().sum(),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss ``0.5 max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``.

    Same ``reduction`` semantics as :func:`clipped_policy_loss`.  Stats: ``vf_clipfrac`` (fraction
    of tokens where the clipped branch is larger), ``n_tokens``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_unclipped = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = _reduce(0.5 * torch.maximum(err_unclipped, err_clipped), mask, reduction)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).float(), mask), "n_tokens": mask.bool().sum()}
    return loss, stats


# ----------------------------------------------------------------------------- running stats


def _dist_group_size(group) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


class RunningMoments:
    """Running mean / std of scalars (PPO-max reward normalisation), kept in float64.

    Batches are merged with Chan et al.'s parallel update of (count, mean, M2), so the result
    equals the moments of the concatenation of every batch, independent of batch sizes.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        """Unbiased variance (``torch.var`` default); 0 with fewer than 2 samples."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: Tensor, group=None, mask: Tensor | None = None) -> tuple[float, float]:
        """Fold the (counted) entries of ``x`` in; returns the batch's (mean, std).

        When ``torch.distributed`` is initialised every rank must call this (a rank may pass an
        empty batch): counts and sums are all-reduced, then each rank's squared deviations about
        the *global* batch mean, so every rank merges the same exact global batch statistics.
        """
        x = x.detach().double()
        x = x[mask.bool()] if mask is not None else x.reshape(-1)
        n, s = float(x.numel()), x.sum()
        buf = torch.stack([torch.tensor(n, dtype=torch.float64, device=x.device), s])
        distributed = _dist_group_size(group) > 1
        if distributed:
            torch.distributed.all_reduce(buf, group=group)
        n, s = float(buf[0]), float(buf[1])
        b_mean = s / n if n > 0 else 0.0
        m2 = ((x - b_mean) ** 2).sum().reshape(1)
        if distributed:
            torch.distributed.all_reduce(m2, group=group)
        b_m2 = float(m2[0])
        if n == 0:
            return 0.0, 0.0
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total
        return b_mean, math.sqrt(b_m2 / (n - 1)) if n > 1 else 0.0

    def normalize(self, x: Tensor, clip: float | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / std`` (``x / std`` without ``shift_mean``), then clamp to ``[-clip, clip]``.

        Before 2 samples have been seen the std is taken as 1 (nothing to scale by yet); ``eps``
        only floors a zero std.
        """
        std = max(self.std, eps) if self.count > 1 else 1.0
        out = ((x - self.mean) if shift_mean else x) / std
        return out.clamp(-clip, clip) if clip is not None else out

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


# ----------------------------------------------------------------------------- KL controllers


@dataclass
class FixedKLController:
    """Constant KL coefficient (same interface as :class:`AdaptiveKLController`)."""

    kl_coef: float

    @property
    def value(self) -> float:
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: steer the observed KL towards ``target``.

    ``err = clip(current_kl / target - 1, -0.2, 0.2)``; ``coef *= 1 + err * n_steps / horizon``,
    where ``n_steps`` is the number of samples (episodes) since the last update.
    """

    init_kl_coef: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.kl_coef = float(self.init_kl_coef)

    @property
    def value(self) -> float:
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + err * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])
        self.target, self.horizon = float(state["target"]), float(state["horizon"])
