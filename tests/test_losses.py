"""Tests for moss_rlhf.losses against plain-Python reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moss_rlhf import losses as L


def _padded_mask(lengths: list[int], T: int, offsets: list[int] | None = None) -> torch.Tensor:
    """Right-padded mask; with offsets the counted region starts later (prompt left of it)."""
    offsets = offsets or [0] * len(lengths)
    return torch.tensor([[1.0 if o <= t < o + n else 0.0 for t in range(T)] for n, o in zip(lengths, offsets)])


def central_difference(f, x: torch.Tensor, index: tuple, h: float = 1e-6) -> float:
    """d f / d x[index] by the central difference (f: a tensor to a float), for gradients against a plain reference."""
    up, down = x.clone(), x.clone()
    up[index] += h
    down[index] -= h
    return (f(up) - f(down)) / (2 * h)


def _counted(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(v) for row, mr in zip(x.tolist(), mask.tolist()) for v, m in zip(row, mr) if m]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: list[float], unbiased: bool = True) -> float:
    mu = _mean(xs)
    return sum((v - mu) ** 2 for v in xs) / (len(xs) - (1 if unbiased else 0))


# ----------------------------------------------------------------------------- masked ops


def test_masked_reductions_match_reference_and_ignore_garbage():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = _padded_mask([7, 3, 1, 5], 7)
    x_garbage = torch.where(mask.bool(), x, torch.tensor(float("nan"), dtype=torch.float64))
    xs = _counted(x, mask)
    assert L.masked_sum(x_garbage, mask).item() == pytest.approx(sum(xs))
    assert L.masked_mean(x_garbage, mask).item() == pytest.approx(_mean(xs))
    row_means = L.masked_mean(x_garbage, mask, dim=1)
    for i in range(4):
        assert row_means[i].item() == pytest.approx(_mean(_counted(x[i : i + 1], mask[i : i + 1])))
    # bool masks behave like float masks; an empty row averages to 0 rather than NaN
    assert L.masked_mean(x, mask.bool()).item() == pytest.approx(_mean(xs))
    empty = torch.zeros(2, 3)
    assert L.masked_mean(torch.ones(2, 3), empty, dim=1).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- LM heads


def test_token_logprobs_and_entropy_match_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    lp = L.token_logprobs(logits, tokens)
    ref = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, ref)
    ent = L.entropy_from_logits(logits)
    for b in range(3):
        for t in range(5):
            row = logits[b, t].tolist()
            z = sum(math.exp(v) for v in row)
            p = [math.exp(v) / z for v in row]
            assert ent[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-5)
            assert lp[b, t].item() == pytest.approx(math.log(p[tokens[b, t]]), abs=1e-5)
    # bf16 logits are upcast: result is float32 and close to the float32 computation
    lp16 = L.token_logprobs(logits.bfloat16(), tokens)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, L.token_logprobs(logits.bfloat16().float(), tokens))
    # gradients flow
    lg = logits.clone().requires_grad_(True)
    L.token_logprobs(lg, tokens).sum().backward()
    torch.testing.assert_close(lg.grad, F.one_hot(tokens, 11).float() - logits.softmax(-1))
    # entropy of uniform logits is log V
    torch.testing.assert_close(L.entropy_from_logits(torch.zeros(1, 2, 11)), torch.full((1, 2), math.log(11)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_match_the_logits_and_their_gradients_block_by_block(monkeypatch, bias, temperature):
    """The head's log-probs and entropies without the [N, V] logits equal log_softmax / the entropy of the logits,
    and so do the gradients in hidden, weight and bias of each output alone and of both, over several blocks of
    rows (the last one short)."""
    monkeypatch.setattr(L, "HEAD_BLOCK_ELEMENTS", 4 * 13)  # blocks of 4 rows of a 13-token vocabulary
    g = torch.Generator().manual_seed(5)
    n, d, vocab = 11, 6, 13
    inputs = [torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(vocab, d, generator=g,
                                                                               dtype=torch.float64)]
    inputs.append(torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None)
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.randn(2, n, generator=g, dtype=torch.float64)

    def reference(hidden, weight, b):
        z = (hidden @ weight.T + (0 if b is None else b)) / temperature
        logp = z.log_softmax(-1)
        return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    for used in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        grads = []
        for fn in (lambda *a: L.linear_logprobs(*a, targets, temperature), reference):
            leaves = [None if x is None else x.clone().requires_grad_(True) for x in inputs]
            logprobs, entropy = fn(*leaves)
            grads.append((logprobs.detach(), entropy.detach()))
            (used[0] * (weights[0] * logprobs).sum() + used[1] * (weights[1] * entropy).sum()).backward()
            grads[-1] += tuple(x.grad for x in leaves if x is not None)
        for ours, ref in zip(*grads):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # a hand case: equal logits are the uniform distribution
    logprobs, entropy = L.linear_logprobs(torch.zeros(2, d), torch.randn(vocab, d), None, torch.tensor([0, 5]))
    torch.testing.assert_close(logprobs, torch.full((2,), -math.log(vocab)))
    torch.testing.assert_close(entropy, torch.full((2,), math.log(vocab)))
    # no gradient asked: nothing is kept for backward and nothing fails
    with torch.no_grad():
        assert L.linear_logprobs(*inputs, targets, temperature)[0].grad_fn is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_logprobs_match_log_softmax_and_its_gradients(temperature):
    """The fused log-probs and entropies of [N, V] logits equal log_softmax's and the entropy's, values and the
    gradient in the logits of each output alone and of both; an undifferentiated entropy carries no graph."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 13, generator=g, dtype=torch.float64) * 3
    logits[2] = 0.0  # a row of equal logits: the uniform distribution
    logits[4, 3] = 60.0  # a nearly one-hot row
    targets = torch.randint(0, 13, (9,), generator=g)
    targets[4] = 3
    weights = torch.randn(2, 9, generator=g, dtype=torch.float64)

    def reference(z):
        logp = (z / temperature).log_softmax(-1)
        return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    for used in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        results = []
        for fn in (lambda z: L.logits_logprobs(z, targets, temperature, True, True), reference):
            leaf = logits.clone().requires_grad_(True)
            logprobs, entropy = fn(leaf)
            (used[0] * (weights[0] * logprobs).sum() + used[1] * (weights[1] * entropy).sum()).backward()
            results.append((logprobs.detach(), entropy.detach(), leaf.grad))
        for ours, ref in zip(*results):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    if temperature == 1.0:
        torch.testing.assert_close(L.logits_logprobs(logits, targets)[0][2], torch.tensor(-math.log(13),
                                                                                          dtype=torch.float64))
    leaf = logits.clone().requires_grad_(True)
    logprobs, entropy = L.logits_logprobs(leaf, targets, temperature, with_entropy=True)
    assert not entropy.requires_grad and logprobs.requires_grad
    assert L.logits_logprobs(leaf, targets, temperature)[1] is None
    # backward turns the kept probabilities into the gradient in place: a second backward through the same graph
    # is refused, never answered with a wrong gradient
    logprobs, _ = L.logits_logprobs(leaf, targets, temperature)
    logprobs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        logprobs.sum().backward()
    # float32 logits (bf16 too) give float32 results, equal to the per-row reference
    half = logits.to(torch.bfloat16)
    torch.testing.assert_close(L.logits_logprobs(half, targets)[0],
                               L.token_logprobs(half[None], targets[None])[0], rtol=1e-5, atol=1e-5)
    assert L.logits_logprobs(half, targets)[0].dtype == torch.float32


