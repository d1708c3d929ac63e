"""FSDP2 against DDP on two processes: seconds per pretraining step and the memory each process holds for the
model's weights and AdamW state, side by side in one run, for the `small` preset (~14M parameters with an 8k
vocabulary). Both runs are `moss-rlhf pretrain` under `torchrun --nproc-per-node 2`, on the same data, batches and
steps; the memory figures are what the loop measures on each process (`memory/*_mb` in metrics.jsonl: the local
shards under FSDP), the times the median step after the first two.

    python benchmarks/fsdp_vs_ddp.py            # a few minutes on 2 idle cores (gloo)
    python benchmarks/fsdp_vs_ddp.py --quick    # fewer steps: checks that it works

On a CPU, FSDP pays for its all-gathers and reduce-scatters with time it saves nothing for: the point of the table
is the memory column (about half per process on two), the time ratio is the price.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path, n: int = 3000) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, work: Path, data: Path, steps: int, seq_len: int, batch: int) -> dict:
    out = work / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "moss_rlhf.cli", "pretrain", "--model", "small", "--data", str(data),
               "--vocab-size", "8000", "--seq-len", str(seq_len), "--batch-size", str(batch), "--max-steps",
               str(steps), "--warmup-steps", "2", "--eval-every", "0", "--save-every", "0", "--log-every", "1",
               "--parallel", mode, "--out", str(out), "--overwrite", "--no-progress", "--device", "cpu"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_s = [r["train/s_per_step"] for r in rows if "train/s_per_step" in r][2:]
    memory = {k: v for r in rows for k, v in r.items() if k.startswith("memory/")}
    return {"step_s": statistics.median(steps_s) if steps_s else float("nan"), "wall_s": time.perf_counter() - started,
            **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus(work / "corpus.jsonl")
        results = {mode: run(mode, work, work / "corpus.jsonl", steps, args.seq_len, args.batch)
                   for mode in ("ddp", "fsdp")}
    ddp, fsdp = results["ddp"], results["fsdp"]
    print(f"small preset, 2 processes (gloo, 1 thread each), {args.batch} × {args.seq_len} tokens per process per "
          f"step, {steps} steps")
    print(f"{'':<28}{'ddp':>12}{'fsdp':>12}{'fsdp / ddp':>12}")
    for key, label in (("memory/model_weights_mb", "weights MB per process"),
                       ("memory/model_optimizer_mb", "AdamW state MB per process"),
                       ("step_s", "seconds per step (median)")):
        a, b = ddp.get(key, float("nan")), fsdp.get(key, float("nan"))
        print(f"{label:<28}{a:>12.2f}{b:>12.2f}{b / a:>12.2f}")


if __name__ == "__main__":
    main()
