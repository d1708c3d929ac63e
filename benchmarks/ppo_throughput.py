"""Time per PPO iteration (rollout + scoring + update): moss-rlhf's RL stage (``stages.rl``, its default PPO-max
preset) against TRL's PPO (``trl.experimental.ppo.PPOTrainer``, trl 1.12.0 — 1.13.0 and later no longer have it),
side by side in one run, on the same model, tokenizer, prompts, batch geometry, response length and epochs.

    python benchmarks/ppo_throughput.py [--iterations 6] [--threads 1] [--critic-in-turn] [--skip-trl]

What it does:
  1. trains a small byte-level BPE tokenizer on a synthetic corpus and saves one randomly initialised Llama of the
     ``tiny`` preset with ``save_pretrained`` (``_rl_bench.prepare``; policy, reference, reward model and critic all
     start from it);
  2. runs moss-rlhf's PPO in a subprocess of this interpreter;
  3. runs TRL's PPOTrainer in a subprocess of ``benchmarks/.venv-trl-1.12.0`` (built on first use by
     ``_trl_env.ensure_trl_venv``: ``python -m venv``; ``pip install torch==2.13.0 trl==1.12.0``), so TRL's pinned
     dependencies never touch this environment;
  4. alternates the two ``--rounds`` times and, for each, keeps its best round; prints the median seconds per
     iteration (the first iteration, which pays one-off warm-up costs, is left out) and the ratio, the ratio of the
     fastest iterations (less sensitive to other jobs on a shared machine), and our update phase's achieved GFLOP/s
     against the fp32 GEMM peak probed before and after the runs (``_rl_bench.print_update_gflops``).

Both sides sample at temperature 1 and stop a response at the end token or at ``--response-length``; TRL gets its
rollout forward batch equal to the whole rollout batch (its fastest setting). After TRL's run the worker checks that
it made ours' iterations, episodes and optimizer steps (TRL's rollout batch is ``per_device_train_batch_size ×
gradient_accumulation_steps``: until 2026-12-03 this script gave it the mini-batch there, so TRL's iterations had a
quarter or half of ours' sequences). With two or more threads ours runs the critic's update steps beside the
policy's (``--overlap-critic``, on by default); ``--critic-in-turn`` times them one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rl_bench import (alternate, gemm_peak, our_run, phases, prepare, print_update_gflops,  # noqa: E402
                       prompt_texts, run_worker, steady)
from _trl_env import ensure_trl_venv  # noqa: E402

TRL_VERSION = "1.12.0"  # the last release with trl.experimental.ppo


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
    p.add_argument("--critic-in-turn", action="store_true", help="ours: the critic's update steps after the "
                                                                 "policy's, not beside it (--no-overlap-critic)")
    p.add_argument("--skip-trl", action="store_true", help="time moss-rlhf only")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- workers


def run_ours(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from moss_rlhf.stages import rl

    model, prompts = str(workdir / "model"), str(workdir / "prompts.jsonl")
    cfg = rl.RLConfig(out=str(workdir / "ours"), policy=model, reward_model=str(workdir / "reward"), prompts=[prompts],
                      eval_prompts=[prompts], eval_size=1, rollout_batch=args.rollout_batch,
                      mini_batch=args.mini_batch, batch_size=args.mini_batch, ppo_epochs=args.epochs,
                      max_new_tokens=args.response_length, max_steps=args.iterations, eval_every=0, save_every=0,
                      progress=False, device="cpu", best_metric="reward", overwrite=True,
                      overlap_critic=not args.critic_in_turn)
    rl.run(cfg)
    return our_run(workdir / "ours")


def run_trl(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
           for p in prompt_texts(workdir)]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ids]})

    def scorer():  # reward model and critic: the saved sequence classifier, as ours
        return AutoModelForSequenceClassification.from_pretrained(str(workdir / "reward"), num_labels=1)

    # TRL's rollout batch is per_device_train_batch_size × gradient_accumulation_steps, split into num_mini_batches
    # mini-batches, each run as micro-batches of per_device_train_batch_size (one here: the slice stops at the
    # mini-batch's end) with an optimizer step per micro-batch when gradient_accumulation_steps is 1 — so these
    # three give ours' geometry exactly: --rollout-batch sequences, one update per --mini-batch of them.
    config = PPOConfig(output_dir=str(workdir / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                       logging_steps=10_000, per_device_train_batch_size=args.rollout_batch,
                       gradient_accumulation_steps=1,
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
    updates = []  # optimizer steps per iteration, counted where they happen
    step = trainer.optimizer.step

    def counted_step(*a, **k):
        updates.append(1)
        return step(*a, **k)

    trainer.optimizer.step = counted_step
    trainer.train()
    # the geometry check: TRL ran what ours runs (its batch fields are easy to get wrong by a factor)
    expected = {"iterations": args.iterations, "sequences": args.rollout_batch * args.iterations,
                "updates": args.iterations * args.epochs * (args.rollout_batch // args.mini_batch)}
    seen = {"iterations": len(marks) - 1, "sequences": trainer.state.episode, "updates": len(updates)}
    if seen != expected:
        raise SystemExit(f"TRL's PPO ran {seen}, not {expected}: the benchmark's PPOConfig is wrong")
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])], "trl": trl.__version__}


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(Path(args.dir), args)
        print(json.dumps(result))
        return
    if args.rollout_batch % args.mini_batch:
        raise SystemExit("--rollout-batch must be a multiple of --mini-batch")
    print(f"config: rollout batch {args.rollout_batch}, mini-batch {args.mini_batch}, response length "
          f"{args.response_length}, {args.epochs} PPO epoch(s), {args.iterations} iterations, "
          f"{args.threads} thread(s), CPU; our critic steps "
          f"{'after' if args.critic_in_turn or args.threads < 2 else 'beside'} the policy's")
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        workdir = Path(tmp)
        sizes = prepare(workdir, args.vocab_size, args.rollout_batch * (args.iterations + 1))
        sides = {"moss-rlhf": lambda: run_worker(sys.executable, script, "ours", workdir, argv, args.threads)}
        if not args.skip_trl:
            trl_python = str(ensure_trl_venv(TRL_VERSION))
            sides["trl"] = lambda: run_worker(trl_python, script, "trl", workdir, argv, args.threads)
        peaks = [gemm_peak(args.threads)]
        best = alternate(args.rounds, sides, "iteration")
        peaks.append(gemm_peak(args.threads))
    ours = best["moss-rlhf"]
    ours_s = steady(ours["step_s"])
    print(f"moss-rlhf: {ours_s:.3f} s/iteration ({phases(ours)}); mean response {ours['response_length']:.1f} tokens")
    if "trl" in best:
        trl = best["trl"]
        trl_s = steady(trl["step_s"])
        print(f"trl {trl['trl']}: {trl_s:.3f} s/iteration")
        fastest_ours, fastest_trl = min(ours["step_s"][1:] or ours["step_s"]), min(trl["step_s"][1:] or trl["step_s"])
        print(f"speed-up: moss-rlhf is {trl_s / ours_s:.2f}× faster than TRL PPO per iteration (medians); "
              f"fastest iterations {fastest_ours:.3f} vs {fastest_trl:.3f} s: {fastest_trl / fastest_ours:.2f}×")
    print_update_gflops("moss-rlhf", ours, sizes, peaks)


if __name__ == "__main__":
    main()