def test_linear_logprobs_under_bf16_autocast_stay_float32_and_close():
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(17, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 17, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = L.linear_logprobs(hidden, weight, None, targets)
    logprobs.sum().backward()
    assert logprobs.dtype == torch.float32 and weight.grad.dtype == torch.float32
    reference = weight.detach().clone().requires_grad_(True)
    z = (hidden.bfloat16() @ reference.bfloat16().T).float()
    z.log_softmax(-1).gather(1, targets[:, None]).sum().backward()
    torch.testing.assert_close(logprobs, z.detach().log_softmax(-1).gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(weight.grad, reference.grad, atol=0.05, rtol=0.02)


def test_lm_loss_sum_matches_cross_entropy_and_accumulates_exactly():
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 8, 13
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[2, 5:] = -100  # padding
    labels[3, :] = -100  # nothing counts in this row
    loss_sum, n = L.lm_loss_sum(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    n_ref = sum(1 for row in labels.tolist() for v in row[1:] if v != -100)
    assert int(n) == n_ref
    assert (loss_sum / n).item() == pytest.approx(ref.item(), rel=1e-6)
    # reference by loops
    tot = 0.0
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                row = logits[b, t].tolist()
                tot += math.log(sum(math.exp(v) for v in row)) - row[y]
    assert loss_sum.item() == pytest.approx(tot, rel=1e-6)
    # two micro-batches of different token counts give exactly the big-batch mean
    s1, n1 = L.lm_loss_sum(logits[:1], labels[:1])
    s2, n2 = L.lm_loss_sum(logits[1:], labels[1:])
    assert ((s1 + s2) / (n1 + n2)).item() == pytest.approx(ref.item(), rel=1e-9)
    # ... while averaging the two micro-batches' means does not
    assert ((s1 / n1 + s2 / n2) / 2).item() != pytest.approx(ref.item(), rel=1e-6)
    assert L.lm_loss_sum(logits[3:], labels[3:])[1].item() == 0
    # custom ignore index; bf16 logits computed in float32
    lab0 = torch.where(labels == -100, torch.zeros_like(labels), labels)
    assert L.lm_loss_sum(logits, lab0, ignore_index=0)[1].item() == sum(1 for r in lab0.tolist() for v in r[1:] if v)
    assert L.lm_loss_sum(logits.bfloat16(), labels)[0].dtype == torch.float32


# ----------------------------------------------------------------------------- reward model


def test_bradley_terry_loss():
    rc = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    rr = torch.tensor([1.0, 0.5, 0.5, -4.0], dtype=torch.float64)

    def ref(d, eps=0.0):
        ls = lambda z: -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))
        return -(1 - eps) * ls(d) - eps * ls(-d)

    ds = [c - r for c, r in zip(rc.tolist(), rr.tolist())]
    none = L.bradley_terry_loss(rc, rr, reduction="none")
    assert none.tolist() == pytest.approx([ref(d) for d in ds])
    assert L.bradley_terry_loss(rc, rr).item() == pytest.approx(_mean([ref(d) for d in ds]))
    assert L.bradley_terry_loss(rc, rr, reduction="sum").item() == pytest.approx(sum(ref(d) for d in ds))
    margin = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    got = L.bradley_terry_loss(rc, rr, margin=margin, reduction="none")
    assert got.tolist() == pytest.approx([ref(d - m) for d, m in zip(ds, margin.tolist())])
    by_one = L.bradley_terry_loss(rc, rr, margin=1.0, reduction="none")
    assert by_one.tolist() == pytest.approx([ref(d - 1) for d in ds])
    # a positive margin demands a larger gap: loss goes up
    assert torch.all(got[margin > 0] > none[margin > 0])
    got = L.bradley_terry_loss(rc, rr, label_smoothing=0.1, reduction="none")
    assert got.tolist() == pytest.approx([ref(d, 0.1) for d in ds])
    # with smoothing the loss is minimised at a finite gap: log((1-e)/e)
    d = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    best = d[L.bradley_terry_loss(d, torch.zeros_like(d), label_smoothing=0.1, reduction="none").argmin()]
    assert best.item() == pytest.approx(math.log(0.9 / 0.1), abs=1e-3)
    # stable for huge gaps
    assert L.bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0])).item() == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        L.bradley_terry_loss(rc, rr, reduction="avg")


