"""Reward model: learns a preference, reports held-out accuracy, saves a scorer that plain transformers loads and
that scores exactly as during training; the β·LM term is each pair's mean token loss, so gradient accumulation
gives the one-batch run with it on; the held-out pairs are written out; trains on the real HH-RLHF file; 2
processes give the 1-process run."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from moss_rlhf.data.formats import load_preferences
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import reward
from moss_rlhf.stages.reward import RewardConfig, score_pairs
from moss_rlhf.tokenizer import load_tokenizer
from tests.conftest import HH_FILE, NAMES, PLACES, run_in_processes, write_jsonl


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Chosen: a polite, on-topic answer. Rejected: a rude one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        rows.append({"prompt": f"Where did {name} go?", "chosen": f"{name} went to {place}.",
                     "rejected": f"No. {rng.choice(NAMES)} {rng.choice(NAMES)} said no.", "margin": 0.5})
    return rows


def config(tmp_path, model_dir, data, **overrides) -> RewardConfig:
    values = dict(out=str(tmp_path / "rm"), model=str(model_dir), data=[str(data)], max_steps=30, batch_size=8,
                  lr=3e-3, warmup_steps=2, eval_every=15, log_every=1, save_every=0, progress=False, device="cpu",
                  max_len=64)
    values.update(overrides)
    return RewardConfig(**values)


def test_reward_model_learns_the_preference_and_loads_in_transformers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(240))
    result = reward.run(config(tmp_path, tiny_model_dir, data))
    rows = read_metrics(tmp_path / "rm")
    # a zero-initialised head scores every reply 0, so the first loss is -log σ(0 - margin) = log(1 + e^0.5)
    assert rows[0]["train/loss"] == pytest.approx(0.9741, abs=0.05)
    assert result.eval_metrics["eval/accuracy"] > 0.9
    assert result.eval_metrics["eval/reward_gap"] > 0

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    tokenizer = load_tokenizer(str(tmp_path / "rm" / "model"))
    prefs = load_preferences(data)[:16]
    chosen, rejected = score_pairs(loaded, tokenizer, prefs, max_len=64)
    assert (chosen > rejected).float().mean() > 0.9
    # transformers' own pooling (last non-pad token) agrees with ours
    from moss_rlhf.stages.reward import pair_examples

    ex = pair_examples(tokenizer, prefs[0], 64)[0]
    logits = loaded(input_ids=torch.tensor([ex.input_ids])).logits
    assert float(logits[0, 0].detach()) == pytest.approx(float(chosen[0]), abs=1e-4)


def test_label_smoothing_margin_and_lm_loss_options_train(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    result = reward.run(config(tmp_path, tiny_model_dir, data, label_smoothing=0.1, lm_coef=0.5, max_steps=12,
                               eval_every=12))
    first = read_metrics(tmp_path / "rm")[0]["train/loss"]
    assert result.train_loss < first


def varied_rows(n: int) -> list[dict]:
    """Chosen replies of very different lengths: a token mean pooled over a micro-batch then differs from the mean
    of each pair's own token mean."""
    return [{**row, "chosen": " ".join([row["chosen"]] * (1 + i % 5))} for i, row in enumerate(preference_rows(n))]


