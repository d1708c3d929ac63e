"""DPO training throughput in preference pairs per second: moss-rlhf's ``dpo`` stage against TRL's ``DPOTrainer``
(trl 1.16.0), side by side in one run, on the same model, tokenizer, pairs (in the same order), batch, sequence
length, loss, optimizer and learning rate.

    python benchmarks/dpo_throughput.py --quick          # under a minute: checks that it works
    python benchmarks/dpo_throughput.py                  # 30 steps of 16 pairs, 2 alternating rounds
    python benchmarks/dpo_throughput.py --trl-precompute # TRL with precompute_ref_log_probs=True (not its default)
    python benchmarks/dpo_throughput.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz

What it does:
  1. builds one randomly initialised Llama of the ``tiny`` preset and its byte-level BPE tokenizer: by default
     ``_rl_bench.prepare`` (the synthetic corpus of the RL benchmarks), with ``--data`` a tokenizer trained on that
     file's texts (so that real text is not shredded into bytes); policy and reference of both sides start from it;
  2. writes ``--steps × --batch`` preference pairs: synthetic ones by default (prompt = the first 8 words of a corpus
     sentence, chosen = the rest of it and the next sentence, rejected = the same from another, random sentence), or
     the first pairs of ``--data`` (any format ``moss_rlhf.data.formats.load_preferences`` reads: HH-RLHF, MOSS-RLHF,
     ``{prompt, chosen, rejected}``) whose chosen and rejected sequences both fit in ``--max-len`` tokens — so neither
     side truncates anything (ours keeps a long sequence's end, TRL its start: they cannot be made to cut alike);
  3. runs our ``stages.dpo.run`` in a subprocess of this interpreter and TRL's ``DPOTrainer`` in a subprocess of
     ``benchmarks/.venv-trl-1.16.0`` (``_trl_env.py``), alternating the two ``--rounds`` times
     (``_rl_bench.alternate``) and keeping each one's best round;
  4. prints the median seconds per step (the first step, which pays one-off warm-up costs, left out:
     ``_rl_bench.steady``), the pairs per second, the one-off reference time, the tokens per step, the ratio ours /
     TRL of the medians and of the fastest steps, the first losses of both (the same pairs in the same order from the
     same weights with the same optimizer give the same losses: a check that both do the same computation), and the
     exact TRL ``DPOConfig`` fields set.

The same work on both sides. Both render a pair with the tokenizer's chat template, the prompt as a conversation
(TRL's conversational format: ``prompt`` a list of messages, ``chosen`` / ``rejected`` one assistant message), the
reply's log-prob summed over its tokens up to and including the turn end; both pad the batch's chosen and rejected
rows together to the longest and run the policy once over all ``2 × --batch`` rows; loss ``sigmoid``, β 0.1,
mean over the batch's pairs. TRL reads the pairs sequentially in the order of our ``BatchOrder`` (the parent writes
them so), so step k sees the same pairs on both sides. Optimizer on both: fused AdamW (TRL's default
``adamw_torch_fused``, ours ``fused=True`` on the CPU), betas (0.9, 0.95), eps 1e-8, no weight decay, gradient norm
clipped at 1.0, a constant learning rate of 1e-4 (ours: ``warmup_steps=0, min_lr_ratio=1.0``; TRL:
``lr_scheduler_type="constant"``), fp32 on the CPU, no gradient checkpointing (TRL's ``DPOConfig`` turns it on by
default: recomputation we do not do), dropout off (TRL's ``disable_dropout``; the model has none anyway), and
nothing logged, saved or evaluated inside the timed steps.

The reference. Ours scores every training pair once before training (``PairData.score_reference``: a no-grad pass
in batches of 2 × --batch pairs) and frees the reference model; that one-off time is printed separately and lies
outside every step. TRL 1.16's ``DPOTrainer`` by default (``precompute_ref_log_probs=False``) keeps a second copy of
the model and runs a no-grad reference forward over the batch inside every step: that is its default and what the
main ratio compares. ``--trl-precompute`` sets ``precompute_ref_log_probs=True`` (with
``precompute_ref_batch_size = 2 × --batch``, as ours) and times TRL's precompute (``_precompute_ref_logps``) apart
from the steps in the same way. An end-to-end figure (one-off reference + all steps) is printed for both as well.

Timing. A step is one whole iteration of each loop (collation, policy forward and backward, on TRL's default the
reference forward, loss, clipping, optimizer step, the loop's own bookkeeping). Ours: ``training.Trainee.step``
(clip + optimizer step + zero-grad, once per optimizer step) is wrapped inside the worker to record
``time.perf_counter()`` and ``time.process_time()`` when it returns, and the first batch request (the start of step
1) is recorded too; step k is the interval between consecutive marks. (``train_lm`` logs no per-step wall time, and
timing the whole ``dpo.run`` would add model loading, reference scoring, the final evaluation and saving.) TRL: a
``TrainerCallback`` marks the first ``on_step_begin`` and every ``on_step_end``. Tokenization and model loading are
outside on both sides; with ``log_every`` out of reach our loop still writes metrics at step 1 (TensorBoard is
imported beforehand, so that costs a file write) and at the last step (after the last mark). Per-step tokens
(positions incl. padding, non-pad tokens, reply tokens) and losses are read by thin wrappers around the batch
function and the loss (ours) and ``compute_loss`` (TRL) — a tensor sum and a ``float()`` per step. Pairs per
CPU-second (the process's CPU time over the same steps) is printed as the steadier figure on a busy machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rl_bench import alternate, prepare, run_worker, steady, synthetic_corpus  # noqa: E402
from _trl_env import ensure_trl_venv  # noqa: E402

TRL_VERSION = "1.16.0"
LR = 1e-4  # the same constant learning rate on both sides (large enough that the losses move visibly)
BETA = 0.1
ADAM = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "max_grad_norm": 1.0, "weight_decay": 0.0}
PROMPT_WORDS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per implementation and round")
    p.add_argument("--batch", type=int, default=16, help="preference pairs per optimizer step (one micro-batch)")
    p.add_argument("--max-len", type=int, default=256, help="longest prompt + reply in tokens (TRL's max_length); "
                                                            "pairs that do not fit are left out")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both implementations")
    p.add_argument("--rounds", type=int, default=2, help="alternate the two implementations this many times and keep "
                                                         "each one's best round")
    p.add_argument("--data", help="a preference file instead of the synthetic pairs (e.g. "
                                  "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--trl-precompute", action="store_true",
                   help="TRL with precompute_ref_log_probs=True (default: its default, a reference forward per step)")
    p.add_argument("--quick", action="store_true", help="6 steps of 8 pairs, 1 round: checks that it works")
    p.add_argument("--skip-trl", action="store_true", help="time moss-rlhf only")
    p.add_argument("--skip-ours", action="store_true", help="time TRL only")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.rounds = 6, 8, 1
    return args


# ------------------------------------------------------------------------------------------------------------ data


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs from the synthetic corpus: prompt = a sentence's first words, chosen = the rest of it and the
    sentence after it, rejected = the same from another sentence."""
    rng = random.Random(seed)
    texts = synthetic_corpus()
    starts = [i for i in range(len(texts) - 1) if len(texts[i].split()) > PROMPT_WORDS + 1]
    if 2 * n > len(starts):
        raise SystemExit(f"--steps × --batch = {n} pairs: the synthetic corpus gives at most {len(starts) // 2}")
    picked = rng.sample(starts, 2 * n)
    pairs = []
    for a, b in zip(picked[:n], picked[n:]):
        words = texts[a].split()
        pairs.append({"prompt": [{"role": "user", "content": " ".join(words[:PROMPT_WORDS])}],
                      "chosen": " ".join(words[PROMPT_WORDS:]) + " " + texts[a + 1],
                      "rejected": " ".join(texts[b].split()[PROMPT_WORDS:]) + " " + texts[b + 1]})
    return pairs