# ----------------------------------------------------------------------------- KL


def test_kl_estimator_values():
    g = torch.Generator().manual_seed(4)
    lp, ref = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    k1, k2, k3 = (L.kl_penalty(lp, ref, e) for e in ("k1", "k2", "k3"))
    for b in range(3):
        for t in range(6):
            lr = lp[b, t].item() - ref[b, t].item()
            assert k1[b, t].item() == pytest.approx(lr)
            assert k2[b, t].item() == pytest.approx(0.5 * lr * lr)
            assert k3[b, t].item() == pytest.approx(math.exp(-lr) - 1 + lr)
    assert torch.all(k3 >= 0) and torch.all(k2 >= 0)
    assert torch.all(L.kl_penalty(lp, lp, "k3") == 0)
    with pytest.raises(ValueError):
        L.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimates_are_clamped(estimator):
    """One token the policy made far less likely than the reference (log-ratio -15) must not give an unbounded
    penalty: unclamped, k3 is e^15 ≈ 3.3e6 and its reward would swamp every whitened advantage of the batch."""
    lp = torch.tensor([[-15.0, -1.0, 0.5, 30.0, -200.0]], dtype=torch.float64)
    ref = torch.zeros_like(lp)
    kl = L.kl_penalty(lp, ref, estimator)
    assert torch.isfinite(kl).all() and kl.abs().max() <= 10.0
    log_r = lp[0, 1:3]  # small log-ratios pass untouched
    expected = {"k1": log_r, "k2": 0.5 * log_r**2, "k3": torch.expm1(-log_r) + log_r}[estimator]
    torch.testing.assert_close(kl[0, 1:3], expected)
    unclamped = {"k1": -15.0, "k2": 112.5, "k3": math.exp(15.0) - 1 - 15.0}[estimator]  # clamp 0: off
    assert L.kl_penalty(lp, ref, estimator, clamp=0.0)[0, 0].item() == pytest.approx(unclamped)
    rewards, _ = L.per_token_rewards(torch.tensor([1.0], dtype=torch.float64), lp, ref, torch.ones_like(lp), 0.1,
                                     estimator)
    assert rewards.abs().max() <= 0.1 * 10.0 + 1.0


