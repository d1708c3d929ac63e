"""GRPO throughput in completions (samples) per second: moss-rlhf's RL stage with ``--preset grpo`` against TRL's
``GRPOTrainer`` (trl 1.16.0), side by side in one run, on the same model, tokenizer, prompts, group size, response
length, number of optimizer updates per step, KL setting and loss aggregation.

    python benchmarks/grpo_throughput.py [--iterations 6] [--threads 1] [--beta 0] [--loss-type dapo] [--compile]
                                         [--skip-trl]

What it does:
  1. trains a small byte-level BPE tokenizer on a synthetic corpus and saves one randomly initialised Llama of the
     ``tiny`` preset (``_rl_bench.prepare``, shared with ``ppo_throughput.py``); the policy and the reference start
     from it, and the reward model is the same checkpoint loaded as a sequence classifier with one label, on both
     sides;
  2. runs moss-rlhf's GRPO in a subprocess of this interpreter and TRL's GRPOTrainer in a subprocess of
     ``benchmarks/.venv-trl-1.16.0`` (built on first use by ``_trl_env.py``), alternating the two ``--rounds``
     times and keeping each one's best round;
  3. prints the median seconds per step (the first step, which pays one-off warm-up costs, left out) and the
     completions per second, each side's generate / score / update phases, the ratio, the ratio of the fastest steps,
     and each update phase's achieved GFLOP/s against the fp32 GEMM peak probed before and after the runs.

A step is one generation + update cycle: ``--rollout-batch`` prompts × ``--group`` completions each (default 16 × 4
= 64), sampled at temperature 1 up to ``--response-length`` tokens (stopping at the end token), scored by the reward
model, group-normalised advantages, then ``--epochs`` passes over the completions in mini-batches of
``--mini-batch`` completions, one optimizer update each (default: one update of all 64). TRL's geometry follows:
``per_device_train_batch_size = --mini-batch`` (one forward/backward per update, no gradient accumulation — its
fastest setting on one CPU process), ``steps_per_generation = completions / --mini-batch``, ``num_iterations =
--epochs``, so it makes the same number of optimizer steps per generation. KL: ``--beta`` (default 0.04) as the k3
estimator inside the loss on both sides (TRL's ``beta``, our ``kl_coef`` with ``kl_placement="loss"``), which loads
the reference model on both; ``--beta 0`` drops it on both. Loss aggregation: ``--loss-type grpo`` (TRL) ↔
``seq_mean_token_mean`` (ours), ``dapo`` ↔ ``token_mean``, ``dr_grpo`` ↔ ``seq_mean_token_sum_norm``. ``--compile``:
torch.compile on both sides — ours ``--compile`` (each model's blocks and the sampler's decode step), TRL's
``torch_compile=True`` (the Trainer compiles the model it trains) — with the first step, which compiles, printed
apart and, as always, left out of the medians.

Our phases come from the run's metrics (``time/generate_s``: the sampler; ``time/reward_s``: the reward model;
``time/score_s``: the reference; ``time/update_s``); TRL's step boundaries are ``on_step_end`` callbacks (every
``steps_per_generation × num_iterations``-th optimizer step closes a cycle), its generate phase is timed around
``GRPOTrainer._generate``, its score phase (old and reference log-probs, reward model, advantages) is the rest of
``_generate_and_score_completions``, and its update is the rest of the cycle. The last lines compare the phases that
do the same work: sampling, the reward model and reference forwards together, the update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rl_bench import (alternate, gemm_peak, our_run, phases, prepare, print_update_gflops,  # noqa: E402
                       prompt_texts, run_worker, steady)
from _trl_env import ensure_trl_venv  # noqa: E402

TRL_VERSION = "1.16.0"
LR = 3e-5  # the same learning rate on both sides (TRL's GRPO default is 1e-6, ours 3e-5)
# TRL's loss_type -> our loss_agg
LOSS_AGG = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=6, help="GRPO steps (generation + update) per implementation")
    p.add_argument("--rollout-batch", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (TRL's num_generations)")
    p.add_argument("--mini-batch", type=int, default=64, help="completions per optimizer update")
    p.add_argument("--epochs", type=int, default=1, help="passes over each step's completions (TRL's num_iterations)")
    p.add_argument("--response-length", type=int, default=32, help="longest completion in tokens")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss) on both sides; 0: no KL "
                                                            "and no reference model")
    p.add_argument("--loss-type", choices=tuple(LOSS_AGG), default="grpo",
                   help="TRL's loss_type; ours gets the matching loss_agg (grpo: seq_mean_token_mean, dapo: "
                        "token_mean, dr_grpo: seq_mean_token_sum_norm)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both implementations")
    p.add_argument("--compile", action="store_true", help="torch.compile on both sides (ours --compile, TRL's "
                                                          "torch_compile=True)")
    p.add_argument("--rounds", type=int, default=2, help="alternate the two implementations this many times and keep "
                                                         "each one's best round")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--skip-trl", action="store_true", help="time moss-rlhf only")
    p.add_argument("--skip-ours", action="store_true", help="time TRL only")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def completions_per_step(args) -> int:
    return args.rollout_batch * args.group


def updates_per_step(args) -> int:
    return completions_per_step(args) // args.mini_batch * args.epochs


# ----------------------------------------------------------------------------------------------------------- workers


def run_ours(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from moss_rlhf.stages import rl

    model, prompts = str(workdir / "model"), str(workdir / "prompts.jsonl")
    cfg = rl.RLConfig(out=str(workdir / "ours"), policy=model, reward_model=str(workdir / "reward"), prompts=[prompts],
                      eval_prompts=[prompts], eval_size=1, preset="grpo", group_size=args.group,
                      rollout_batch=args.rollout_batch, mini_batch=args.mini_batch, batch_size=args.mini_batch,
                      ppo_epochs=args.epochs, max_new_tokens=args.response_length, max_steps=args.iterations, lr=LR,
                      kl_coef=args.beta, kl_placement="loss", kl_estimator="k3", loss_agg=LOSS_AGG[args.loss_type],
                      eval_every=0, save_every=0, progress=False, device="cpu", best_metric="reward", overwrite=True,
                      compile=args.compile)
    rl.run(cfg)
    return our_run(workdir / "ours")


def trl_settings(args: argparse.Namespace) -> dict:
    """Every GRPOConfig field the benchmark sets (the rest stay TRL 1.16's defaults)."""
    return dict(
        use_cpu=True, bf16=False, fp16=False,  # fp32 on the CPU, as ours (GRPOConfig defaults to bf16=True)
        gradient_checkpointing=False,  # GRPOConfig turns it on by default: recomputation we do not do
        per_device_train_batch_size=args.mini_batch, gradient_accumulation_steps=1,
        steps_per_generation=completions_per_step(args) // args.mini_batch, num_generations=args.group,
        num_iterations=args.epochs, max_steps=args.iterations * updates_per_step(args),
        max_completion_length=args.response_length, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, use_bias_correction_kl=False,  # plain k3 in the loss (1.16 multiplies it by the ratio)
        loss_type=args.loss_type, learning_rate=LR, lr_scheduler_type="constant",
        logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=0, torch_compile=args.compile)


def run_trl(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    # conversational prompts: TRL applies the chat template (generation prompt) itself, as our stage does
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompt_texts(workdir)]})
    settings = trl_settings(args)
    cycle = updates_per_step(args)  # optimizer steps per generation
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % cycle == 0:  # global_step is already incremented here
                marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          # TRL loads a path as AutoModelForSequenceClassification(num_labels=1), with its tokenizer
                          reward_funcs=str(workdir / "reward"),
                          args=GRPOConfig(output_dir=str(workdir / "trl"), **settings), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])

    # Phase timers and update token counts, wrapped around the trainer's own methods.
    phase = {"generate_s": [], "generate_score_s": [], "forward_tokens": [], "head_tokens": [], "lengths": [],
             "completions": []}
    generate, generate_and_score, compute_loss = (trainer._generate, trainer._generate_and_score_completions,
                                                  trainer._compute_loss)

    def timed_generate(prompts):
        start = time.perf_counter()
        out = generate(prompts)
        phase["generate_s"].append(time.perf_counter() - start)
        phase["lengths"].extend(len(ids) for ids in out[1])  # completion_ids_list
        phase["completions"].append(len(out[1]))
        return out

    def timed_generate_and_score(inputs):
        start = time.perf_counter()
        out = generate_and_score(inputs)
        phase["generate_score_s"].append(time.perf_counter() - start)
        phase["forward_tokens"].append(0)
        phase["head_tokens"].append(0)
        return out

    def counted_compute_loss(model, inputs):
        rows, width = inputs["prompt_ids"].size(0), inputs["prompt_ids"].size(1) + inputs["completion_ids"].size(1)
        phase["forward_tokens"][-1] += rows * width
        # on the CPU TRL's fused head projects every position, not only the completion's (compact only on GPUs)
        phase["head_tokens"][-1] += rows * (width - 1)
        return compute_loss(model, inputs)

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_generate_and_score
    trainer._compute_loss = counted_compute_loss
    trainer.train()
    # the geometry check: TRL generated and trained on what ours does (its batch fields multiply in ways easy to
    # get wrong: per_device_train_batch_size × steps_per_generation completions per generation)
    expected = {"generations": [completions_per_step(args)] * args.iterations, "steps": args.iterations}
    seen = {"generations": phase["completions"], "steps": len(marks) - 1}
    if seen != expected:
        raise SystemExit(f"TRL's GRPO ran {seen}, not {expected}: the benchmark's GRPOConfig is wrong")
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"step_s": step_s, "generate_s": phase["generate_s"],
            "score_s": [t - g for t, g in zip(phase["generate_score_s"], phase["generate_s"])],
            "update_s": [s - t for s, t in zip(step_s, phase["generate_score_s"])],
            "forward_tokens": phase["forward_tokens"], "head_tokens": phase["head_tokens"],
            "response_length": statistics.mean(phase["lengths"]), "trl": trl.__version__,
            "ref_model": trainer.ref_model is not None, "settings": settings}