def test_lm_term_is_each_pairs_mean_token_loss(tmp_path, tiny_model_dir):
    from moss_rlhf.losses import bradley_terry_loss, lm_loss_sum
    from moss_rlhf.models import load_causal_lm, load_scorer
    from moss_rlhf.stages.reward import RewardLoss, pair_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prefs = [p for p in load_preferences(write_jsonl(tmp_path / "p.jsonl", varied_rows(3)))]
    cfg = config(tmp_path, tiny_model_dir, tmp_path / "p.jsonl", lm_coef=0.7, use_margin=False)
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    batch = pair_data(tokenizer, prefs, cfg).batch([0, 1, 2])
    with torch.no_grad():
        loss = RewardLoss(cfg, scorer.get_input_embeddings().weight)(scorer, batch)  # tied: the embeddings
        chosen, rejected, _, _ = RewardLoss(cfg, None).forward(scorer, batch)
        lm = load_causal_lm(str(tiny_model_dir))
        per_pair = []
        for i in range(3):
            labels = batch["labels"][i:i + 1]
            logits = lm(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
            total, count = lm_loss_sum(logits, labels)
            per_pair.append(float(total / count))
    assert len({int((batch["labels"][i] != -100).sum()) for i in range(3)}) == 3  # unequal reply lengths
    expected = float(bradley_terry_loss(chosen, rejected, reduction="sum")) + 0.7 * sum(per_pair)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_is_exact_with_the_lm_term(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", varied_rows(80))
    runs = {}
    for name, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        reward.run(config(tmp_path / name, tiny_model_dir, data, batch_size=batch, grad_accum=accum, lm_coef=0.5,
                          max_steps=3, eval_every=0))
        runs[name] = [r["train/loss"] for r in read_metrics(tmp_path / name / "rm")]
    assert runs["8x1"] == pytest.approx(runs["2x4"], abs=1e-5)


def test_missing_data_is_a_clear_error(tmp_path, tiny_model_dir):
    from moss_rlhf.cli import main

    assert main(["reward", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data/hh-rlhf is not present (it is in CI)")
def test_trains_on_the_real_hh_rlhf_file(tmp_path, tiny_model_dir):
    result = reward.run(config(tmp_path, tiny_model_dir, HH_FILE, max_steps=20, eval_every=20, eval_fraction=0.05,
                               max_len=128))
    # the reported held-out accuracy is the saved model's accuracy on the pairs the stage wrote out as held out
    from moss_rlhf.models import load_scorer

    held_out = load_preferences(str(tmp_path / "rm" / "held_out.jsonl"))
    assert len(held_out) == round(0.05 * len(load_preferences(HH_FILE)))
    model_dir = str(tmp_path / "rm" / "model")
    scorer = load_scorer(model_dir)
    chosen, rejected = score_pairs(scorer, load_tokenizer(model_dir), held_out, max_len=128)
    accuracy = float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())
    assert result.eval_metrics["eval/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert scorer.score.weight.abs().sum() > 0  # the zero-initialised head was trained
    assert len(chosen.unique()) > len(held_out) // 2  # and it tells the replies apart


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    """2 processes × 4 pairs give the run of 1 process × 8 pairs: the scorer runs through DDP's forward (so the
    gradients are averaged) with the β·LM term on, and held-out metrics are reduced over processes."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    common = dict(max_steps=4, eval_every=2, lm_coef=0.1)
    reward.run(config(tmp_path / "single", tiny_model_dir, data, batch_size=8, **common))
    double = config(tmp_path / "double", tiny_model_dir, data, batch_size=4, **common)
    run_in_processes(reward.run, double)
    single_rows, double_rows = read_metrics(tmp_path / "single" / "rm"), read_metrics(tmp_path / "double" / "rm")
    assert [r["step"] for r in single_rows] == [r["step"] for r in double_rows]
    for a, b in zip(single_rows, double_rows):
        for key in ("train/loss", "eval/loss", "eval/accuracy", "eval/reward_gap"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_a_nonfinite_loss_stops_reward_training(tmp_path, tiny_model_dir):
    from moss_rlhf.config import NonFiniteError

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(60))
    with pytest.raises(NonFiniteError, match="reward: step"):
        reward.run(config(tmp_path, tiny_model_dir, data, lr=1e3, warmup_steps=0, max_steps=20, eval_every=0))
    assert not (tmp_path / "rm" / "model").exists()


def meta_rows(n_prompts: int, k: int, seed: int = 1) -> list[dict]:
    """Unlabelled replies of a "shifted policy": k per prompt, as `moss-rlhf generate --num-samples k` writes them."""
    rng = random.Random(seed)
    return [{"prompt": f"Where did {name} go?", "response": f"{name} went to {rng.choice(PLACES)}" + "!" * j}
            for name in NAMES[:n_prompts] for j in range(k)]


@pytest.fixture
def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def test_metarm_gradient_is_the_exact_meta_gradient(tmp_path, tiny_model_dir, math_attention):
    """MetaRM's loss is L(θ') at θ' = θ + η ∇J(θ) (J: the difference objective on the meta batch), and its gradient
    is d/dθ L(θ + η ∇J(θ)) — checked against plain second-order autograd through a
    float64 model (SDPA's math kernel, which has a double backward), each reply scored alone by
    transformers' own pooling, the Bradley–Terry loss written out."""
    from moss_rlhf.data.collate import reply_example
    from moss_rlhf.data.formats import load_sample_groups
    from moss_rlhf.losses import reward_difference_objective
    from moss_rlhf.models import load_scorer
    from moss_rlhf.stages.reward import RewardLoss, pair_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", preference_rows(3)))
    groups = load_sample_groups(write_jsonl(tmp_path / "meta.jsonl", meta_rows(2, 3)))
    cfg = RewardConfig(data=["x"], max_len=64, use_margin=False, meta_lr=0.5, meta_batch=2, meta_hvp_eps=1e-3)
    scorer = load_scorer(str(tiny_model_dir), tokenizer).double()
    torch.nn.init.normal_(scorer.score.weight, std=0.02, generator=torch.Generator().manual_seed(2))
    batch = pair_data(tokenizer, prefs, cfg, meta=groups).batch([0, 1, 2])
    assert batch["meta_sizes"].tolist() == [3, 3]
    value = RewardLoss(cfg, None)(scorer, batch)
    value.backward()
    names, params = zip(*[(n, p) for n, p in scorer.named_parameters() if p.requires_grad])
    got = [p.grad.clone() for p in params]

    def score(weights, conversation, reply):  # one unpadded row, scored by transformers at its last token
        ids = torch.tensor([reply_example(tokenizer, conversation, reply, 64).input_ids])
        return torch.func.functional_call(scorer, dict(zip(names, weights)), (), {"input_ids": ids}).logits[0, 0]

    objective = reward_difference_objective(torch.stack([score(params, g.prompt, r) for g in groups
                                                         for r in g.responses]), [3, 3])
    ascent = torch.autograd.grad(objective, params, create_graph=True)
    adapted = [p + 0.5 * g for p, g in zip(params, ascent)]
    loss = sum(-torch.nn.functional.logsigmoid(score(adapted, p.prompt, p.chosen) - score(adapted, p.prompt, p.rejected))
               for p in prefs)
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    first_order = torch.autograd.grad(loss, adapted)  # ∇L(θ') alone: what dropping the Hessian term would give
    assert float(value.detach()) == pytest.approx(float(loss.detach()), rel=1e-9)
    plain = torch.autograd.grad(sum(-torch.nn.functional.logsigmoid(score(params, p.prompt, p.chosen)
                                                                    - score(params, p.prompt, p.rejected))
                                    for p in prefs), params)

    def norm(tensors):
        return float(torch.sqrt(sum((t ** 2).sum() for t in tensors)))
    error, without_hessian, without_meta = (norm([a - b for a, b in zip(other, expected)]) / norm(expected)
                                            for other in (got, first_order, plain))
    # transformers' RMSNorm and rotary work in float32 even in a float64 model, which limits the finite difference
    # to ~1e-4; leaving out the Hessian term, or the meta step, is off by far more
    assert error < 5e-4 and without_hessian > 20 * error and without_meta > 0.5, (error, without_hessian,
                                                                                   without_meta)


def test_metarm_run_keeps_the_shifted_replies_apart_and_refuses_bad_meta_sets(tmp_path, tiny_model_dir):
    """`moss-rlhf reward --meta-data FILE` learns the preference, spreads the rewards of the meta set's replies wider
    than the same run without it, and a meta set with one reply per prompt is refused with its file and line."""
    from moss_rlhf.cli import main
    from moss_rlhf.data.formats import DataError, load_sample_groups
    from moss_rlhf.losses import reward_difference_objective
    from moss_rlhf.models import load_scorer
    from moss_rlhf.scoring import reward_model_scorer

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120))
    meta_file = write_jsonl(tmp_path / "meta.jsonl", meta_rows(6, 4))
    groups = load_sample_groups(meta_file)
    spread = {}
    for name, extra in (("plain", {}), ("metarm", {"meta_data": [str(meta_file)], "meta_lr": 0.5})):
        result = reward.run(config(tmp_path / name, tiny_model_dir, data, max_steps=15, eval_every=0, **extra))
        assert result.eval_metrics["eval/accuracy"] > 0.9
        model_dir = tmp_path / name / "rm" / "model"
        tokenizer = load_tokenizer(str(model_dir))
        scorer = load_scorer(str(model_dir), tokenizer)
        rewards = reward_model_scorer(scorer, tokenizer, max_len=64)([g.prompt for g in groups for _ in g.responses],
                                                                     [r for g in groups for r in g.responses])
        spread[name] = float(reward_difference_objective(torch.tensor(rewards), [len(g.responses) for g in groups]))
    assert spread["metarm"] > spread["plain"], spread
    bad = write_jsonl(tmp_path / "bad.jsonl", meta_rows(2, 2)[:3])
    with pytest.raises(DataError, match=r"bad.jsonl:3: response: 1 of 2 prompts have a single reply"):
        load_sample_groups(bad)
    assert main(["reward", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--meta-data", str(bad), "--no-progress"]) == 2


def _scorer_with_likelihood(model_dir, tokenizer, weight: float):
    from moss_rlhf.models import LIKELIHOOD_WEIGHT, load_scorer

    scorer = load_scorer(str(model_dir), tokenizer).eval()
    torch.nn.init.normal_(scorer.score.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    setattr(scorer.config, LIKELIHOOD_WEIGHT, weight)
    return scorer


def test_the_likelihood_term_scores_alike_in_training_evaluation_and_rollouts(tmp_path, tiny_model_dir):
    """score = head at the turn end + w × the reply's mean log-probability, against transformers' own forwards: the
    head through ``*ForSequenceClassification`` (last non-pad token), the log-probabilities through the causal LM's
    logits; then the same scores from the text scorer (left padding) and RL's packed rows (prompts shared or not)."""
    from moss_rlhf import packed_attention
    from moss_rlhf.data.collate import Example, left_pad, pad_examples
    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.packing import pack_sequences, prompt_sharing
    from moss_rlhf.rewards import reward_model_scores
    from moss_rlhf.sampling import Rollout
    from moss_rlhf.scoring import reward_model_scorer
    from moss_rlhf.stages.reward import pair_examples

    tokenizer = load_tokenizer(str(tiny_model_dir))
    # two prompts, two pairs each, replies of unequal lengths: the mean is per reply
    prefs = [p for p in load_preferences(write_jsonl(tmp_path / "p.jsonl", varied_rows(4)))]
    prefs = [prefs[0], dataclasses.replace(prefs[1], prompt=prefs[0].prompt), prefs[2],
             dataclasses.replace(prefs[3], prompt=prefs[2].prompt)]
    scorer = _scorer_with_likelihood(tiny_model_dir, tokenizer, 0.6)
    lm = load_causal_lm(str(tiny_model_dir)).eval()
    expected = []
    with torch.no_grad():
        for pref in prefs:
            for example in pair_examples(tokenizer, pref, 64):
                ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels)
                logprobs = torch.log_softmax(lm(input_ids=ids).logits[0, :-1].double(), -1)
                targets = labels[1:]
                reply = targets != -100
                mean = logprobs[reply].gather(1, targets[reply][:, None]).mean()
                expected.append(float(scorer(input_ids=ids).logits[0, 0]) + 0.6 * float(mean))
    expected = torch.tensor(expected).view(-1, 2)  # (chosen, rejected) per pair
    assert expected.std() > 0.1  # the scores differ: a wrong pooling cannot match by accident

    chosen, rejected = score_pairs(scorer, tokenizer, prefs, max_len=64)
    assert torch.stack([chosen, rejected], 1).double() == pytest.approx(expected, abs=1e-4)

    texts = reward_model_scorer(scorer, tokenizer, max_len=64, batch_size=3)(
        [p.prompt for p in prefs for _ in range(2)], [r for p in prefs for r in (p.chosen, p.rejected)])
    assert torch.tensor(texts).view(-1, 2).double() == pytest.approx(expected, abs=1e-4)

    # RL: prompt tokens, then the reply's up to its turn end, as the sampler leaves them
    examples = [e for p in prefs for e in pair_examples(tokenizer, p, 64)]
    starts = [next(i for i, label in enumerate(e.labels) if label != -100) for e in examples]
    prompt_ids, prompt_mask = left_pad([e.input_ids[:s] for e, s in zip(examples, starts)], tokenizer.pad_token_id)
    responses = pad_examples([Example(e.input_ids[s:], e.labels[s:]) for e, s in zip(examples, starts)],
                             tokenizer.pad_token_id)
    response_ids, response_mask = responses["input_ids"], responses["attention_mask"]
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.ones(len(examples), dtype=torch.bool),
                      torch.zeros(response_ids.shape))
    packed_attention.install(scorer)
    for share in (0, prompt_sharing([scorer])):
        rl = reward_model_scores(scorer, rollout, batch_size=8, share_prompts=share)
        assert rl.view(-1, 2).double() == pytest.approx(expected, abs=1e-4)
    shared = pack_sequences(rollout.sequences, rollout.attention_mask, response_ids.shape[1],
                            share_prompts=prompt_sharing([scorer]))
    assert shared.input_ids.shape[0] < len(examples) or shared.n_tokens < int(rollout.attention_mask.sum())


def test_the_likelihood_terms_gradient_is_the_reference_one(tmp_path, tiny_model_dir):
    """The Bradley–Terry loss through the likelihood term, values and every gradient, in float64, against the term
    written with a plain log-softmax over the backbone's hidden states and the tied embeddings."""
    from moss_rlhf.losses import bradley_terry_loss
    from moss_rlhf.stages.reward import RewardLoss, pair_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", varied_rows(3)))
    cfg = config(tmp_path, tiny_model_dir, tmp_path / "p.jsonl", use_margin=False)
    scorer = _scorer_with_likelihood(tiny_model_dir, tokenizer, 0.8).double()
    batch = pair_data(tokenizer, prefs, cfg).batch([0, 1, 2])
    ours = RewardLoss(cfg, None)(scorer, batch)
    grads = torch.autograd.grad(ours, list(scorer.parameters()))

    hidden = scorer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    head = scorer.score(hidden[torch.arange(6), last]).squeeze(-1)
    logprobs = torch.log_softmax(hidden[:, :-1] @ scorer.model.embed_tokens.weight.T, -1)
    targets = batch["labels"][:, 1:]
    reply = (targets != -100).double()
    picked = logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    rewards = head + 0.8 * (picked * reply).sum(1) / reply.sum(1)
    reference = bradley_terry_loss(rewards[:3], rewards[3:], reduction="sum")
    reference_grads = torch.autograd.grad(reference, list(scorer.parameters()))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-10)
    for ours_grad, reference_grad in zip(grads, reference_grads):
        assert torch.allclose(ours_grad, reference_grad, rtol=1e-8, atol=1e-12)
    assert (rewards - head).abs().min() > 0.1  # the term weighs in every reward, not only in a few


def test_the_likelihood_weight_is_saved_kept_and_refused_without_tied_embeddings(tmp_path, tiny_model_dir):
    import json

    from moss_rlhf.config import ConfigError
    from moss_rlhf.models import LIKELIHOOD_WEIGHT, build_causal_lm, load_scorer, save_model

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    reward.run(config(tmp_path / "a", tiny_model_dir, data, likelihood_weight=0.5, max_steps=2, eval_every=0))
    saved = tmp_path / "a" / "rm" / "model"
    assert json.loads((saved / "config.json").read_text())[LIKELIHOOD_WEIGHT] == 0.5
    tokenizer = load_tokenizer(str(saved))
    prefs = load_preferences(data)[:4]
    with_term = score_pairs(load_scorer(str(saved), tokenizer, trained=True), tokenizer, prefs, max_len=64)
    bare = load_scorer(str(saved), tokenizer, trained=True)
    setattr(bare.config, LIKELIHOOD_WEIGHT, 0.0)
    assert not torch.allclose(with_term[0], score_pairs(bare, tokenizer, prefs, max_len=64)[0])
    # continuing from it keeps its weight unless told otherwise
    reward.run(config(tmp_path / "b", saved, data, max_steps=1, eval_every=0))
    assert json.loads((tmp_path / "b" / "rm" / "model" / "config.json").read_text())[LIKELIHOOD_WEIGHT] == 0.5
    reward.run(config(tmp_path / "c", saved, data, max_steps=1, eval_every=0, likelihood_weight=0.0))
    assert json.loads((tmp_path / "c" / "rm" / "model" / "config.json").read_text())[LIKELIHOOD_WEIGHT] == 0.0

    untied = build_causal_lm("tiny", tokenizer, seed=0)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    save_model(untied, tokenizer, tmp_path / "untied")
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        reward.run(config(tmp_path / "d", tmp_path / "untied", data, likelihood_weight=1.0, max_steps=1))


def _sharded_likelihood_scores(model_dir: str, out: str) -> None:
    import json

    from moss_rlhf import distributed
    from moss_rlhf.packing import pack_sequences, packed_sequence_scores

    d = distributed.init("cpu")
    tokenizer = load_tokenizer(model_dir)
    scorer = _scorer_with_likelihood(model_dir, tokenizer, 0.6)
    ids = torch.randint(5, len(tokenizer), (4, 20), generator=torch.Generator().manual_seed(d.rank))
    packed = pack_sequences(ids, torch.ones_like(ids), 8)
    with torch.no_grad():
        whole = packed_sequence_scores(scorer, packed)
        distributed.shard(scorer, d)
        sharded = packed_sequence_scores(scorer, packed)
    if d.is_main:
        with open(out, "w") as fh:
            json.dump([whole.tolist(), sharded.tolist()], fh)


@pytest.mark.slow
def test_a_sharded_reward_model_adds_the_same_likelihood(tmp_path, tiny_model_dir):
    """Under FSDP2 the term reads the embeddings after the model's forward, which leaves the root's weights gathered:
    the scores are the unsharded model's."""
    import json

    run_in_processes(_sharded_likelihood_scores, str(tiny_model_dir), str(tmp_path / "scores.json"))
    whole, sharded = json.loads((tmp_path / "scores.json").read_text())
    assert sharded == pytest.approx(whole, abs=1e-5)
