"""Time per PPO iteration (rollout + scoring + update): moss-rlhf's ``ppo`` stage against TRL's PPO
(``trl.experimental.ppo.PPOTrainer``, trl 1.12.0), side by side in one run, on the same model, tokenizer, prompts,
batch geometry, response length and epochs.

    python benchmarks/ppo_throughput.py [--iterations 6] [--threads 1] [--skip-trl]

What it does:
  1. trains a small byte-level BPE tokenizer on a synthetic corpus and saves one randomly initialised Llama of the
     ``tiny`` preset with ``save_pretrained`` (policy, reference, reward model and critic all start from it);
  2. runs moss-rlhf's PPO in a subprocess of this interpreter;
  3. creates ``benchmarks/.venv-trl`` on first use (``python -m venv``; ``pip install torch==2.13.0 trl==1.12.0``)
     and runs TRL's PPOTrainer there in a subprocess, so TRL's pinned dependencies never touch this environment;
  4. alternates the two ``--rounds`` times and, for each, keeps its best round; prints the median seconds per
     iteration (the first iteration, which pays one-off warm-up costs, is left out)
     and the ratio, and the ratio of the fastest iterations (less sensitive to other jobs on a shared machine).

Both sides sample at temperature 1 and stop a response at the end token or at ``--response-length``; TRL gets its
rollout forward batch equal to the whole rollout batch (its fastest setting).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_VENV = HERE / ".venv-trl"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.12.0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=6, help="PPO iterations per implementation")
    p.add_argument("--rollout-batch", type=int, default=16, help="prompts per iteration")
    p.add_argument("--mini-batch", type=int, default=8, help="sequences per optimizer update")
    p.add_argument("--response-length", type=int, default=32, help="longest response in tokens")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both implementations")
    p.add_argument("--rounds", type=int, default=2, help="alternate the two implementations this many times and keep "
                                                         "each one's best round (other jobs on a shared machine "
                                                         "slow whichever happens to run beside them)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--skip-trl", action="store_true", help="time moss-rlhf only")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------ set-up


def synthetic_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences of made-up words: enough distinct character pairs for a BPE vocabulary of a few thousand."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + "." for _ in range(n)]


def prepare(workdir: Path, args: argparse.Namespace) -> None:
    from moss_rlhf.models import build_causal_lm
    from moss_rlhf.tokenizer import train_tokenizer

    texts = synthetic_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_causal_lm("tiny", tokenizer, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    prompts = [{"prompt": " ".join(t.split()[:8])} for t in texts[: args.rollout_batch * (args.iterations + 1)]]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tiny Llama, {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")


# ----------------------------------------------------------------------------------------------------------- workers


def run_ours(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from moss_rlhf.runs import read_metrics
    from moss_rlhf.stages import ppo

    model = str(workdir / "model")
    cfg = ppo.PPOConfig(out=str(workdir / "ours"), policy=model, reward_model=model,
                        prompts=[str(workdir / "prompts.jsonl")], eval_prompts=[str(workdir / "prompts.jsonl")],
                        eval_size=1, rollout_batch=args.rollout_batch, mini_batch=args.mini_batch,
                        batch_size=args.mini_batch, ppo_epochs=args.epochs, max_new_tokens=args.response_length,
                        max_steps=args.iterations, eval_every=0, save_every=0, progress=False, device="cpu",
                        best_metric="reward", overwrite=True)
    ppo.run(cfg)
    rows = read_metrics(workdir / "ours")
    return {"iteration_s": [r["time/step_s"] for r in rows],
            "generate_s": [r["time/generate_s"] for r in rows], "score_s": [r["time/score_s"] for r in rows],
            "update_s": [r["time/update_s"] for r in rows],
            "response_length": statistics.mean(r["response/length"] for r in rows)}


def run_trl(workdir: Path, args: argparse.Namespace) -> dict:
    import os as _os

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in (workdir / "prompts.jsonl").read_text().splitlines()]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
           for p in prompts]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ids]})

    def scorer():
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)

    config = PPOConfig(output_dir=str(workdir / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                       logging_steps=10_000, per_device_train_batch_size=args.mini_batch, gradient_accumulation_steps=1,
                       num_mini_batches=args.rollout_batch // args.mini_batch, num_ppo_epochs=args.epochs,
                       local_rollout_forward_batch_size=args.rollout_batch, response_length=args.response_length,
                       total_episodes=args.rollout_batch * args.iterations, num_sample_generations=0,
                       temperature=1.0, seed=0, stop_token="eos", disable_tqdm=True)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(args=config, processing_class=tokenizer,
                         model=AutoModelForCausalLM.from_pretrained(model_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(model_dir), reward_model=scorer(),
                         value_model=scorer(), train_dataset=dataset, eval_dataset=dataset.select(range(4)),
                         callbacks=[Clock()])
    trainer.train()
    return {"iteration_s": [b - a for a, b in zip(marks, marks[1:])], "trl": trl.__version__}


# -------------------------------------------------------------------------------------------------------------- main


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {TRL_VENV} with {' '.join(TRL_REQUIREMENTS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not install {' '.join(TRL_REQUIREMENTS)}:\n{done.stderr[-3000:]}")
    return python


def worker(python: str, name: str, workdir: Path, args: argparse.Namespace) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", name, "--dir", str(workdir),
               "--iterations", str(args.iterations), "--rollout-batch", str(args.rollout_batch),
               "--mini-batch", str(args.mini_batch), "--response-length", str(args.response_length),
               "--epochs", str(args.epochs), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(Path(args.dir), args)
        print(json.dumps(result))
        return
    if args.rollout_batch % args.mini_batch:
        raise SystemExit("--rollout-batch must be a multiple of --mini-batch")
    print(f"config: rollout batch {args.rollout_batch}, mini-batch {args.mini_batch}, response length "
          f"{args.response_length}, {args.epochs} PPO epoch(s), {args.iterations} iterations, "
          f"{args.threads} thread(s), CPU")
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args)
        trl_python = None if args.skip_trl else str(ensure_trl_venv())
        ours_rounds, trl_rounds = [], []
        for round_number in range(1, args.rounds + 1):
            ours_rounds.append(worker(sys.executable, "ours", workdir, args))
            print(f"round {round_number}: moss-rlhf {steady(ours_rounds[-1]['iteration_s']):.3f} s/iteration", end="")
            if trl_python:
                trl_rounds.append(worker(trl_python, "trl", workdir, args))
                print(f", trl {steady(trl_rounds[-1]['iteration_s']):.3f} s/iteration", end="")
            print(flush=True)
        ours = min(ours_rounds, key=lambda r: steady(r["iteration_s"]))
        ours_s = steady(ours["iteration_s"])
        print(f"moss-rlhf: {ours_s:.3f} s/iteration (generate {steady(ours['generate_s']):.3f}, score "
              f"{steady(ours['score_s']):.3f}, update {steady(ours['update_s']):.3f}); mean response "
              f"{ours['response_length']:.1f} tokens")
        if not trl_python:
            return
        trl = min(trl_rounds, key=lambda r: steady(r["iteration_s"]))
        trl_s = steady(trl["iteration_s"])
        print(f"trl {trl['trl']}: {trl_s:.3f} s/iteration")
        print(f"speed-up: moss-rlhf is {trl_s / ours_s:.2f}× faster than TRL PPO per iteration (medians); "
              f"fastest iterations {min(ours['iteration_s'][1:]):.3f} vs {min(trl['iteration_s'][1:]):.3f} s: "
              f"{min(trl['iteration_s'][1:]) / min(ours['iteration_s'][1:]):.2f}×")


if __name__ == "__main__":
    main()