# -------------------------------------------------------------------------------------------------------------- main


def describe(name: str, run: dict, completions: int) -> str:
    s = steady(run["step_s"])
    return (f"{name}: {s:.3f} s/step = {completions / s:.1f} samples/s ({phases(run)} s); mean completion "
            f"{run['response_length']:.1f} tokens; first step {run['step_s'][0]:.1f} s")


def phase_ratios(ours: dict, trl: dict) -> str:
    """TRL's time over ours for the same work: sampling, the reward model and the reference (TRL's score phase, our
    reward and score phases), the update."""
    sampling = steady(trl["generate_s"]) / steady(ours["generate_s"])
    scoring = steady(trl["score_s"]) / (steady(ours["reward_s"]) + steady(ours["score_s"]))
    update = steady(trl["update_s"]) / steady(ours["update_s"])
    return (f"by phase, TRL's time / ours: sampling {sampling:.2f}×, reward model + reference {scoring:.2f}×, "
            f"update {update:.2f}×")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(Path(args.dir), args)
        print(json.dumps(result))
        return
    completions = completions_per_step(args)
    if completions % args.mini_batch:
        raise SystemExit(f"--mini-batch ({args.mini_batch}) must divide the completions per step "
                         f"({args.rollout_batch} × {args.group} = {completions})")
    if args.skip_ours and args.skip_trl:
        raise SystemExit("nothing to time: --skip-ours and --skip-trl")
    print(f"config: {args.rollout_batch} prompts × {args.group} completions = {completions} per step, up to "
          f"{args.response_length} new tokens, mini-batch {args.mini_batch}, {args.epochs} epoch(s) = "
          f"{updates_per_step(args)} optimizer update(s) per step, beta {args.beta} (k3 in the loss), loss "
          f"{args.loss_type} / {LOSS_AGG[args.loss_type]}, {args.iterations} steps, {args.threads} thread(s), CPU"
          f"{', torch.compile on both sides' if args.compile else ''}")
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        workdir = Path(tmp)
        sizes = prepare(workdir, args.vocab_size, args.rollout_batch * (args.iterations + 1))
        sides = {}
        if not args.skip_ours:
            sides["moss-rlhf"] = lambda: run_worker(sys.executable, script, "ours", workdir, argv, args.threads)
        if not args.skip_trl:
            trl_python = str(ensure_trl_venv(TRL_VERSION))
            sides["trl"] = lambda: run_worker(trl_python, script, "trl", workdir, argv, args.threads)
        peaks = [gemm_peak(args.threads)]
        best = alternate(args.rounds, sides, "step")
        peaks.append(gemm_peak(args.threads))

    ours, trl = best.get("moss-rlhf"), best.get("trl")
    if ours:
        print(describe("moss-rlhf", ours, completions))
    if trl:
        print(describe(f"trl {trl['trl']}", trl, completions))
    if ours and trl:
        ours_s, trl_s = steady(ours["step_s"]), steady(trl["step_s"])
        fastest_ours, fastest_trl = min(ours["step_s"][1:] or ours["step_s"]), min(trl["step_s"][1:] or trl["step_s"])
        print(f"speed-up: moss-rlhf makes {trl_s / ours_s:.2f}× TRL GRPO's samples/s (medians); fastest steps "
              f"{fastest_ours:.3f} vs {fastest_trl:.3f} s: {fastest_trl / fastest_ours:.2f}×")
        print(phase_ratios(ours, trl))
    if ours:
        print_update_gflops("moss-rlhf", ours, sizes, peaks)
    if trl:
        print_update_gflops(f"trl {trl['trl']}", trl, sizes, peaks)
        print(f"TRL GRPOConfig (fields set; the rest are defaults): "
              f"{', '.join(f'{k}={v!r}' for k, v in trl['settings'].items())}; reference model loaded: "
              f"{trl['ref_model']}")


if __name__ == "__main__":
    main()
