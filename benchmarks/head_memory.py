"""Peak memory and time of the RL update's output head, side by side in one run: log-probs and entropies of N response
tokens from their hidden states, forward and backward, with the ``[N, V]`` logits held whole (one GEMM, then
``token_logprobs`` / ``entropy_from_logits``: what ``packing.packed_logprobs`` does below
``losses.HEAD_BLOCK_ELEMENTS``) and block by block (``losses.linear_logprobs``: what it does above).

    python benchmarks/head_memory.py [--tokens 4096] [--hidden 256] [--vocab 32000] [--threads 2] [--device cpu]

Each way runs in a fresh subprocess (so that one's allocations cannot hide the other's). Its peak is that of its
first pass above what the inputs hold: on a CPU the growth of the process's maximum resident set (``ru_maxrss``), on
CUDA ``torch.cuda.max_memory_allocated``. It prints both peaks, the logits' own size, the time of a pass (the median
of the ``--repeats`` passes after the first), and the ratios. The log-probs and the gradients of the
two ways are compared (max abs difference) so that the two do the same computation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="response tokens N in the micro-batch")
    p.add_argument("--hidden", type=int, default=256, help="hidden size d")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per way")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--worker", choices=("whole", "blocks"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    import torch

    from moss_rlhf.losses import entropy_from_logits, linear_logprobs, token_logprobs

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5).to(device).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)

    def one_pass():
        hidden.grad = weight.grad = None
        if args.worker == "whole":
            logits = hidden @ weight.T
            logprobs = token_logprobs(logits[None], targets[None])[0]
            with torch.no_grad():
                entropy_from_logits(logits[None])
        else:
            logprobs, _ = linear_logprobs(hidden, weight, None, targets)
        logprobs.sum().backward()
        return logprobs.detach()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the peak of the first pass (a CPU process's maximum resident set only grows), then the timed passes
    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one_pass()
    synchronize()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logprobs = one_pass()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "seconds": statistics.median(times), "logprobs": logprobs.cpu().tolist()[:256],
            "grad_weight": weight.grad.flatten()[:4096].cpu().tolist(), "grad_hidden": hidden.grad[:16].cpu().tolist()}


def run(args, way: str) -> dict:
    argv = [sys.executable, __file__, "--worker", way, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
            "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads),
            "--device", args.device]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {way} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_difference(a, b) -> float:
    flat = lambda x: [v for row in x for v in row] if x and isinstance(x[0], list) else x  # noqa: E731
    return max(abs(u - v) for u, v in zip(flat(a), flat(b)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from moss_rlhf import losses

    mib = 2 ** 20
    logits_mib = args.tokens * args.vocab * 4 / mib
    print(f"head: N {args.tokens} response tokens, d {args.hidden}, V {args.vocab} (logits {logits_mib:.0f} MiB in "
          f"float32; blocks of {losses.HEAD_BLOCK_ELEMENTS * 4 / mib:.0f} MiB), {args.device}, {args.threads} "
          f"thread(s), forward + backward")
    whole, blocks = run(args, "whole"), run(args, "blocks")
    for name, r in (("logits whole", whole), ("block by block", blocks)):
        print(f"{name:>15}: peak {r['peak_bytes'] / mib:8.0f} MiB above the inputs, "
              f"{r['seconds'] * 1e3:8.1f} ms a pass")
    print(f"block by block / whole: peak memory {blocks['peak_bytes'] / max(whole['peak_bytes'], 1):.2f}×, time "
          f"{blocks['seconds'] / whole['seconds']:.2f}×")
    print("max |difference|: log-probs {:.2e}, weight gradient {:.2e}, hidden gradient {:.2e}".format(
        *(max_difference(whole[k], blocks[k]) for k in ("logprobs", "grad_weight", "grad_hidden"))))


if __name__ == "__main__":
    main()
