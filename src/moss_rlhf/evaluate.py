"""``moss-rlhf evaluate``: did RLHF help? Model A (e.g. the PPO-max policy) against model B (e.g. the SFT model).

Measured on one held-out prompt set:

- **pairwise win rate** of A over B — each prompt's two replies are scored by the judge (``--judge``): a reward
  model, any ``package.module:function`` scorer, or ``gold``, the demo world's gold judge (what its "humans" really
  want); a tie counts half. The 95% interval is a percentile bootstrap that resamples prompts (the MOSS-RLHF paper
  reports win/tie/lose against the SFT model);
- **mean score** per model, and the win rate per task when the prompts carry a ``task`` field;
- **KL(A‖B) at temperature T** on A's own samples: the mean over A's replies of the summed log πA,T − log πB,T, where
  π·,T = softmax(logits / T) and T is the sampling temperature (1 when greedy) — the divergence PPO's penalty holds in
  check. When top-k, top-p, a repetition penalty or greedy decoding shape the replies, they are not samples of πA,T,
  so KL is measured on separate samples drawn from πA,T itself;
- **held-out perplexity** of each model on a text or conversation file (conversations: assistant tokens only);
- **reply length** (tokens) and **distinct-1/2** (Li et al., 2016: unique n-grams / all n-grams over all replies), which
  expose reward hacking by verbosity or repetition.

The statistics are small pure functions (``outcomes``, ``win_rate_with_ties``, ``bootstrap_interval``, ``distinct_n``,
``kl_summary``); the rest runs the models and feeds them. Output: a rich table and a JSON file (read by the report).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moss_rlhf.config import ConfigError, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.sampling import SamplingConfig


# --------------------------------------------------------------------------------------------------------------------
# Statistics (pure)


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float], tie_tolerance: float = 1e-6) -> list[float]:
    """Per prompt: 1 if A scored higher, 0 if B did, 0.5 for a tie (within ``tie_tolerance``)."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    return [0.5 if abs(a - b) <= tie_tolerance else float(a > b) for a, b in zip(scores_a, scores_b)]


def win_rate_with_ties(results: Sequence[float]) -> float:
    """Share of wins of A, ties counted half (the mean of :func:`outcomes`)."""
    if not results:
        raise ValueError("no comparisons to compute a win rate from")
    return sum(results) / len(results)


def bootstrap_interval(values: Sequence[float], statistic: Callable[[Sequence[float]], float] | None = None,
                       n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean), resampling ``values`` with replacement
    with a fixed seed, so the same inputs always give the same interval."""
    import numpy as np

    if not len(values):
        raise ValueError("no values to bootstrap")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(n_resamples, len(data)))
    if statistic is None:
        stats = data[picks].mean(axis=1)
    else:
        stats = np.array([statistic(list(data[row])) for row in picks])
    tail = (1.0 - confidence) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of whitespace tokens in ``texts`` (0 when there are none). Chinese has no
    spaces, so each CJK character counts as a token."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = _words(text)
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def _words(text: str) -> list[str]:
    words: list[str] = []
    for chunk in text.split():
        if any("\u4e00" <= ch <= "\u9fff" for ch in chunk):
            words.extend(chunk)
        else:
            words.append(chunk)
    return words


def kl_summary(sequence_kls: Sequence[float], token_counts: Sequence[int]) -> dict[str, float]:
    """Mean KL per sequence and per token from each sequence's summed log-ratio and its token count."""
    total_tokens = sum(token_counts)
    return {"per_sequence": sum(sequence_kls) / max(len(sequence_kls), 1),
            "per_token": sum(sequence_kls) / max(total_tokens, 1)}


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(min(total_nll / max(n_tokens, 1), 50.0))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvaluateConfig(SamplingConfig):
    model_a: str = option("runs/ppo/model", "model A, the candidate (e.g. the PPO-max policy)", positional=True)
    model_b: str = option("runs/sft/model", "model B, the baseline (e.g. the SFT model)", positional=True)
    name_a: str = option("", "label of model A in tables (default: its parent directory's name)")
    name_b: str = option("", "label of model B (default: its parent directory's name)")
    prompts: str = option("", "prompt file ({\"prompt\"} or {\"messages\"} records, optional \"task\")")
    max_prompts: int = option(200, "evaluate at most this many prompts (0: all)", at_least=0)
    judge: str = option("", "a reward-model directory, a package.module:function scorer, or 'gold' (the demo "
                            "world's gold judge)")
    perplexity_data: str = option("", "held-out text or conversation file for perplexity (none: skipped)")
    perplexity_docs: int = option(200, "documents used for perplexity (0: all)", at_least=0)
    max_len: int = option(256, "longest perplexity document in tokens (longer ones are cut)", at_least=2)
    max_new_tokens: int = option(64, "longest reply in tokens", at_least=1)
    temperature: float = option(0.7, "sampling temperature (0: greedy)", at_least=0.0)
    top_p: float = option(0.9, "nucleus sampling", above=0.0, at_most=1.0)
    batch_size: int = option(32, "prompts per generation batch", at_least=1)
    bootstrap: int = option(2000, "bootstrap resamples for the win-rate interval", at_least=100)
    seed: int = option(0, "sampling and bootstrap seed")
    samples_kept: int = option(24, "prompt/reply pairs stored in the JSON for reading (and for the report)",
                               at_least=0)
    out: str = option("runs/eval/evaluate.json", "JSON file with every number (the report reads it)")
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if not self.prompts:
            raise ConfigError("give --prompts FILE: the held-out prompts to compare the two models on")
        if not self.judge:
            raise ConfigError("give --judge: a reward-model directory, a package.module:function scorer, or 'gold' "
                              "(the demo world's judge)")


