"""Training throughput on CPU: our pretraining loop's model-FLOPs utilisation, and our SFT loop against TRL's.

One run prints, side by side (ratios, since the machine is shared and noisy):

1. the machine's measured fp32 matmul peak — a 2048×2048 @ 2048×2048 GEMM, best of several, probed at the start,
   between phases and at the end; the best probe is the peak every MFU figure is divided by;
2. pretraining the ``small`` preset (Llama, ~14M parameters, 8k vocabulary) with our real loop
   (``training.train_lm`` with ``stages.pretrain``'s packed data and loss) on the demo world's corpus: tokens/s and
   MFU, model FLOPs per token = 6·(N + V·d) + 12·L·d·T (N: parameters outside the embedding, V·d: the tied output
   projection, 12·L·d·T: attention scores and values over the full T×T square, as in PaLM's appendix B);
3. SFT throughput, ours (``training.train_lm`` with ``collate.conversation_data`` and ``target_loss``) against TRL's
   ``SFTTrainer``: the same initial weights (``save_pretrained``), the same tokenized conversations in the same
   order (TRL reads them sequentially in our ``BatchOrder``), the same 16 conversations per step, the same number of
   steps, fp32, the same thread count. Four variants, each side in its padded and its padding-free layout:
   ours default (``pack=True``: each batch packed into rows, examples isolated by restarting ``position_ids``) and
   ours with ``pack=False`` (padding to the batch's longest); TRL's default collation (padding to the longest) and
   TRL with ``padding_free=True`` (the batch flattened into one row with ``position_ids``). All four compute the same
   loss (first-step losses printed). The figure that counts is **non-pad tokens/s** — conversation tokens trained
   per second, the same tokens for every variant; positions computed per second (padding included) show the layout.
   TRL runs in ``benchmarks/.venv-trl-1.16.0`` (see ``_trl_env.py``) in a subprocess; the variants alternate, round
   after round, so that a busy moment on the machine hits them all.

A timed window starts after warm-up steps. Our step boundaries are the moments the loop asks for the next batch;
TRL's are its ``on_step_end`` callbacks — both cover whole steps (data, forward, backward, clipping, optimizer).

    python benchmarks/train_throughput.py --quick    # a minute or two
    python benchmarks/train_throughput.py            # a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trl_env import ensure_trl_venv  # noqa: E402

from moss_rlhf import distributed  # noqa: E402
from moss_rlhf.checkpoint import seed_everything  # noqa: E402
from moss_rlhf.data.collate import BatchOrder, TokenData, chat_example, conversation_data, pack_texts  # noqa: E402
from moss_rlhf.data.formats import DataError, load_conversations, load_preferences, load_texts  # noqa: E402
from moss_rlhf.demo.world import ensure_world  # noqa: E402
from moss_rlhf.models import build_causal_lm, load_causal_lm, save_model  # noqa: E402
from moss_rlhf.runs import RunDir  # noqa: E402
from moss_rlhf.stages.pretrain import PretrainConfig, causal_data  # noqa: E402
from moss_rlhf.stages.sft import SFTConfig  # noqa: E402
from moss_rlhf.tokenizer import train_tokenizer  # noqa: E402
from moss_rlhf.training import causal_loss, target_loss, train_lm  # noqa: E402

PRESET = "small"
VOCAB = 8192


# ---------------------------------------------------------------------------------------------------- measurements


def matmul_peak_gflops(size: int = 2048, repeats: int = 6) -> float:
    """Best-of fp32 GEMM rate on this process's threads, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # first call pays for thread start-up and page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


@dataclass
class Window:
    """Whole optimizer steps timed after warm-up: their duration and the tokens they processed."""
    seconds: float
    steps: int
    padded_tokens: int
    real_tokens: int
    cpu_seconds: float  # CPU time of the process over the window: robust to being descheduled on a busy machine
    first_loss: float | None = None

    @property
    def padded_per_s(self) -> float:
        return self.padded_tokens / self.seconds

    @property
    def real_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def real_per_cpu_s(self) -> float:
        return self.real_tokens / self.cpu_seconds


