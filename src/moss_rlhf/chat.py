"""``moss-rlhf chat MODEL``: talk to a model in the terminal.

The conversation history is kept and rendered with the model's chat template on every turn; the reply is printed
token by token as it is generated (``Assistant.stream``, which decodes incrementally so a Chinese character split
over several byte-level tokens is printed only once whole). ``/reset`` forgets the history, ``/exit`` (or end of
input, Ctrl-D) quits; Ctrl-C stops a reply half-way and keeps the chat going.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from moss_rlhf.config import option
from moss_rlhf.sampling import SamplingConfig

HELP = "/reset forgets the conversation, /exit quits (or Ctrl-D)"


@dataclass
class ChatConfig(SamplingConfig):
    model: str = option("runs/ppo/model", "model to chat with (save_pretrained directory or hub id)", positional=True)
    system: str = option("", "system message placed at the start of every conversation")
    # the chat's own defaults for three sampling options, with SamplingConfig's bounds
    max_new_tokens: int = option(256, "longest reply in tokens", at_least=1)
    temperature: float = option(0.7, "sampling temperature (0: greedy)", at_least=0.0)
    top_p: float = option(0.9, "nucleus sampling", above=0.0, at_most=1.0)
    seed: int = option(-1, "sampling seed (-1: a fresh one per reply)")
    device: str = option("auto", "cpu, cuda or auto")


def chat_loop(assistant, cfg: ChatConfig, read=input, out: TextIO | None = None) -> list[dict]:
    """Read a line, stream the reply, repeat. Returns the final history (for tests and callers)."""
    out = out or sys.stdout
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(start)
    turn = 0
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation reset)\n")
            out.flush()
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            out.flush()
            continue
        history.append({"role": "user", "content": text})
        if (too_long := assistant.overflow(history, cfg.max_new_tokens)) is not None:  # say so, keep the session
            length, context = too_long
            history.pop()
            out.write(f"(that does not fit: the conversation would be {length} tokens, and the model reads "
                      f"{context} with {cfg.max_new_tokens} of them kept for the reply; /reset starts afresh)\n")
            out.flush()
            continue
        pieces: list[str] = []
        seed = None if cfg.seed < 0 else cfg.seed + turn
        try:
            for piece in assistant.stream(history, seed=seed, **sampling):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep what was said
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
    return history


def run(cfg: ChatConfig) -> list[dict]:
    from moss_rlhf.assistant import Assistant

    assistant = Assistant.from_pretrained(cfg.model, device=cfg.device)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"chatting with {cfg.model} — {HELP}", flush=True)
    return chat_loop(assistant, cfg)