def file_pairs(path: str) -> list[dict]:
    """Every pair of a preference file, its prompt as a conversation."""
    from moss_rlhf.data.formats import load_preferences

    return [{"prompt": [dict(m) for m in p.prompt], "chosen": p.chosen, "rejected": p.rejected}
            for p in load_preferences(path)]


def prepare_for_texts(workdir: Path, texts: list[str], vocab_size: int) -> None:
    """Like ``_rl_bench.prepare`` (tokenizer + one randomly initialised ``tiny`` Llama in ``workdir/model``), with the
    tokenizer trained on ``texts`` (``--data``'s prompts and replies) and no reward model."""
    from moss_rlhf.models import build_causal_lm, quiet_transformers
    from moss_rlhf.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_causal_lm("tiny", tokenizer, seed=0)
    with quiet_transformers(notices=False):
        model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    print(f"model: tiny Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary "
          f"{len(tokenizer)} (trained on --data), d={model.config.hidden_size}")


def write_data(workdir: Path, args: argparse.Namespace) -> dict:
    """Builds the model and writes the pairs: ``pairs.jsonl`` (ours), ``eval.jsonl`` (our end-of-run evaluation:
    the first --batch pairs, outside the timed steps) and ``trl_rows.jsonl`` (TRL: the pairs in the order our
    ``BatchOrder`` reads them, one row per pair read). Returns what the summary prints about the data."""
    from moss_rlhf.data.collate import BatchOrder, reply_example
    from moss_rlhf.tokenizer import load_tokenizer

    wanted = args.steps * args.batch
    if args.data:
        candidates = file_pairs(args.data)
        texts = [m["content"] for p in candidates for m in p["prompt"]] + \
                [p[k] for p in candidates for k in ("chosen", "rejected")]
        prepare_for_texts(workdir, texts, args.vocab_size)
    else:
        prepare(workdir, args.vocab_size, n_prompts=1)
        candidates = synthetic_pairs(wanted)
    tokenizer = load_tokenizer(str(workdir / "model"))

    def length(pair: dict, key: str) -> int:
        return len(reply_example(tokenizer, pair["prompt"], pair[key], 1 << 30).input_ids)

    pairs, seen, longest = [], 0, 0
    for pair in candidates:
        if len(pairs) == wanted:
            break
        seen += 1
        lengths = (length(pair, "chosen"), length(pair, "rejected"))
        if max(lengths) <= args.max_len:
            pairs.append(pair)
            longest = max(longest, *lengths)
    if len(pairs) < args.batch:
        raise SystemExit(f"only {len(pairs)} pairs fit in --max-len {args.max_len}: fewer than one batch")
    order = BatchOrder(len(pairs), args.batch, 1, 1, 0)  # our DPOConfig's seed 0, one process
    rows = [pairs[i] for step in range(args.steps) for i in order.indices(step, 0, 0)]

    def dump(name: str, items: list[dict]) -> None:
        (workdir / name).write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")

    dump("pairs.jsonl", pairs)
    dump("eval.jsonl", pairs[:args.batch])
    dump("trl_rows.jsonl", rows)
    return {"pairs": len(pairs), "seen": seen, "longest": longest, "epochs": len(rows) / len(pairs)}


