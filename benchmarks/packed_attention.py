"""The RL forwards' attention over packed rows, side by side in one run: the policy's log-probs and entropies over a
rollout of groups (``--groups`` prompts × ``--group`` replies), forward and backward, with each model attending
through the rows' mask (transformers' SDPA: each unit's whole square, a group's prompt shared only where
``packing.prompt_sharing_pays`` finds it less work) and by the rows' layout (``packed_attention``: each prompt and
reply only over what it may see; a group's prompt always shared).

    python benchmarks/packed_attention.py [--geometry 13x32x4 100x100x8 200x400x8] [--threads 1]

A geometry is PROMPTxREPLYxGROUP in tokens. Both ways run the same randomly initialised Llama (``--preset``) in one
process, alternating, ``--repeats`` times; the first pass of each is left out. Printed per geometry: the packed
tokens each way, the median seconds of a forward and backward, their ratio, and the largest difference between the
two ways' log-probs (the same computation up to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", nargs="+", default=["13x32x4", "100x100x8", "200x400x8"],
                   help="PROMPTxREPLYxGROUP tokens; 13x32x4 is the GRPO benchmark's")
    p.add_argument("--groups", type=int, default=2, help="groups in the rollout")
    p.add_argument("--preset", default="tiny", help="model preset (moss_rlhf.models.PRESETS)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    p.add_argument("--repeats", type=int, default=6, help="passes per way")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moss_rlhf import packed_attention, packing
    from moss_rlhf.distributed import keep_freed_memory
    from moss_rlhf.models import PRESETS

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    models = {}
    for way in ("mask", "layout"):  # a config each: the attention implementation is the config's
        config = LlamaConfig(**{**PRESETS[args.preset], "max_position_embeddings": 4096}, vocab_size=args.vocab,
                             attn_implementation="sdpa")
        torch.manual_seed(0)
        models[way] = LlamaForCausalLM(config).eval()
    assert packed_attention.install(models["layout"])
    print(f"{args.preset} Llama, d={config.hidden_size}, {config.num_hidden_layers} layers, {args.threads} thread(s); "
          f"{args.groups} groups")
    for geometry in args.geometry:
        prompt, reply, group = (int(x) for x in geometry.split("x"))
        g = torch.Generator().manual_seed(0)
        rows = [torch.cat([p, torch.randint(5, args.vocab, (reply,), generator=g)])
                for p in (torch.randint(5, args.vocab, (prompt,), generator=g) for _ in range(args.groups))
                for _ in range(group)]
        sequences = torch.stack(rows)
        mask = torch.ones_like(sequences)
        times, tokens, logprobs = {way: [] for way in models}, {}, {}
        for _ in range(args.repeats):
            for way, model in models.items():
                packed = packing.pack_sequences(sequences, mask, reply, share_prompts=packing.prompt_sharing([model]))
                model.zero_grad()
                start = time.perf_counter()
                lp, _ = packing.packed_logprobs(model, packed, 1.0, with_entropy=True)
                lp.sum().backward()
                times[way].append(time.perf_counter() - start)
                tokens[way], logprobs[way] = packed.n_tokens, lp.detach()
        median = {way: statistics.median(t[1:]) for way, t in times.items()}
        print(f"prompt {prompt}, {group} replies of {reply}: mask {tokens['mask']} tokens {median['mask']:.3f} s, "
              f"layout {tokens['layout']} tokens {median['layout']:.3f} s: {median['mask'] / median['layout']:.2f}× "
              f"(log-probs differ by {float((logprobs['mask'] - logprobs['layout']).abs().max()):.1e})", flush=True)


if __name__ == "__main__":
    main()