def test_kl_estimators_converge_to_analytic_kl():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.25, 0.25, 0.25, 0.25]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    g = torch.Generator().manual_seed(5)
    x = torch.multinomial(torch.tensor(p, dtype=torch.float64), 400_000, replacement=True, generator=g)
    lp = torch.tensor(p, dtype=torch.float64).log()[x]
    lq = torch.tensor(q, dtype=torch.float64).log()[x]
    assert L.kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(kl, rel=0.01)
    assert L.kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(kl, rel=0.01)


def test_per_token_rewards():
    g = torch.Generator().manual_seed(6)
    B, T = 4, 6
    lp, ref = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _padded_mask([6, 3, 0, 2], T, offsets=[0, 1, 0, 4])
    score = torch.tensor([1.0, -2.0, 5.0, 0.5], dtype=torch.float64)
    for est in ("k1", "k3"):
        rewards, kl = L.per_token_rewards(score, lp, ref, mask, kl_coef=0.1, estimator=est)
        for b in range(B):
            counted = [t for t in range(T) if mask[b, t]]
            for t in range(T):
                lr = lp[b, t].item() - ref[b, t].item()
                k = (lr if est == "k1" else math.exp(-lr) - 1 + lr) if t in counted else 0.0
                expect = -0.1 * k + (score[b].item() if counted and t == counted[-1] else 0.0)
                assert kl[b, t].item() == pytest.approx(k)
                assert rewards[b, t].item() == pytest.approx(expect)
    assert torch.all(rewards[2] == 0)  # a row with no tokens gets no score
    assert L.last_token_index(mask).tolist() == [5, 3, -1, 5]


# ----------------------------------------------------------------------------- PPO losses


def test_clipped_policy_loss_hand_cases():
    eps = 0.2
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 0.9]
    advs = [1.0, -1.0, 1.0, -1.0, 2.0, -3.0]
    # A>0,r>1+e: clipped (flat) | A<0,r>1+e: unclipped | A>0,r<1-e: unclipped | A<0,r<1-e: clipped | inside
    expected = [-1.2, 1.5, -0.5, 0.8, -2.2, 2.7]
    expect_grad_zero = [True, False, False, True, False, False]
    old = torch.zeros(1, 6, dtype=torch.float64)
    lp = torch.tensor([ratios], dtype=torch.float64).log().requires_grad_(True)
    A = torch.tensor([advs], dtype=torch.float64)
    mask = torch.ones(1, 6)
    loss_none = []
    for i in range(6):
        m = torch.zeros(1, 6)
        m[0, i] = 1
        loss, _ = L.clipped_policy_loss(lp, old, A, m, eps)
        loss_none.append(loss.item())
    assert loss_none == pytest.approx(expected)
    loss, stats = L.clipped_policy_loss(lp, old, A, mask, eps)
    assert loss.item() == pytest.approx(_mean(expected))
    loss.backward()
    for i in range(6):
        if expect_grad_zero[i]:
            assert lp.grad[0, i].item() == 0.0
        else:  # d(-A r)/d logp = -A r / n
            assert lp.grad[0, i].item() == pytest.approx(-advs[i] * ratios[i] / 6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    assert stats["approx_kl"].item() == pytest.approx(_mean([(r - 1) - math.log(r) for r in ratios]))
    assert stats["n_tokens"].item() == 6
    # sign of A: raising the probability of a positive-advantage token lowers the loss
    lp2 = torch.zeros(1, 1, requires_grad=True)
    L.clipped_policy_loss(lp2, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), eps)[0].backward()
    assert lp2.grad.item() < 0


