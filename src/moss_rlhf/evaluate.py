"""``moss-rlhf evaluate``: did RLHF help? Model A (e.g. the PPO-max policy) against model B (e.g. the SFT model).

Measured on one held-out prompt set (default: the demo world's ``eval_prompts.jsonl``):

- **pairwise win rate** of A over B — each prompt's two replies are scored by the demo world's gold judge
  (``moss_rlhf.demo.judge``, what its "humans" really want) or by a reward model; a tie counts half. The 95% interval is
  a percentile bootstrap that resamples prompts (the MOSS-RLHF paper reports win/tie/lose against the SFT model);
- **mean score** per model, and the win rate per task when the prompts carry a ``task`` field;
- **KL of A from B** on A's own samples: sum over response tokens of log πA − log πB, the divergence PPO's penalty
  holds in check, per sequence and per token;
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

from moss_rlhf.config import ConfigError, atomic_write_text, option
from moss_rlhf.data.corpus import DEFAULT_WORLD_DIR
from moss_rlhf.generation import SamplingConfig

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
    prompts: str = option("", "prompt file ({\"prompt\"} or {\"messages\"} records, optional \"task\"); "
                              "default: the demo world's held-out eval_prompts.jsonl")
    max_prompts: int = option(200, "evaluate at most this many prompts (0: all)")
    judge: str = option("gold", "'gold' (the demo world's judge) or a reward-model directory")
    perplexity_data: str = option("", "held-out text or conversation file for perplexity; default: the demo "
                                      "world's pretrain_eval.jsonl when its prompts or gold judge are used, else "
                                      "skipped")
    perplexity_docs: int = option(200, "documents used for perplexity (0: all)")
    max_len: int = option(256, "longest perplexity document in tokens (longer ones are cut)")
    max_new_tokens: int = option(64, "longest reply in tokens")
    temperature: float = option(0.7, "sampling temperature (0: greedy)")
    top_p: float = option(0.9, "nucleus sampling")
    batch_size: int = option(32, "prompts per generation batch")
    bootstrap: int = option(2000, "bootstrap resamples for the win-rate interval")
    seed: int = option(0, "sampling and bootstrap seed")
    samples_kept: int = option(24, "prompt/reply pairs stored in the JSON for reading (and for the report)")
    out: str = option("runs/eval/evaluate.json", "JSON file with every number (the report reads it)")
    world: str = option(DEFAULT_WORLD_DIR, "directory of the demo world (written there if absent)")
    world_size: str = option("default", "demo world size: default or quick", choices=("default", "quick"))
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if self.bootstrap < 100:
            raise ConfigError(f"--bootstrap must be at least 100 resamples, got {self.bootstrap}")
        from moss_rlhf.assistant import check_model_path

        check_model_path(self.model_a, "--model-a")
        check_model_path(self.model_b, "--model-b")
        if self.judge != "gold":
            check_model_path(self.judge, "--judge")


# --------------------------------------------------------------------------------------------------------------------
# Model-running parts


def score_replies(judge: str, prompts: list[list[dict]], replies: list[str], tokenizer, device, batch_size: int = 32
                  ) -> list[float]:
    """Gold-judge scores (0–10) or reward-model scores of each (conversation, reply)."""
    if judge == "gold":
        from moss_rlhf.demo.judge import judge_many

        return [j.score for j in judge_many([p[-1]["content"] for p in prompts], replies)]
    import torch

    from moss_rlhf.data.collate import left_pad
    from moss_rlhf.models import load_scorer, sequence_scores
    from moss_rlhf.tokenizer import encode_chat, load_tokenizer

    reward_tokenizer = load_tokenizer(judge) if (Path(judge) / "tokenizer_config.json").exists() else tokenizer
    scorer = load_scorer(judge, reward_tokenizer).to(device).eval()
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_chat(reward_tokenizer, p + [{"role": "assistant", "content": r}])
                       for p, r in zip(prompts[start:start + batch_size], replies[start:start + batch_size])]
            ids, mask = left_pad(encoded, reward_tokenizer.pad_token_id)
            scores.extend(sequence_scores(scorer, ids.to(device), mask.to(device)).tolist())
    return scores


def sample_replies(model, tokenizer, prompts: list[list[dict]], cfg: SamplingConfig, batch_size: int, seed: int):
    """Replies (texts) and their token rollouts, batch by batch, so KL is measured on the tokens actually sampled."""
    import torch

    from moss_rlhf.data.collate import left_pad
    from moss_rlhf.generation import decode_responses, generate, stop_token_ids
    from moss_rlhf.tokenizer import encode_chat

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, rollouts = [], []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_chat(tokenizer, p, add_generation_prompt=True) for p in prompts[start:start + batch_size]]
        ids, mask = left_pad(encoded, tokenizer.pad_token_id)
        rollout = generate(model, ids.to(device), mask.to(device), cfg, stop_token_ids(tokenizer),
                           tokenizer.pad_token_id, generator)
        texts.extend(decode_responses(tokenizer, rollout))
        rollouts.append(rollout)
    return texts, rollouts


def response_logprobs(model, rollout):
    """``[B, R]`` log-probabilities of the rollout's response tokens under ``model``."""
    import torch

    from moss_rlhf.losses import token_logprobs

    with torch.no_grad():
        ids, mask = rollout.sequences, rollout.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        prompt_len = rollout.prompt_ids.shape[1]
        # logits at position t predict token t + 1, so the response's tokens are predicted from prompt_len - 1 on
        return token_logprobs(logits[:, prompt_len - 1:-1], ids[:, prompt_len:])