# ----------------------------------------------------------------------------------------------------------- workers


def run_ours(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    try:  # our loop creates its TensorBoard writer at step 1's log: import it now, not inside step 2
        import torch.utils.tensorboard
    except ImportError:
        pass
    from moss_rlhf import training
    from moss_rlhf.data.collate import IGNORE, TokenData
    from moss_rlhf.stages import dpo

    marks, cpu, tokens, losses, reference, attn = [], [], [], [], [], []

    def mark() -> None:
        marks.append(time.perf_counter())
        cpu.append(time.process_time())

    optimizer_step = training.Trainee.step

    def timed_step(self, *a, **kw):
        out = optimizer_step(self, *a, **kw)
        mark()  # the end of an optimizer step
        return out

    def token_data(self):
        def batch(indices):
            if not marks:
                mark()  # the start of step 1
            out = self.batch(indices)
            tokens.append((out["input_ids"].numel(), int(out["attention_mask"].sum()),
                           int((out["labels"][:, 1:] != IGNORE).sum())))
            return out

        return TokenData(len(self), batch)

    score_reference = dpo.PairData.score_reference

    def timed_score(self, *a, **kw):
        start = time.perf_counter()
        score_reference(self, *a, **kw)
        reference.append((len(self), time.perf_counter() - start))

    call = dpo.PreferenceLoss.__call__

    def recorded_loss(self, model, batch):
        loss = call(self, model, batch)  # summed over the micro-batch's pairs
        losses.append(float(loss.detach()) / batch["reference"].shape[0])
        return loss

    load = dpo.load_causal_lm

    def noted_load(*a, **kw):
        model = load(*a, **kw)
        attn.append(model.config._attn_implementation)
        return model

    training.Trainee.step, dpo.PairData.token_data = timed_step, token_data
    dpo.PairData.score_reference, dpo.PreferenceLoss.__call__ = timed_score, recorded_loss
    dpo.load_causal_lm = noted_load
    cfg = dpo.DPOConfig(out=str(workdir / "ours"), model=str(workdir / "model"), data=[str(workdir / "pairs.jsonl")],
                        eval_data=[str(workdir / "eval.jsonl")], loss="sigmoid", beta=BETA, max_len=args.max_len,
                        batch_size=args.batch, grad_accum=1, max_steps=args.steps, lr=LR, warmup_steps=0,
                        min_lr_ratio=1.0, weight_decay=ADAM["weight_decay"], beta1=ADAM["beta1"],
                        beta2=ADAM["beta2"], max_grad_norm=ADAM["max_grad_norm"], precision="fp32", eval_every=0,
                        save_every=0, log_every=10 ** 9, progress=False, device="cpu", overwrite=True, seed=0,
                        kl_prompts=0)  # TRL has no sampled-KL monitor
    dpo.run(cfg)
    step_s = [b - a for a, b in itertools.pairwise(marks)]
    return {"step_s": step_s, "cpu_s": [b - a for a, b in itertools.pairwise(cpu)], "losses": losses,
            "tokens": tokens[:len(step_s)], "ref_pairs": reference[0][0], "ref_s": reference[0][1],
            "ref_eval_s": sum(s for _, s in reference[1:]), "attn": attn[-1], "ref_per_step": False,
            "torch": torch.__version__}


def trl_settings(args: argparse.Namespace) -> dict:
    """Every DPOConfig field the benchmark sets (the rest stay TRL 1.16's defaults)."""
    settings = dict(
        use_cpu=True, bf16=False, fp16=False,  # fp32 on the CPU, as ours (DPOConfig defaults to bf16=True)
        gradient_checkpointing=False,  # DPOConfig turns it on by default: recomputation we do not do
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        loss_type=["sigmoid"], beta=BETA, max_length=args.max_len,
        precompute_ref_log_probs=args.trl_precompute,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=ADAM["weight_decay"],
        adam_beta1=ADAM["beta1"], adam_beta2=ADAM["beta2"], adam_epsilon=ADAM["eps"],
        max_grad_norm=ADAM["max_grad_norm"],
        train_sampling_strategy="sequential",  # the rows are already in our BatchOrder
        logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    if args.trl_precompute:
        settings["precompute_ref_batch_size"] = 2 * args.batch  # ours scores the reference 2 × --batch pairs at once
    return settings


def run_trl(workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    rows = [json.loads(line) for line in (workdir / "trl_rows.jsonl").read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = trl_settings(args)
    marks, cpu, tokens, losses, reference = [], [], [], [], []

    def mark() -> None:
        marks.append(time.perf_counter())
        cpu.append(time.process_time())

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if not marks:
                mark()

        def on_step_end(self, _args, state, control, **kwargs):
            mark()

    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, data, name, batch_size):
        start = time.perf_counter()
        out = precompute(self, data, name, batch_size)
        reference.append((len(data), time.perf_counter() - start))
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # called inside __init__
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(workdir / "trl"), **settings),
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    compute_loss = trainer.compute_loss

    def counted_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens.append((inputs["input_ids"].numel(), int(inputs["attention_mask"].sum()),
                       int(inputs["completion_mask"].sum())))
        loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    trainer.compute_loss = counted_loss
    trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(marks)]
    return {"step_s": step_s, "cpu_s": [b - a for a, b in itertools.pairwise(cpu)], "losses": losses,
            "tokens": tokens[:len(step_s)], "ref_pairs": reference[0][0] if reference else 0,
            "ref_s": reference[0][1] if reference else 0.0, "ref_per_step": not args.trl_precompute,
            "ref_model": trainer.ref_model is not None, "attn": model.config._attn_implementation,
            "optim": str(trainer.args.optim), "trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "settings": settings}


# -------------------------------------------------------------------------------------------------------------- main


def describe(name: str, run: dict, batch: int) -> str:
    s, fastest, cpu = steady(run["step_s"]), min(run["step_s"][1:] or run["step_s"]), steady(run["cpu_s"])
    positions, nonpad, reply = (statistics.mean(t[i] for t in run["tokens"]) for i in range(3))
    if run["ref_per_step"]:
        ref = "reference forward inside every step (no one-off)"
    else:
        ref = f"reference log-probs one-off {run['ref_s']:.3f} s for {run['ref_pairs']} pairs (outside the steps)"
    return (f"{name}: {s:.4f} s/step = {batch / s:.1f} pairs/s (fastest step {fastest:.4f} s = {batch / fastest:.1f}"
            f" pairs/s; {batch / cpu:.1f} pairs per CPU-second); {ref}; tokens per step: {positions:,.0f} positions "
            f"(padding incl.), {nonpad:,.0f} non-pad, {reply:,.0f} reply")


def end_to_end(run: dict, batch: int) -> float:
    """Pairs per second over one-off reference + all steps of the run."""
    return batch * len(run["step_s"]) / (run["ref_s"] + sum(run["step_s"]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(Path(args.dir), args)
        print(json.dumps(result))
        return
    if args.skip_ours and args.skip_trl:
        raise SystemExit("nothing to time: --skip-ours and --skip-trl")
    if args.max_len > 512:
        raise SystemExit("--max-len: the tiny preset has 512 positions")
    print(f"config: {args.batch} pairs per step ({2 * args.batch} rows: chosen + rejected), {args.steps} steps, "
          f"max_len {args.max_len}, loss sigmoid, beta {BETA}, lr {LR} constant, fp32, {args.threads} thread(s), "
          f"CPU; TRL reference: {'precomputed' if args.trl_precompute else 'a forward per step (its default)'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    script = str(Path(__file__).resolve())
    every: dict[str, list[dict]] = {}

    def side(name: str, python: str, worker: str):
        def run() -> dict:
            result = run_worker(python, script, worker, workdir, argv, args.threads)
            every.setdefault(name, []).append(result)
            return result
        return run

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        workdir = Path(tmp)
        data = write_data(workdir, args)
        source = args.data or "synthetic pairs"
        print(f"data: {data['pairs']} pairs from {source} ({data['seen'] - data['pairs']} of the first "
              f"{data['seen']} left out for not fitting in {args.max_len} tokens; longest sequence "
              f"{data['longest']}), {data['epochs']:.2f} epoch(s)")
        sides = {}
        if not args.skip_ours:
            sides["moss-rlhf"] = side("moss-rlhf", sys.executable, "ours")
        if not args.skip_trl:
            sides["trl"] = side("trl", str(ensure_trl_venv(TRL_VERSION)), "trl")
        best = alternate(args.rounds, sides, "step")

    ours, trl = best.get("moss-rlhf"), best.get("trl")
    if ours:
        print(describe("moss-rlhf", ours, args.batch))
    if trl:
        print(describe(f"trl {trl['trl']} DPOTrainer", trl, args.batch))
    if ours and trl:
        ours_s, trl_s = steady(ours["step_s"]), steady(trl["step_s"])
        fastest_ours, fastest_trl = min(ours["step_s"][1:] or ours["step_s"]), min(trl["step_s"][1:] or trl["step_s"])
        per_round = [steady(t["step_s"]) / steady(o["step_s"]) for o, t in zip(every["moss-rlhf"], every["trl"])]
        print(f"speed-up: moss-rlhf makes {trl_s / ours_s:.2f}× TRL DPOTrainer's pairs/s (medians, best rounds); "
              f"fastest steps {fastest_ours:.4f} vs {fastest_trl:.4f} s: {fastest_trl / fastest_ours:.2f}×; per "
              f"CPU-second {steady(trl['cpu_s']) / steady(ours['cpu_s']):.2f}×; round by round "
              f"{', '.join(f'{r:.2f}×' for r in per_round)}")
        print(f"end to end (one-off reference + all {args.steps} steps): moss-rlhf {end_to_end(ours, args.batch):.1f}"
              f" pairs/s, trl {end_to_end(trl, args.batch):.1f} pairs/s: "
              f"{end_to_end(ours, args.batch) / end_to_end(trl, args.batch):.2f}×")
        n = min(len(ours["losses"]), len(trl["losses"]))
        diff = max(abs(a - b) for a, b in zip(ours["losses"][:n], trl["losses"][:n]))
        same_rows = [t[:2] for t in ours["tokens"]] == [t[:2] for t in trl["tokens"]]
        print(f"losses, steps 1-4: moss-rlhf {', '.join(f'{x:.6f}' for x in ours['losses'][:4])}; trl "
              f"{', '.join(f'{x:.6f}' for x in trl['losses'][:4])}; largest difference over {n} steps {diff:.2e}; "
              f"positions and non-pad tokens identical at every step: {same_rows}; reply tokens per step (where "
              f"the log-probs are summed) {statistics.mean(t[2] for t in ours['tokens']):,.0f} ours vs "
              f"{statistics.mean(t[2] for t in trl['tokens']):,.0f} TRL")
    for name, run in (("moss-rlhf", ours), ("trl", trl)):
        if run:
            print(f"{name} rounds: " + "; ".join(f"{steady(r['step_s']):.4f} s/step" for r in every[name]) +
                  f"; attention {run['attn']}, torch {run['torch']}")
    if trl:
        print(f"trl: transformers {trl['transformers']}, optim {trl['optim']}, reference model kept in memory: "
              f"{trl['ref_model']}")
        print(f"TRL DPOConfig (fields set; the rest are defaults): "
              f"{', '.join(f'{k}={v!r}' for k, v in trl['settings'].items())}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