def test_clipped_policy_loss_random_and_accumulation():
    g = torch.Generator().manual_seed(7)
    B, T, eps = 4, 7, 0.2
    lp = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _padded_mask([7, 2, 5, 1], T)
    ref_terms, clipped = [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = math.exp(lp[b, t].item() - old[b, t].item())
                a = A[b, t].item()
                u, c = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
                ref_terms.append(max(u, c))
                clipped.append(1.0 if c > u else 0.0)
    loss, stats = L.clipped_policy_loss(lp, old, A, mask, eps)
    assert loss.item() == pytest.approx(_mean(ref_terms))
    assert stats["clipfrac"].item() == pytest.approx(_mean(clipped))
    s1, st1 = L.clipped_policy_loss(lp[:1], old[:1], A[:1], mask[:1], eps, reduction="sum")
    s2, st2 = L.clipped_policy_loss(lp[1:], old[1:], A[1:], mask[1:], eps, reduction="sum")
    assert ((s1 + s2) / (st1["n_tokens"] + st2["n_tokens"])).item() == pytest.approx(loss.item(), rel=1e-12)


def test_clipped_value_loss():
    eps = 0.2
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[2.0, 2.0, 1.1, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[3.0, 0.0, 2.0, -1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # 0: v jumped past +eps towards R (clipped branch, no gradient); 1: v moved away from R
    # (unclipped); 2: inside the clip range; 3: v jumped past -eps towards R (clipped); 4: padding
    terms, clip_active = [], []
    for v, vo, R in zip(values[0, :4].tolist(), old[0, :4].tolist(), returns[0, :4].tolist()):
        vc = vo + min(max(v - vo, -eps), eps)
        terms.append(0.5 * max((v - R) ** 2, (vc - R) ** 2))
        clip_active.append(1.0 if (vc - R) ** 2 > (v - R) ** 2 else 0.0)
    assert clip_active == [1.0, 0.0, 0.0, 1.0]
    loss, stats = L.clipped_value_loss(values, old, returns, mask, eps)
    assert loss.item() == pytest.approx(_mean(terms))
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, (2.0 - 0.0) / 4, (1.1 - 2.0) / 4, 0.0, 0.0])
    assert stats["n_tokens"].item() == 4
    s, st = L.clipped_value_loss(values, old, returns, mask, eps, reduction="sum")
    assert s.item() == pytest.approx(sum(terms)) and st["n_tokens"].item() == 4


def test_running_moments_matches_concatenation():
    g = torch.Generator().manual_seed(9)
    batches = [3.0 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64) for n in (1, 7, 64, 2, 33)]
    rm = L.RunningMoments()
    for x in batches:
        bm, bs = rm.update(x)
        assert bm == pytest.approx(_mean(x.tolist()))
        if x.numel() > 1:
            assert bs == pytest.approx(math.sqrt(_var(x.tolist())))
    allx = [v for x in batches for v in x.tolist()]
    assert rm.count == len(allx)
    assert rm.mean == pytest.approx(_mean(allx), rel=1e-12)
    assert rm.var == pytest.approx(_var(allx), rel=1e-12)
    assert rm.std == pytest.approx(math.sqrt(_var(allx)), rel=1e-12)
    # masked update and an empty batch
    rm2 = L.RunningMoments()
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    rm2.update(x, mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    rm2.update(torch.tensor([]))
    assert (rm2.count, rm2.mean, rm2.var) == (3.0, pytest.approx(2.0), pytest.approx(1.0))
    # state dict round trip
    rm3 = L.RunningMoments()
    rm3.load_state_dict(rm.state_dict())
    assert rm3.state_dict() == rm.state_dict()
    extra = torch.randn(5, generator=g, dtype=torch.float64)
    rm.update(extra)
    rm3.update(extra)
    assert rm3.state_dict() == rm.state_dict()


def test_running_moments_normalize_and_clip():
    rm = L.RunningMoments()
    x = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.equal(rm.normalize(x), x)  # no statistics yet: identity
    rm.update(x)  # mean 2, unbiased std 2
    y = torch.tensor([-10.0, 2.0, 3.0, 20.0], dtype=torch.float64)
    assert rm.normalize(y).tolist() == pytest.approx([-6.0, 0.0, 0.5, 9.0])
    assert rm.normalize(y, clip=5.0).tolist() == pytest.approx([-5.0, 0.0, 0.5, 5.0])
    assert rm.normalize(y, shift_mean=False).tolist() == pytest.approx([-5.0, 1.0, 1.5, 10.0])


# ----------------------------------------------------------------------------- KL controllers


def test_kl_controllers():
    ctl = L.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    coef, seq = 0.2, [(12.0, 256), (6.6, 256), (3.0, 512), (5.4, 128), (0.0, 1000)]
    for kl, n in seq:
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        coef *= 1 + err * n / 10000
        assert ctl.update(kl, n) == pytest.approx(coef)
        assert ctl.value == pytest.approx(coef)
    # hand check of the first step: err clipped to 0.2 -> 0.2 * (1 + 0.2 * 256 / 10000)
    assert L.AdaptiveKLController(0.2, 6.0, 10000).update(12.0, 256) == pytest.approx(0.2 * 1.00512)
    ctl2 = L.AdaptiveKLController(1.0, 1.0, 1.0)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.value == ctl.value and ctl2.target == 6.0 and ctl2.horizon == 10000
    assert ctl2.update(7.0, 100) == ctl.update(7.0, 100)
    fixed = L.FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    f2 = L.FixedKLController(1.0)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.05
    with pytest.raises(ValueError):
        L.AdaptiveKLController(0.1, 0.0, 100)


def test_asymmetric_clip_lets_unlikely_good_tokens_rise_further():
    """DAPO clip-higher: with eps_high > eps the ratio of a positive-advantage token is clipped at 1 + eps_high."""
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[1.25, 1.25, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    symmetric, _ = L.clipped_policy_loss(logprobs, old, adv, mask, 0.2, reduction="none")
    higher, _ = L.clipped_policy_loss(logprobs, old, adv, mask, 0.2, reduction="none", clip_eps_high=0.28)
    # token 0: A > 0, r = 1.25 — clipped at 1.2 symmetrically, not at 1.28
    assert symmetric[0, 0].item() == pytest.approx(-1.2) and higher[0, 0].item() == pytest.approx(-1.25)
    # token 1: A < 0, r = 1.25 — the unclipped branch (-A r) is the max either way
    assert symmetric[0, 1].item() == higher[0, 1].item() == pytest.approx(1.25)
    # token 2: A < 0, r = 0.7 below 1 - eps: clipped at 0.8 in both (the low side is eps)
    assert symmetric[0, 2].item() == higher[0, 2].item() == pytest.approx(0.8)
    higher.sum().backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-1.25, 1.25, 0.0])


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_loss_aggregation_matches_reference_and_accumulates(mode):
    g = torch.Generator().manual_seed(5)
    per_token = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lengths = [6, 1, 3, 4]
    mask = _padded_mask(lengths, 6)
    rows = [[float(per_token[b, t]) for t in range(n)] for b, n in enumerate(lengths)]
    if mode == "token_mean":
        expected = sum(sum(r) for r in rows) / sum(lengths)
    elif mode == "seq_mean_token_mean":
        expected = sum(sum(r) / len(r) for r in rows) / len(rows)
    else:
        expected = sum(sum(r) for r in rows) / (len(rows) * 6)
    denominator = L.aggregation_denominator(mode, sum(lengths), len(lengths), 6)
    whole = L.aggregate(torch.where(mask.bool(), per_token, 0.0), mask, mode) / denominator
    assert whole.item() == pytest.approx(expected)
    # micro-batches of one and three rows, each over the same global denominator, add up to the whole
    parts = (L.aggregate(per_token[:1], mask[:1], mode) + L.aggregate(per_token[1:], mask[1:], mode)) / denominator
    assert parts.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        L.aggregate(per_token, mask, "mean")