# --------------------------------------------------------------------------------------------------------------------
# Model-running parts


def sampled(model, tokenizer, prompts: list[list[dict]], cfg: SamplingConfig, batch_size: int, seed: int):
    """Replies (texts) and their token rollouts, batch by batch, so KL is measured on the tokens actually sampled."""
    from moss_rlhf.sampling import sample_replies
    from moss_rlhf.sampling.builtin import BuiltinSampler

    return sample_replies(BuiltinSampler(model, tokenizer), tokenizer, prompts, cfg, seed, batch_size)


def reply_log_ratios(model_a, model_b, rollout, temperature: float = 1.0):
    """Per reply ``[b]``: the sum over its tokens of log A_T − log B_T, both scored at ``temperature``. ``model_b``
    None: ``model_a`` (a LoRA model) with its adapters off."""
    import torch

    from moss_rlhf.rollout import reference_context, response_logprobs

    r = rollout
    args = (r.sequences, r.attention_mask, r.position_ids, r.response_ids.shape[1], temperature)
    with torch.no_grad():
        logps = response_logprobs(model_a, *args)[0]
        with reference_context(model_a, model_b):
            other = response_logprobs(model_a if model_b is None else model_b, *args)[0]
    return torch.where(r.response_mask.bool(), logps - other, 0.0).sum(-1)


def kl_on_samples(model_a, model_b, rollouts, temperature: float) -> dict[str, float]:
    """KL(A_T ‖ B_T) estimated on A's samples from A_T: per reply, the sum over its tokens of log A_T − log B_T
    (both scored at ``temperature``, the one the samples were drawn at)."""
    sequence_kls: list[float] = []
    counts: list[int] = []
    for r in rollouts:
        sequence_kls.extend(reply_log_ratios(model_a, model_b, r, temperature).tolist())
        counts.extend(r.response_mask.sum(-1).tolist())
    return {**kl_summary(sequence_kls, counts), "temperature": temperature}


def kl_on_prompts(policy, reference, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, max_len: int,
                  batch_size: int, seed: int, dist) -> dict[str, float]:
    """KL(π ‖ π_ref) during training (DPO's monitor): the policy samples a reply to each prompt at temperature 1 —
    prompt ``i`` with its own seed, so every evaluation and every process split draws alike — and the KL is the mean
    over replies of the summed log π − log π_ref, reduced over processes. ``reference`` None: the LoRA policy with
    its adapters off. Empty for no prompts."""
    import torch

    from moss_rlhf import distributed
    from moss_rlhf.models import unwrap
    from moss_rlhf.sampling import encode_prompts, prompt_seeds
    from moss_rlhf.sampling.builtin import BuiltinSampler

    if not prompts:
        return {}
    # a sharded policy samples and is scored on the sampler's whole copy, a sharded reference on a whole copy made
    # for this evaluation alone: processes draw different lengths, and a sharded forward is a collective
    sampler, sampling = BuiltinSampler(unwrap(policy), tokenizer), SamplingConfig(max_new_tokens, temperature=1.0)
    reference = distributed.plain_copy(reference) if reference is not None else None
    totals = torch.zeros(3, dtype=torch.float64, device=dist.device)
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            r = sampler.generate(encode_prompts(tokenizer, [prompts[i] for i in chunk], max_len), sampling,
                                 prompt_seeds(seed, chunk))
            totals += torch.tensor([float(reply_log_ratios(sampler.model, reference, r).sum()),
                                    float(r.response_mask.sum()), float(len(chunk))],
                                   dtype=torch.float64, device=dist.device)
    distributed.all_reduce_sum(totals)
    return {"eval/kl_per_reply": float(totals[0] / totals[2]), "eval/kl_per_token": float(totals[0] / totals[1])}


