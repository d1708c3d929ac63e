"""One prepared check for a lent GPU (an H200 here): moss-rlhf on a Qwen2-0.5B-shaped model in bf16, in one table.

    bash benchmarks/gpu_check.sh                 # on the GPU machine: sized for under 8 minutes (not yet timed)
    python benchmarks/gpu_check.py --smoke       # anywhere: the same code paths on a tiny model, CPU, fp32, ~1 min

What it measures, each part on its own (a part that fails prints its error and the others still run):
  1. the bf16 GEMM peak: the best of ten 8192³ products timed with CUDA events — the MFU denominator;
  2. SFT, one process: tokens/s and MFU = tokens/s × (6·N + 12·L·d·T) ÷ peak (``train_throughput``'s FLOP count),
     plain, with ``--parallel fsdp`` on one device (FSDP2 over a process group of one: the blocks gathered into
     buffers of their own for each forward and backward), and on a GPU with ``--cpu-offload`` too (weights,
     gradients and optimizer state in host memory, each block copied to the GPU for its compute);
  3. one PPO-max and one GRPO run of a few steps with builtin rollouts, and with vLLM's where vLLM imports:
     generated tokens/s and seconds per step (medians after the first step, which pays one-off costs); GRPO again
     with ``--compile`` (the blocks and the decode step through torch.compile; its first step, which compiles, is
     reported apart).

Random weights from a config and a tokenizer trained here on synthetic text, so nothing is downloaded: the model has
Qwen2-0.5B's shape (24 layers, d 896, 14 heads / 2 KV heads, MLP 4864, tied embedding of 151,936 rows), the
tokenizer uses its first few thousand rows.
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
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True)
WORDS = "the cat dog park river stone light garden window morning quiet music bread table letter road".split()


def sentence(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 9)) + "."


def prepare(work: Path, smoke: bool) -> dict[str, Path]:
    """The model, a one-label reward model from the same weights, SFT conversations and RL prompts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from moss_rlhf.models import load_scorer, save_model
    from moss_rlhf.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([sentence(i) for i in range(3000)], vocab_size=512 if smoke else 4096)
    shape = TINY if smoke else QWEN2_05B
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    save_model(model, tokenizer, work / "model")
    scorer = load_scorer(str(work / "model"), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))  # rewards vary
    save_model(scorer, tokenizer, work / "reward")
    turns = 2 if smoke else 12  # ~600 tokens per conversation at full size
    with open(work / "sft.jsonl", "w") as f:
        for i in range(400):
            reply = " ".join(sentence(i + k) for k in range(turns))
            f.write(json.dumps({"messages": [{"role": "user", "content": sentence(i)},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    with open(work / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": sentence(i)}) + "\n" for i in range(400))
    return {"model": work / "model", "reward": work / "reward", "sft": work / "sft.jsonl",
            "prompts": work / "prompts.jsonl"}


def gemm_peak(smoke: bool) -> float:
    """TFLOP/s of the best of ten square products (bf16 8192³ on a GPU; fp32 512³ on the CPU for --smoke)."""
    if smoke or not torch.cuda.is_available():
        a = torch.randn(512, 512)
        a @ a
        best = min(_wall(lambda: a @ a) for _ in range(10))
        return 2 * 512 ** 3 / best / 1e12
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                               dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / min(times) / 1e12


def _wall(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def sft_args(paths: dict, out: Path, smoke: bool, device: str, precision: str) -> list[str]:
    steps, batch, seq = (4, 8, 128) if smoke else (16, 16, 2048)
    return ["sft", "--model", str(paths["model"]), "--data", str(paths["sft"]), "--max-len", str(seq), "--seq-len",
            str(seq), "--batch-size", str(batch), "--max-steps", str(steps), "--warmup-steps", "2", "--eval-every",
            "0", "--save-every", "0", "--log-every", "1", "--precision", precision, "--device", device,
            "--out", str(out), "--overwrite", "--no-progress"]


def sft(paths: dict, work: Path, smoke: bool, device: str, precision: str, peak: float,
        parallel: tuple[str, ...] = ()) -> dict:
    from moss_rlhf.models import load_causal_lm

    out = work / ("sft" + "".join(f"-{flag.strip('-')}" for flag in parallel if flag.startswith("--")))
    argv = sft_args(paths, out, smoke, device, precision) + list(parallel)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "moss_rlhf.cli", *argv], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    rows = [r for r in metrics_of(out) if "train/tokens_per_s" in r][2:]  # warm-up steps left out
    tokens_s = statistics.median(r["train/tokens_per_s"] for r in rows)
    seq = int(argv[argv.index("--seq-len") + 1])
    from train_throughput import model_flops_per_token

    flops = model_flops_per_token(load_causal_lm(str(paths["model"])), seq)
    logged = metrics_of(out)
    memory = sum(v for r in logged for k, v in r.items() if k.startswith("memory/model_"))
    figures = {"tokens/s": tokens_s, "MFU": tokens_s * flops / (peak * 1e12), "weights + AdamW MB/process": memory}
    device_peak = [r["memory/device_peak_mb"] for r in logged if "memory/device_peak_mb" in r]
    return figures | ({"device peak MB": device_peak[0]} if device_peak else {})


def rl(paths: dict, work: Path, smoke: bool, device: str, precision: str, preset: str, engine: str,
       compiled: bool = False) -> dict:
    from moss_rlhf.stages import rl as rl_stage

    group = 4 if preset == "grpo" else 1
    prompts = (8 if smoke else 64) // group
    new_tokens = 16 if smoke else 128
    cfg = rl_stage.RLConfig(out=str(work / f"rl-{preset}-{engine}{'-compiled' * compiled}"), policy=str(paths["model"]),
                            reward_model=str(paths["reward"]), prompts=[str(paths["prompts"])], preset=preset,
                            group_size=group, rollout_batch=prompts, mini_batch=prompts * group,
                            batch_size=8 if smoke else 16, max_new_tokens=new_tokens, max_steps=3 if smoke else 4,
                            eval_every=0, save_every=0, progress=False, device=device, precision=precision,
                            rollout_engine=engine, best_metric="reward", overwrite=True, compile=compiled)
    rl_stage.run(cfg)
    first, *rows = [r for r in metrics_of(Path(cfg.out)) if "time/step_s" in r]
    generated = statistics.median(r["response/length"] * prompts * group / r["time/generate_s"] for r in rows)
    return {"generated tokens/s": generated, "s/step": statistics.median(r["time/step_s"] for r in rows),
            "generate s": statistics.median(r["time/generate_s"] for r in rows),
            "update s": statistics.median(r["time/update_s"] for r in rows), "first step s": first["time/step_s"]}


def part(name: str, fn, results: dict) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # one broken part must not cost the rest of a scarce GPU lease
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    print(f"[{name}] {time.perf_counter() - started:.0f} s: {results[name]}", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU in fp32: checks the code paths")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    precision = "fp32" if device == "cpu" else "bf16"
    try:
        import vllm  # noqa: F401
        has_vllm = not args.skip_vllm
    except ImportError:
        has_vllm = False
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"precision {precision}, vLLM {'yes' if has_vllm else 'not installed or skipped'}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = prepare(work, args.smoke)
        peak = gemm_peak(args.smoke)
        results["GEMM peak TFLOP/s"] = {"value": peak}
        part("SFT", lambda: sft(paths, work, args.smoke, device, precision, peak), results)
        part("SFT, --parallel fsdp on one device", lambda: sft(paths, work, args.smoke, device, precision, peak,
                                                                ("--parallel", "fsdp")), results)
        if device == "cuda":  # the host holds the shards: on a CPU they are there already (refused)
            part("SFT, --parallel fsdp --cpu-offload on one GPU", lambda: sft(
                paths, work, args.smoke, device, precision, peak, ("--parallel", "fsdp", "--cpu-offload")), results)
        for preset in ("ppo_max", "grpo"):
            for engine in ("builtin", "vllm") if has_vllm else ("builtin",):
                part(f"{preset}, {engine} rollouts",
                     lambda: rl(paths, work, args.smoke, device, precision, preset, engine), results)
        part("grpo, builtin rollouts, --compile",
             lambda: rl(paths, work, args.smoke, device, precision, "grpo", "builtin", compiled=True), results)
    print("\n| part | figures |\n|---|---|")
    for name, figures in results.items():
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(f"| {name} | {shown} |")
    return results


if __name__ == "__main__":
    main()