# ----------------------------------------------------------------------------- DPO family


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _reference_preference_loss(kind, c, r, rc, rr, lc, lr, beta, eps, gamma):
    """(loss, d loss / d chosen) of one pair, in plain floats."""
    h = beta * ((c - rc) - (r - rr))
    if kind == "sigmoid":
        return (-(1 - eps) * math.log(_sig(h)) - eps * math.log(_sig(-h)),
                beta * (-(1 - eps) * _sig(-h) + eps * _sig(h)))
    if kind == "robust":
        return ((-(1 - eps) * math.log(_sig(h)) + eps * math.log(_sig(-h))) / (1 - 2 * eps),
                beta * (-(1 - eps) * _sig(-h) - eps * _sig(h)) / (1 - 2 * eps))
    if kind == "hinge":
        return max(0.0, 1 - h), (-beta if 1 - h > 0 else 0.0)
    if kind == "ipo":
        delta = (c / lc - rc / lc) - (r / lr - rr / lr)
        return (delta - 1 / (2 * beta)) ** 2, 2 * (delta - 1 / (2 * beta)) / lc
    if kind == "simpo":
        z = beta * (c / lc - r / lr) - gamma
        return (-(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z)),
                beta / lc * (-(1 - eps) * _sig(-z) + eps * _sig(z)))
    # orpo: log odds of the length-averaged probability
    ac, ar = c / lc, r / lr
    z = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
    return -beta * math.log(_sig(z)), -beta * _sig(-z) / (1 - math.exp(ac)) / lc


@pytest.mark.parametrize("kind, eps", [(kind, 0.0) for kind in L.DPO_LOSSES]
                         + [(kind, 0.2) for kind in ("sigmoid", "robust", "simpo")])