def heldout_nll(model, tokenizer, path: str, max_docs: int, max_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token loss and token count on a text file (whole documents) or a conversation file (assistant
    tokens only, as SFT is trained)."""
    import torch

    from moss_rlhf.data.collate import Example, chat_example, pad_examples
    from moss_rlhf.data.formats import load_records, parse_conversation, parse_text
    from moss_rlhf.losses import lm_loss_sum

    rows = load_records(path)
    rows = rows[:max_docs] if max_docs else rows
    examples = []
    for index, row in enumerate(rows, start=1):
        if "text" in row:
            ids = [tokenizer.bos_token_id] + tokenizer(parse_text(row, (path, index)), add_special_tokens=False)[
                "input_ids"] + [tokenizer.eos_token_id]
            ids = [t for t in ids if t is not None][:max_len]
            examples.append(Example(ids, ids))
        else:
            examples.append(chat_example(tokenizer, parse_conversation(row, (path, index)), max_len))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = pad_examples(examples[start:start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            loss_sum, n = lm_loss_sum(logits, batch["labels"].to(device))
            total, count = total + float(loss_sum), count + int(n)
    return total, count


def _name(path: str, given: str) -> str:
    if given:
        return given
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name or path


def _load_prompts(cfg: EvaluateConfig) -> tuple[list[list[dict]], list[str]]:
    from moss_rlhf.data.formats import load_records, parse_prompt

    rows = load_records(cfg.prompts)
    rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
    prompts = [parse_prompt(row, (cfg.prompts, i)) for i, row in enumerate(rows, start=1)]
    tasks = [str(row.get("task", "")) for row in rows]
    return prompts, tasks


def run(cfg: EvaluateConfig) -> dict:
    """Sample, score, compare; print a table and write the JSON report."""
    from moss_rlhf.checkpoint import seed_everything
    from moss_rlhf.models import load_causal_lm, resolve_device
    from moss_rlhf.scoring import text_scorer
    from moss_rlhf.tokenizer import load_tokenizer

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    prompts, tasks = _load_prompts(cfg)
    names = {"a": _name(cfg.model_a, cfg.name_a), "b": _name(cfg.model_b, cfg.name_b)}
    if names["a"] == names["b"]:
        names = {"a": names["a"] + " (A)", "b": names["b"] + " (B)"}
    models = {"a": load_causal_lm(cfg.model_a, flag="--model-a").to(device).eval(),
              "b": load_causal_lm(cfg.model_b, flag="--model-b").to(device).eval()}
    tokenizers = {"a": load_tokenizer(cfg.model_a, "--model-a"), "b": load_tokenizer(cfg.model_b, "--model-b")}
    judge = text_scorer(cfg.judge, device)
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    ppl_path = cfg.perplexity_data

    replies, rollouts, scores, per_model = {}, {}, {}, {}
    for key in ("a", "b"):
        replies[key], rollouts[key] = sampled(models[key], tokenizers[key], prompts, sampling, cfg.batch_size,
                                              cfg.seed)
        scores[key] = judge(prompts, replies[key])
        lengths = [int(n) for r in rollouts[key] for n in r.response_mask.sum(-1).tolist()]
        stats = {"mean_score": mean(scores[key]), "response_length": mean(lengths),
                 "distinct_1": distinct_n(replies[key], 1), "distinct_2": distinct_n(replies[key], 2)}
        if ppl_path:
            nll, n = heldout_nll(models[key], tokenizers[key], ppl_path, cfg.perplexity_docs, cfg.max_len)
            stats["perplexity"] = perplexity(nll, n)
        per_model[names[key]] = stats

    results = outcomes(scores["a"], scores["b"])
    low, high = bootstrap_interval(results, n_resamples=cfg.bootstrap, seed=cfg.seed)
    same_vocab = tokenizers["a"].get_vocab() == tokenizers["b"].get_vocab()
    # KL needs samples of softmax(logits_A / T) itself: draw them unfiltered when the replies were filtered
    kl_temperature = cfg.temperature or 1.0
    kl_rollouts = rollouts["a"]
    if same_vocab and sampling.filters_distribution:
        kl_rollouts = sampled(models["a"], tokenizers["a"], prompts, SamplingConfig(cfg.max_new_tokens, kl_temperature),
                              cfg.batch_size, cfg.seed + 1)[1]
    by_task = {}
    for task in sorted({t for t in tasks if t}):
        picked = [r for r, t in zip(results, tasks) if t == task]
        by_task[task] = {"n": len(picked), "win_rate": win_rate_with_ties(picked),
                         "mean_score_a": mean([s for s, t in zip(scores["a"], tasks) if t == task]),
                         "mean_score_b": mean([s for s, t in zip(scores["b"], tasks) if t == task])}
    report = {
        "model_a": {"name": names["a"], "path": cfg.model_a},
        "model_b": {"name": names["b"], "path": cfg.model_b},
        "judge": cfg.judge,
        "n_prompts": len(prompts),
        "win_rate": {"wins": sum(r == 1.0 for r in results), "ties": sum(r == 0.5 for r in results),
                     "losses": sum(r == 0.0 for r in results), "win_rate": win_rate_with_ties(results),
                     "ci_low": low, "ci_high": high, "confidence": 0.95, "bootstrap_resamples": cfg.bootstrap},
        "models": per_model,
        "kl": kl_on_samples(models["a"], models["b"], kl_rollouts, kl_temperature) if same_vocab else None,
        "perplexity_data": ppl_path or None,
        "by_task": by_task,
        "samples": [{"prompt": p[-1]["content"], "task": t, "a": ra, "b": rb, "score_a": sa, "score_b": sb}
                    for p, t, ra, rb, sa, sb in list(zip(prompts, tasks, replies["a"], replies["b"], scores["a"],
                                                         scores["b"]))[:cfg.samples_kept]],
        "sampling": asdict(sampling),
        "seed": cfg.seed,
    }
    atomic_write_text(Path(cfg.out), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_report(report)
    print(f"evaluate: {len(prompts)} prompts -> {cfg.out}")
    return report


def print_report(report: dict) -> None:
    """The evaluation as rich tables on the terminal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # names and task labels are user text: escape them so a "[" is not read as rich markup
    a, b, w = escape(report["model_a"]["name"]), escape(report["model_b"]["name"]), report["win_rate"]
    judge = "gold judge" if report["judge"] == "gold" else f"reward model {report['judge']}"
    head = Table(title=f"{a} vs {b} on {report['n_prompts']} prompts ({judge})")
    for column in ("win rate of A (ties ½)", "95% interval", "wins", "ties", "losses"):
        head.add_column(column, justify="right")
    head.add_row(f"{w['win_rate']:.1%}", f"{w['ci_low']:.1%} – {w['ci_high']:.1%}", str(w["wins"]), str(w["ties"]),
                 str(w["losses"]))
    models = Table(title="per model")
    keys = [k for k in ("mean_score", "response_length", "distinct_1", "distinct_2", "perplexity")
            if any(k in s for s in report["models"].values())]
    models.add_column("model")
    for key in keys:
        models.add_column(key.replace("_", " "), justify="right")
    for name, stats in report["models"].items():
        models.add_row(escape(name), *(f"{stats[k]:.3f}" if k in stats else "–" for k in keys))
    console = Console()
    console.print(head)
    console.print(models)
    if report.get("kl"):
        kl = report["kl"]
        console.print(f"KL({a} ‖ {b}) at temperature {kl.get('temperature', 1.0):g} on {a}'s samples: "
                      f"{kl['per_sequence']:.3f} per reply, {kl['per_token']:.4f} per token")
    if report.get("by_task"):
        tasks = Table(title="win rate of A by task")
        for column in ("task", "n", "win rate", f"score {a}", f"score {b}"):
            tasks.add_column(column, justify="right" if column != "task" else "left")
        for task, t in report["by_task"].items():
            tasks.add_row(escape(task), str(t["n"]), f"{t['win_rate']:.1%}", f"{t['mean_score_a']:.2f}",
                          f"{t['mean_score_b']:.2f}")
        console.print(tasks)
