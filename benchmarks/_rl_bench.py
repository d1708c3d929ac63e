"""What the RL throughput benchmarks (``ppo_throughput.py``, ``grpo_throughput.py``) share: the synthetic
tokenizer, model and prompts both sides start from, the worker subprocesses, the steady-state summary, and the update
phase's achieved GFLOP/s against the measured fp32 GEMM peak.

Each benchmark runs its two sides in subprocesses of its own script (``--worker ours|trl``): ours with this
interpreter, TRL's with the python of a ``benchmarks/.venv-trl-<version>`` environment (``_trl_env.py``), which has
no moss-rlhf. That is why only the standard library is imported at module level here; whatever needs torch or
moss-rlhf is imported inside the function that uses it, which only ever runs in this interpreter.

Update FLOPs per step = 6·N_dec·forward_tokens + 6·V·d·head_tokens (N_dec: the decoder's parameters outside the
embedding and the output head, V·d: the output projection; ``forward_tokens``: tokens through the decoder in the
update phase, all models; ``head_tokens``: positions where the output head ran there), from our run's metrics
``update/forward_tokens`` and ``update/head_tokens``.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
from pathlib import Path


def synthetic_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences of made-up words: enough distinct character pairs for a BPE vocabulary of a few thousand."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + "." for _ in range(n)]


def prepare(workdir: Path, vocab_size: int, n_prompts: int) -> dict:
    """Trains a byte-level BPE tokenizer on the synthetic corpus and saves it with one randomly initialised Llama of
    the ``tiny`` preset in ``workdir/model`` (policy and reference of both sides) and the same checkpoint loaded as a
    sequence classifier with one label (its score head drawn at random, seed 0) in ``workdir/reward`` (reward model,
    and PPO's critic, of both sides: our stages refuse a causal LM as reward model); writes ``n_prompts`` prompts
    (the first 8 words of corpus sentences) to ``workdir/prompts.jsonl``. Returns the model's FLOP-counting sizes,
    ``{"decoder_params": N_dec, "head_params": V·d}``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from moss_rlhf.models import build_causal_lm, quiet_transformers
    from moss_rlhf.tokenizer import train_tokenizer

    texts = synthetic_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_causal_lm("tiny", tokenizer, seed=0)
    with quiet_transformers(notices=False):  # no progress bars, no notice about the new score head
        model.save_pretrained(workdir / "model")
        torch.manual_seed(0)
        reward = AutoModelForSequenceClassification.from_pretrained(workdir / "model", num_labels=1)
        reward.save_pretrained(workdir / "reward")
    for directory in ("model", "reward"):
        tokenizer.save_pretrained(workdir / directory)
    prompts = [{"prompt": " ".join(t.split()[:8])} for t in texts[:n_prompts]]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    untied_head = 0 if head is model.get_input_embeddings().weight else head.numel()
    sizes = {"decoder_params": n_params - embedding - untied_head, "head_params": head.numel()}
    print(f"model: tiny Llama, {n_params / 1e6:.2f}M parameters ({sizes['decoder_params'] / 1e6:.2f}M in the decoder "
          f"outside embedding and head), vocabulary {len(tokenizer)}, d={model.config.hidden_size}")
    return sizes


def prompt_texts(workdir: Path) -> list[str]:
    """The prompts ``prepare`` wrote."""
    return [json.loads(line)["prompt"] for line in (workdir / "prompts.jsonl").read_text().splitlines()]


def run_worker(python: str, script: str, name: str, workdir: Path, argv: list[str], threads: int) -> dict:
    """Runs ``python script *argv --worker name --dir workdir`` with ``threads`` OpenMP threads and returns the JSON
    object its last line of output holds (the worker's argparse takes the last of repeated flags)."""
    command = [python, script, *argv, "--worker", name, "--dir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_run(out_dir: Path) -> dict:
    """Per-step timings and update token counts of one of our runs, from its ``metrics.jsonl``; the token counts are
    None where a step lacks them."""
    from moss_rlhf.runs import read_metrics

    rows = read_metrics(out_dir)

    def column(key: str) -> list | None:
        values = [r.get(key) for r in rows]
        return None if any(v is None for v in values) else values

    return {"step_s": column("time/step_s"), "generate_s": column("time/generate_s"),
            "reward_s": column("time/reward_s"), "score_s": column("time/score_s"), "update_s": column("time/update_s"),
            "response_length": statistics.mean(r["response/length"] for r in rows),
            "forward_tokens": column("update/forward_tokens"), "head_tokens": column("update/head_tokens")}


def steady(times: list[float]) -> float:
    """Median leaving out the first value (it pays one-off warm-up costs)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def phases(run: dict) -> str:
    """A run's steady seconds per phase, those it timed: generate (the sampler), reward (ours: the reward sources;
    TRL counts its reward model in its score phase), score (the frozen models' forwards), update."""
    return ", ".join(f"{name} {steady(run[f'{name}_s']):.3f}" for name in ("generate", "reward", "score", "update")
                     if run.get(f"{name}_s"))


def alternate(rounds: int, sides: dict, unit: str) -> dict[str, dict]:
    """Runs every side (``name -> () -> result`` with a ``step_s`` list) once per round, in turn, ``rounds`` times,
    printing each round's steady seconds per ``unit``; returns each side's best round."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for number in range(1, rounds + 1):
        parts = []
        for name, run in sides.items():
            results[name].append(run())
            parts.append(f"{name} {steady(results[name][-1]['step_s']):.3f} s/{unit}")
        print(f"round {number}: " + ", ".join(parts), flush=True)
    return {name: min(runs, key=lambda r: steady(r["step_s"])) for name, runs in results.items()}


def gemm_peak(threads: int) -> float:
    """One probe of the fp32 GEMM peak (``train_throughput.matmul_peak_gflops``) on ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    from train_throughput import matmul_peak_gflops

    return matmul_peak_gflops()


def update_gflops(run: dict, sizes: dict) -> list[float] | None:
    """Achieved GFLOP/s of each step's update phase, or None when the run's metrics lack the token counts."""
    if run.get("forward_tokens") is None or run.get("head_tokens") is None or run.get("update_s") is None:
        return None
    return [(6 * sizes["decoder_params"] * f + 6 * sizes["head_params"] * h) / s / 1e9
            for f, h, s in zip(run["forward_tokens"], run["head_tokens"], run["update_s"])]


def print_update_gflops(label: str, run: dict, sizes: dict, peaks: list[float]) -> None:
    """One line: the update phase's median achieved GFLOP/s (first step left out) and its share of the best GEMM
    probe; "n/a" when the run's metrics lack ``update/forward_tokens`` / ``update/head_tokens``."""
    peak = max(peaks)
    probes = ", ".join(f"{p:.0f}" for p in peaks)
    rates = update_gflops(run, sizes)
    if rates is None:
        print(f"{label} update: n/a GFLOP/s (no update/forward_tokens, update/head_tokens in the metrics); fp32 GEMM "
              f"peak {peak:.1f} GFLOP/s (probes {probes})")
        return
    per_step = steady([6 * sizes["decoder_params"] * f + 6 * sizes["head_params"] * h
                       for f, h in zip(run["forward_tokens"], run["head_tokens"])])
    achieved = steady(rates)
    print(f"{label} update: {achieved:.2f} GFLOP/s = {achieved / peak:.1%} of the fp32 GEMM peak {peak:.1f} GFLOP/s "
          f"(probes {probes}); {per_step / 1e9:.2f} GFLOP per step, 6·N_dec·forward_tokens + 6·V·d·head_tokens "
          f"with median {steady(run['forward_tokens']):,.0f} / {steady(run['head_tokens']):,.0f} tokens")