def kl_on_samples(model_a, model_b, rollouts) -> dict[str, float]:
    sequence_kls: list[float] = []
    counts: list[int] = []
    for rollout in rollouts:
        ratio = (response_logprobs(model_a, rollout) - response_logprobs(model_b, rollout)) * rollout.response_mask
        sequence_kls.extend(ratio.sum(-1).tolist())
        counts.extend(rollout.response_mask.sum(-1).tolist())
    return kl_summary(sequence_kls, counts)


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


def _load_prompts(cfg: EvaluateConfig) -> tuple[list[list[dict]], list[str], bool]:
    from moss_rlhf.data.corpus import world_file
    from moss_rlhf.data.formats import load_records, parse_prompt

    from_world = not cfg.prompts
    path = cfg.prompts or world_file("eval_prompts.jsonl", cfg.world, cfg.seed, cfg.world_size)
    rows = load_records(path)
    rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
    prompts = [parse_prompt(row, (path, i)) for i, row in enumerate(rows, start=1)]
    tasks = [str(row.get("task", "")) for row in rows]
    return prompts, tasks, from_world


def run(cfg: EvaluateConfig) -> dict:
    """Sample, score, compare; print a table and write the JSON report."""
    from moss_rlhf.data.corpus import world_file
    from moss_rlhf.models import load_causal_lm, resolve_device
    from moss_rlhf.runs import seed_everything
    from moss_rlhf.tokenizer import load_tokenizer

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    prompts, tasks, from_world = _load_prompts(cfg)
    names = {"a": _name(cfg.model_a, cfg.name_a), "b": _name(cfg.model_b, cfg.name_b)}
    if names["a"] == names["b"]:
        names = {"a": names["a"] + " (A)", "b": names["b"] + " (B)"}
    tokenizers = {"a": load_tokenizer(cfg.model_a), "b": load_tokenizer(cfg.model_b)}
    models = {"a": load_causal_lm(cfg.model_a).to(device).eval(), "b": load_causal_lm(cfg.model_b).to(device).eval()}
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    # the demo world is in use when its prompts or its gold judge are: then its held-out corpus is the default
    ppl_path = cfg.perplexity_data or (world_file("pretrain_eval.jsonl", cfg.world, cfg.seed, cfg.world_size)
                                       if from_world or cfg.judge == "gold" else "")

    replies, rollouts, scores, per_model = {}, {}, {}, {}
    for key in ("a", "b"):
        replies[key], rollouts[key] = sample_replies(models[key], tokenizers[key], prompts, sampling,
                                                     cfg.batch_size, cfg.seed)
        scores[key] = score_replies(cfg.judge, prompts, replies[key], tokenizers[key], device, cfg.batch_size)
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
        "kl": kl_on_samples(models["a"], models["b"], rollouts["a"]) if same_vocab else None,
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
        console.print(f"KL({a} ‖ {b}) on {a}'s samples: {report['kl']['per_sequence']:.3f} per reply, "
                      f"{report['kl']['per_token']:.4f} per token")
    if report.get("by_task"):
        tasks = Table(title="win rate of A by task")
        for column in ("task", "n", "win rate", f"score {a}", f"score {b}"):
            tasks.add_column(column, justify="right" if column != "task" else "left")
        for task, t in report["by_task"].items():
            tasks.add_row(escape(task), str(t["n"]), f"{t['win_rate']:.1%}", f"{t['mean_score_a']:.2f}",
                          f"{t['mean_score_b']:.2f}")
        console.print(tasks)