@dataclass
class StepClock:
    """Wraps a ``TokenData``: with one micro-batch per step, the loop asks for a batch exactly when a step starts."""
    data: TokenData
    pad_id: int
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    padded: list[int] = field(default_factory=list)
    real: list[int] = field(default_factory=list)

    def token_data(self) -> TokenData:
        def batch(indices: list[int]) -> dict[str, torch.Tensor]:
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            out = self.data.batch(indices)
            self.padded.append(out["input_ids"].numel())
            self.real.append(int((out["input_ids"] != self.pad_id).sum()))
            return out

        return TokenData(len(self.data), batch)

    def window(self, warmup: int, steps: int) -> Window:
        return Window(self.times[warmup + steps] - self.times[warmup], steps,
                      sum(self.padded[warmup:warmup + steps]), sum(self.real[warmup:warmup + steps]),
                      self.cpu_times[warmup + steps] - self.cpu_times[warmup])


def model_flops_per_token(model, seq_len: int) -> float:
    """6·(N + V·d) + 12·L·d·T training FLOPs per token (forward + backward, matmuls only)."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    n_outside_embedding = sum(p.numel() for p in model.parameters()) - embedding.numel()
    head = embedding.numel() if config.tie_word_embeddings else 0  # an untied head is already inside N
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * (n_outside_embedding + head) + attention


def quiet_config(cls, out: Path, steps: int, batch_size: int, **extra):
    """A stage config for a timed run: no evaluation, no intermediate checkpoints, no progress bar, rare logging."""
    return cls(out=str(out), max_steps=steps, batch_size=batch_size, grad_accum=1, eval_every=0, save_every=0,
               log_every=10 ** 9, progress=False, device="cpu", data=["(in memory)"], overwrite=True, **extra)


# ---------------------------------------------------------------------------------------------------- pretraining


def bench_pretrain(tokenizer, texts: list[str], args, work: Path) -> tuple[Window, float]:
    cfg = quiet_config(PretrainConfig, work / "pretrain", args.warmup + args.steps + 1, args.pretrain_batch,
                       seq_len=args.seq_len, model=PRESET)
    seed_everything(cfg.seed)
    model = build_causal_lm(PRESET, tokenizer, cfg.seed)
    rows = pack_texts(tokenizer, texts, cfg.seq_len)
    clock = StepClock(causal_data(rows), tokenizer.pad_token_id)
    dist = distributed.init("cpu")
    train_lm(cfg, model, tokenizer, train=clock.token_data(), loss_fn=causal_loss,
             run=RunDir(cfg.out, cfg, overwrite=cfg.overwrite), dist=dist, desc="pretrain")
    window = clock.window(args.warmup, args.steps)
    window.real_tokens = window.padded_tokens  # packed rows hold no padding
    return window, model_flops_per_token(model, cfg.seq_len)


# ---------------------------------------------------------------------------------------------------- SFT

TRL_SCRIPT = r'''
import json, sys, time
import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
import transformers, trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

rows = [json.loads(line) for line in open(spec["data"])]
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)

class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.cpu_times = [], []
    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

clock = Clock()
args = SFTConfig(
    output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
    max_steps=spec["steps"], learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
    adam_beta1=spec["beta1"], adam_beta2=spec["beta2"], max_grad_norm=spec["max_grad_norm"],
    lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"],
    bf16=False, fp16=False, use_cpu=True,
    # SFTConfig turns gradient checkpointing on by default; off (the default here), it does the same work as we do
    gradient_checkpointing=spec["gradient_checkpointing"],
    # the rows are already cut to max_len; TRL refuses max_length with padding_free (it could not enforce it)
    max_length=None if spec["padding_free"] else spec["max_len"], packing=False, padding_free=spec["padding_free"],
    train_sampling_strategy="sequential",
    logging_steps=10 ** 6, logging_first_step=True, save_strategy="no", eval_strategy="no", report_to="none",
    disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"],
)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     callbacks=[clock])
trainer.train()
first_loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
json.dump({"times": clock.times, "cpu_times": clock.cpu_times, "first_loss": first_loss, "trl": trl.__version__,
           "transformers": transformers.__version__, "torch": torch.__version__,
           "attn": model.config._attn_implementation, "optim": str(args.optim), "loss_type": args.loss_type},
          open(spec["result"], "w"))
'''


def sft_conversations(path: str) -> list:
    """A conversation file as is; a preference file (e.g. Anthropic HH-RLHF) as its prompts with the chosen reply."""
    try:
        return load_conversations(path)
    except DataError:
        return [list(p.prompt) + [{"role": "assistant", "content": p.chosen}] for p in load_preferences(path)]


def sft_examples(tokenizer, conversations: list, cfg: SFTConfig) -> list:
    """The tokenized examples exactly as ``conversation_data`` builds them (same filter), for TRL's copy."""
    examples = [chat_example(tokenizer, conv, cfg.max_len) for conv in conversations]
    return [e for e in examples if any(label != -100 for label in e.labels[1:])]


