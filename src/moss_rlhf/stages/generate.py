"""``moss-rlhf generate``: sample replies from any saved model, batched, through the assistant's sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moss_rlhf.config import ConfigError, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.sampling import SamplingConfig


@dataclass
class GenerateConfig(SamplingConfig):
    model: str = option("runs/sft/model", "model to sample from (hub id or save_pretrained directory)")
    prompt: list[str] = option([], "a prompt (repeat the flag for several)")
    prompts_file: str = option("", "prompts file ({\"prompt\"} or {\"messages\"} records)")
    chat: bool = option(True, "render prompts with the chat template (else continue raw text)")
    num_samples: int = option(1, "replies per prompt", at_least=1)
    batch_size: int = option(32, "prompts per batch", at_least=1)
    seed: int = option(0, "sampling seed")
    out: str = option("", "write {\"prompt\", \"response\"} JSON lines here (default: print)")
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise ConfigError("give --prompt TEXT (repeatable) or --prompts-file FILE")


def run(cfg: GenerateConfig) -> list[dict]:
    from moss_rlhf.assistant import Assistant
    from moss_rlhf.config import UserError
    from moss_rlhf.data.formats import iter_rows, parse_prompt

    assistant = Assistant.from_pretrained(cfg.model, device=cfg.device)
    named = [(f"--prompt {i}", [{"role": "user", "content": p}]) for i, p in enumerate(cfg.prompt, start=1)]
    if cfg.prompts_file:
        named += [(f"{name}:{line}", parse_prompt(row, (name, line)))
                  for name, line, row in iter_rows(cfg.prompts_file)]
    for where, conversation in named:  # before anything is sampled: the prompt that cannot fit, by file and line
        too_long = assistant.overflow(conversation if cfg.chat else conversation[-1]["content"], cfg.max_new_tokens)
        if too_long is not None:
            length, context = too_long
            raise UserError(f"{where}: a prompt of {length} tokens plus --max-new-tokens {cfg.max_new_tokens} "
                            f"exceeds the model's context of {context} tokens")
    prompts = [c for _, c in named for _ in range(cfg.num_samples)]
    inputs = prompts if cfg.chat else [c[-1]["content"] for c in prompts]  # raw strings are continued as text
    sampling = {k: getattr(cfg, k) for k in SamplingConfig.__dataclass_fields__}
    replies = [c.text for c in assistant.complete(inputs, seed=cfg.seed, batch_size=cfg.batch_size, **sampling)]
    rows = [{"prompt": c[-1]["content"], "response": r} for c, r in zip(prompts, replies)]
    if cfg.out:
        atomic_write_text(Path(cfg.out),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"generate: {len(rows)} replies -> {cfg.out}")
    else:
        for r in rows:
            print(f">>> {r['prompt']}\n{r['response']}\n")
    return rows