def test_preference_losses_and_gradients_match_the_reference(kind, eps):
    """Each loss and its gradient with respect to the chosen reply's log-prob, pair by pair, against the formulas
    written out in plain floats — at pairs the policy prefers, disprefers, and is indifferent to."""
    chosen = torch.tensor([-12.0, -30.5, -8.0, -20.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-15.0, -22.0, -8.0, -41.0], dtype=torch.float64)
    ref_c = torch.tensor([-13.0, -29.0, -8.5, -22.0], dtype=torch.float64)
    ref_r = torch.tensor([-14.0, -23.5, -8.5, -39.0], dtype=torch.float64)
    len_c, len_r = torch.tensor([6.0, 11.0, 4.0, 9.0]), torch.tensor([7.0, 9.0, 4.0, 15.0])
    beta, gamma = 0.5, 0.3
    loss, margin = L.dpo_loss(kind, chosen, rejected, ref_c, ref_r, beta, chosen_len=len_c, rejected_len=len_r,
                              label_smoothing=eps, gamma=gamma)
    loss.sum().backward()
    for i in range(4):
        value, grad = _reference_preference_loss(kind, chosen[i].item(), rejected[i].item(), ref_c[i].item(),
                                                 ref_r[i].item(), len_c[i].item(), len_r[i].item(), beta, eps, gamma)
        assert loss[i].item() == pytest.approx(value, rel=1e-5, abs=1e-7), (kind, i)
        assert chosen.grad[i].item() == pytest.approx(grad, rel=1e-5, abs=1e-7), (kind, i)
    assert torch.isfinite(margin).all() and margin.shape == (4,)


def test_kto_loss_and_gradient_match_the_reference():
    """KTO's per-reply loss and its gradient with respect to the policy's log-prob against the formula in plain
    floats, for desirable and undesirable replies on both sides of the reference point; no gradient reaches z0."""
    logps = torch.tensor([-12.0, -30.5, -8.0, -20.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-13.0, -29.0, -8.5, -22.0, -5.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False, True])
    z0 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    beta, w_d, w_u = 0.5, 1.3, 0.7
    loss, reward = L.kto_loss(logps, ref, desirable, z0, beta, w_d, w_u)
    loss.sum().backward()
    for i in range(5):
        r = logps[i].item() - ref[i].item()
        if desirable[i]:  # d/dr (1 - σ(β(r - z0))) = -β σ(x) σ(-x), x = β(r - z0)
            x = beta * (r - 0.4)
            value, grad = w_d * (1 - _sig(x)), -w_d * beta * _sig(x) * _sig(-x)
        else:  # d/dr (1 - σ(β(z0 - r))) = +β σ(x) σ(-x), x = β(z0 - r)
            x = beta * (0.4 - r)
            value, grad = w_u * (1 - _sig(x)), w_u * beta * _sig(x) * _sig(-x)
        assert loss[i].item() == pytest.approx(value, rel=1e-6), i
        assert logps.grad[i].item() == pytest.approx(grad, rel=1e-6), i
        assert reward[i].item() == pytest.approx(r)
    assert z0.grad is None
    # the reference point: the mean mismatched-pair log-ratio, never below zero, without gradient
    point = L.kto_reference_point(torch.tensor(-30.0), torch.tensor(-36.0), 4)
    assert point.item() == pytest.approx(1.5) and not point.requires_grad
    assert L.kto_reference_point(torch.tensor(-40.0), torch.tensor(-36.0), 4).item() == 0.0