def bench_sft_ours(model_dir: Path, tokenizer, conversations: list, cfg: SFTConfig, args) -> Window:
    seed_everything(cfg.seed)
    model = load_causal_lm(str(model_dir))
    clock = StepClock(conversation_data(tokenizer, conversations, cfg.max_len, cfg.pack, cfg.seq_len),
                      tokenizer.pad_token_id)
    dist = distributed.init("cpu")
    run = RunDir(cfg.out, cfg, overwrite=cfg.overwrite)
    train_lm(cfg, model, tokenizer, train=clock.token_data(), loss_fn=target_loss, run=run, dist=dist, desc="sft")
    first = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]
    window = clock.window(args.warmup, args.steps)
    window.first_loss = first
    return window


def bench_sft_trl(python: Path, model_dir: Path, rows: list[dict], cfg: SFTConfig, args, work: Path,
                  checkpointing: bool = False, padding_free: bool = False) -> tuple[Window, dict]:
    data_path, script_path, spec_path, result_path = (work / n for n in ("trl.jsonl", "trl_sft.py", "spec.json",
                                                                         "result.json"))
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script_path.write_text(TRL_SCRIPT)
    spec = dict(model=str(model_dir), data=str(data_path), out=str(work / "trl_out"), result=str(result_path),
                batch_size=cfg.batch_size, steps=cfg.max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                beta1=cfg.beta1, beta2=cfg.beta2, max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps,
                max_len=cfg.max_len, seed=cfg.seed, threads=args.threads, gradient_checkpointing=checkpointing,
                padding_free=padding_free)
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(python), str(script_path), str(spec_path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the TRL run failed:\n{done.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    times, cpu_times = result["times"], result["cpu_times"]
    # on_step_end of step w (1-based) to that of step w+n covers 0-based steps w .. w+n-1
    batches = [rows[s * cfg.batch_size:(s + 1) * cfg.batch_size] for s in range(args.warmup, args.warmup + args.steps)]
    real = sum(len(r["input_ids"]) for b in batches for r in b)
    padded = real if padding_free else sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    end, start = args.warmup + args.steps - 1, args.warmup - 1
    window = Window(times[end] - times[start], args.steps, padded, real, cpu_times[end] - cpu_times[start],
                    result["first_loss"])
    return window, result


def trl_rows(examples: list, cfg: SFTConfig, steps: int) -> list[dict]:
    """The examples in the order our loop reads them (``BatchOrder``), one row per example read."""
    order = BatchOrder(len(examples), cfg.batch_size, 1, 1, cfg.seed)
    return [{"input_ids": examples[i].input_ids, "labels": examples[i].labels}
            for step in range(steps) for i in order.indices(step, 0, 0)]


# ---------------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, one round (a minute or two)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads on both sides (default: the cores this process may use)")
    parser.add_argument("--seq-len", type=int, default=256, help="pretraining sequence length")
    parser.add_argument("--pretrain-batch", type=int, default=8, help="pretraining sequences per step")
    parser.add_argument("--sft-batch", type=int, default=16, help="SFT conversations per step")
    parser.add_argument("--rounds", type=int, default=0, help="alternating SFT rounds (default: 1 quick, 3)")
    parser.add_argument("--skip-trl", action="store_true", help="time our loops only")
    parser.add_argument("--skip-pretrain", action="store_true", help="time SFT only (no MFU figure)")
    parser.add_argument("--trl-checkpointing", action="store_true",
                        help="also time TRL with SFTConfig's default gradient checkpointing")
    parser.add_argument("--sft-data", default="",
                        help="SFT conversations to time on instead of the demo world's (any conversation file); an "
                             "Anthropic HH-RLHF file gives its chosen dialogues")
    parser.add_argument("--work", default="", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    args.warmup, args.steps = (1, 3) if args.quick else (3, 10)
    args.rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="moss-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        size = "quick" if args.quick else "default"
        world = ensure_world(work / "world", 0, size)
        texts = load_texts(str(world / "pretrain.jsonl"))
        conversations = (sft_conversations(args.sft_data) if args.sft_data
                         else load_conversations(str(world / "sft.jsonl")))
        print(f"threads {args.threads}, torch {torch.__version__}, demo world ({size}): {len(texts)} documents; "
              f"{len(conversations)} SFT conversations from {args.sft_data or 'the demo world'}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        tokenizer = train_tokenizer(texts + [m["content"] for c in conversations for m in c], VOCAB)
        trl_python = None if args.skip_trl else ensure_trl_venv()

        peaks = [matmul_peak_gflops()]
        print(f"fp32 GEMM peak: {peaks[-1]:.1f} GFLOP/s", flush=True)
        pre, flops_per_token = None, 0.0
        if not args.skip_pretrain:
            pre, flops_per_token = bench_pretrain(tokenizer, texts, args, work)
            peaks.append(matmul_peak_gflops())
            print(f"pretrain {PRESET}: {pre.padded_per_s:,.0f} tokens/s ({pre.steps} steps × "
                  f"{args.pretrain_batch}×{args.seq_len}), GEMM probe after: {peaks[-1]:.1f} GFLOP/s", flush=True)

        init_dir = work / "sft_init"
        save_model(build_causal_lm(PRESET, tokenizer, 0), tokenizer, init_dir)
        base_cfg = dict(model=str(init_dir), max_len=256, seq_len=256)
        steps = args.warmup + args.steps + 1
        configs = {pack: quiet_config(SFTConfig, work / f"sft-pack-{pack}", steps, args.sft_batch, pack=pack,
                                      **base_cfg) for pack in (True, False)}
        examples = sft_examples(tokenizer, conversations, configs[True])
        rows = trl_rows(examples, configs[True], steps)
        variants: dict[str, Callable[[], Window]] = {
            OURS_PACKED: lambda: bench_sft_ours(init_dir, tokenizer, conversations, configs[True], args),
            OURS_PADDED: lambda: bench_sft_ours(init_dir, tokenizer, conversations, configs[False], args),
        }
        if trl_python is not None:
            variants[TRL_PADDED] = lambda: bench_sft_trl(trl_python, init_dir, rows, configs[False], args, work)
            variants[TRL_PADDING_FREE] = lambda: bench_sft_trl(trl_python, init_dir, rows, configs[False], args,
                                                               work, padding_free=True)
            if args.trl_checkpointing:
                variants[TRL_CHECKPOINTING] = lambda: bench_sft_trl(trl_python, init_dir, rows, configs[False], args,
                                                                    work, checkpointing=True)
        runs: dict[str, list[Window]] = {name: [] for name in variants}
        trl_info: dict = {}
        for r in range(args.rounds):
            for name, bench in variants.items():
                result = bench()
                if isinstance(result, tuple):
                    result, trl_info = result
                runs[name].append(result)
                print(f"sft round {r + 1} {name:<28} {result.real_per_s:>8,.0f} non-pad tokens/s, "
                      f"{result.padded_per_s:>8,.0f} positions/s", flush=True)
            peaks.append(matmul_peak_gflops())
        report(peaks, pre, flops_per_token, runs, trl_info, args.threads)


OURS_PACKED, OURS_PADDED = "ours, packed (default)", "ours, padded"
TRL_PADDED, TRL_PADDING_FREE = "TRL, padded (default)", "TRL, padding_free=True"
TRL_CHECKPOINTING = "TRL, padded + grad. ckpt"
RATIOS = ((OURS_PACKED, TRL_PADDED, "defaults: ours / TRL"),
          (OURS_PACKED, TRL_PADDING_FREE, "padding-free: ours packed / TRL"),
          (OURS_PADDED, TRL_PADDED, "padded: ours / TRL"),
          (OURS_PACKED, OURS_PADDED, "ours: packed / padded"),
          (OURS_PACKED, TRL_CHECKPOINTING, "ours default / TRL out of the box"))


def report(peaks: list[float], pre: Window | None, flops_per_token: float, runs: dict[str, list[Window]],
           trl_info: dict, threads: int) -> None:
    peak = max(peaks)
    print()
    print("=" * 78)
    print(f"{'measure':<44}{'value':>34}")
    print("-" * 78)
    print(f"{'fp32 GEMM peak (best of ' + str(len(peaks)) + ' probes), GFLOP/s':<44}{peak:>34.1f}")
    print(f"{'  probes, GFLOP/s':<44}{', '.join(f'{p:.0f}' for p in peaks):>34}")
    if pre is not None:
        achieved = pre.padded_per_s * flops_per_token / 1e9
        print(f"{'pretrain ' + PRESET + ' tokens/s':<44}{pre.padded_per_s:>34,.0f}")
        print(f"{'  model FLOPs/token 6(N+Vd)+12LdT, MFLOP':<44}{flops_per_token / 1e6:>34.1f}")
        print(f"{'  achieved model GFLOP/s':<44}{achieved:>34.1f}")
        print(f"{'  MFU (of the measured peak)':<44}{achieved / peak:>34.1%}")
        # the same with the CPU time the process got (per thread) instead of wall time: what MFU would be if no
        # other process had taken the cores away; on an idle machine both lines agree
        achieved_cpu = pre.padded_tokens / (pre.cpu_seconds / threads) * flops_per_token / 1e9
        print(f"{'  MFU by CPU time received':<44}{achieved_cpu / peak:>34.1%}")
    print("-" * 78)
    print(f"{'SFT (best round)':<30}{'non-pad tok/s':>16}{'positions/s':>16}{'first loss':>16}")
    for name, windows in runs.items():
        best = max(windows, key=lambda w: w.real_per_s)
        loss = f"{best.first_loss:.4f}" if best.first_loss is not None else "-"
        print(f"{name:<30}{best.real_per_s:>16,.0f}{best.padded_per_s:>16,.0f}{loss:>16}")
    print("-" * 78)
    print(f"{'SFT non-pad tokens/s ratio':<44}{'median of rounds':>18}{'per CPU-second':>16}")
    for a, b, label in RATIOS:
        if a in runs and b in runs:
            wall = statistics.median(x.real_per_s / y.real_per_s for x, y in zip(runs[a], runs[b]))
            cpu = statistics.median(x.real_per_cpu_s for x in runs[a]) / statistics.median(
                y.real_per_cpu_s for y in runs[b])
            print(f"{label:<44}{wall:>17.2f}×{cpu:>15.2f}×")
    if trl_info:
        print(f"{'  TRL / transformers / torch':<44}"
              f"{trl_info['trl'] + ' / ' + trl_info['transformers'] + ' / ' + trl_info['torch']:>34}")
        print(f"{'  TRL optimizer / loss / attention':<44}"
              f"{trl_info['optim'].split('.')[-1] + ' / ' + trl_info['loss_type'] + ' / ' + trl_info['attn']:>34}")
    print(f"{'load average at the end (1 min)':<44}{os.getloadavg()[0]:>34.1f}")
    print("=" * 78)


if __name__ == "__main__":
    main()