def test_info_nce_and_gradient_match_the_reference():
    """InfoNCE of two views against -log softmax of the cosine similarities written out in plain floats, with the
    gradient by central differences."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    tau = 0.5

    def reference(a_rows, b_rows):
        def cos(u, v):
            return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
        out = []
        for i, u in enumerate(a_rows):
            logits = [cos(u, v) / tau for v in b_rows]
            out.append(-(logits[i] - math.log(sum(math.exp(z) for z in logits))))
        return out

    a_param = a.clone().requires_grad_(True)
    loss = L.info_nce(a_param, b, tau)
    assert loss.tolist() == pytest.approx(reference(a.tolist(), b.tolist()), rel=1e-5)
    loss.sum().backward()
    for i, j in ((0, 0), (2, 1), (3, 2)):
        numeric = central_difference(lambda x: sum(reference(x.tolist(), b.tolist())), a, (i, j))
        assert a_param.grad[i, j].item() == pytest.approx(numeric, rel=1e-4, abs=1e-6)
    assert L.info_nce(a[:1], b[:1], tau).item() == pytest.approx(0.0, abs=1e-7)  # no negative, nothing to learn


def _plain_sinkhorn(scores, eps, iterations):
    """SwAV's Sinkhorn–Knopp in plain floats: Q = exp(S/ε)ᵀ [K][N], normalised to total 1, then alternately each
    prototype row to 1/K and each sample column to 1/N; returned ×N as [N][K]."""
    n, k = len(scores), len(scores[0])
    top = max(max(row) for row in scores)
    q = [[math.exp((scores[i][c] - top) / eps) for i in range(n)] for c in range(k)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / (sum(row) * k) for x in row] for row in q]
        columns = [sum(q[c][i] for c in range(k)) for i in range(n)]
        q = [[q[c][i] / (columns[i] * n) for i in range(n)] for c in range(k)]
    return [[q[c][i] * n for c in range(k)] for i in range(n)]


def test_sinkhorn_codes_and_swav_loss_match_the_reference_with_gradients():
    """SwAV (Caron et al. 2020) as Part II uses it: codes by Sinkhorn–Knopp (rows sum to 1, prototypes share the
    batch), each view predicting the other's codes; value and gradient (through the predictions only, never the
    codes) against plain floats and central differences; with one prototype the loss is 0."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    b = a + 0.4 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    c = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    tau, eps = 0.5, 0.3

    def cosines(rows, protos):
        def cos(u, v):
            return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
        return [[cos(u, v) for v in protos] for u in rows]

    def reference(a_rows, b_rows, protos, codes_of_a=None):
        """The per-row loss; the codes of view a come from ``codes_of_a`` (default: a itself) — targets, which the
        gradient does not differentiate."""
        sa, sb = cosines(a_rows, protos), cosines(b_rows, protos)
        qa, qb = _plain_sinkhorn(cosines(codes_of_a or a_rows, protos), eps, 3), _plain_sinkhorn(sb, eps, 3)

        def log_softmax(row):
            top = max(z / tau for z in row)
            norm = top + math.log(sum(math.exp(z / tau - top) for z in row))
            return [z / tau - norm for z in row]
        return [-0.5 * (sum(q * l for q, l in zip(qb[i], log_softmax(sa[i])))
                        + sum(q * l for q, l in zip(qa[i], log_softmax(sb[i])))) for i in range(len(a_rows))]

    codes = L.sinkhorn_codes(a @ c.T, eps, 3)
    assert codes.tolist() == [pytest.approx(row, rel=1e-9) for row in _plain_sinkhorn((a @ c.T).tolist(), eps, 3)]
    assert codes.sum(1).tolist() == pytest.approx([1.0] * 6)
    balanced = L.sinkhorn_codes(a @ c.T, eps, 200)  # the iterations converge to the equal partition: N/K each
    assert balanced.sum(0).tolist() == pytest.approx([2.0] * 3, rel=1e-6)

    a_param = a.clone().requires_grad_(True)
    loss = L.swav_loss(a_param, b, c, tau, eps)
    assert loss.tolist() == pytest.approx(reference(a.tolist(), b.tolist(), c.tolist()), rel=1e-9)
    loss.sum().backward()
    for i, j in ((0, 0), (3, 2), (5, 3)):
        numeric = central_difference(lambda x: sum(reference(x.tolist(), b.tolist(), c.tolist(), a.tolist())), a,
                                     (i, j))
        assert a_param.grad[i, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert L.swav_loss(a, b, c[:1], tau, eps).abs().max().item() < 1e-12  # one cluster: nothing to predict


def test_metarm_difference_objective_matches_the_reference():
    """J: per group the mean over its pairs of σ(|r_i − r_j|), averaged over groups — unequal group sizes, a group
    of equal rewards (σ(0) = ½, and the gradient there is 0), and the gradient against central differences."""
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.3, 0.3, 1.0, -0.2, 0.7, 0.1], dtype=torch.float64)
    sizes = [3, 2, 4]

    def reference(values):
        out, start = [], 0
        for size in sizes:
            group = values[start:start + size]
            start += size
            pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
            out.append(sum(1 / (1 + math.exp(-abs(group[i] - group[j]))) for i, j in pairs) / len(pairs))
        return sum(out) / len(out)

    param = rewards.clone().requires_grad_(True)
    objective = L.reward_difference_objective(param, sizes)
    assert objective.item() == pytest.approx(reference(rewards.tolist()), rel=1e-12)
    objective.backward()
    for k in (0, 2, 5, 8):
        up, down = rewards.tolist(), rewards.tolist()
        up[k] += 1e-6
        down[k] -= 1e-6
        assert param.grad[k].item() == pytest.approx((reference(up) - reference(down)) / 2e-6, rel=1e-5)
    assert param.grad[3].item() == pytest.approx(0.0) and param.grad[4].item() == pytest.approx(0.0)
    assert L.reward_difference_objective(torch.zeros(2), [2]).item() == pytest.approx(0.5)


def test_preference_losses_refuse_what_they_cannot_compute():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss"):
        L.dpo_loss("nope", x, x, x, x, 0.1)
    with pytest.raises(ValueError, match="reference"):
        L.dpo_loss("sigmoid", x, x, None, None, 0.1)
    with pytest.raises(ValueError, match="lengths"):
        L.dpo_loss("simpo", x, x, None, None, 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss("sigmoid", x, x, x, x, 0.1, label_smoothing=0.5)
