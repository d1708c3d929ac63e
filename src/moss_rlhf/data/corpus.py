"""Plain texts from data files of any record kind (text, conversations, preferences, prompts), for training a
tokenizer on everything a run will see."""

from __future__ import annotations

from moss_rlhf.config import ConfigError
from moss_rlhf.data.formats import iter_rows


def corpus_texts(paths: list[str]) -> list[str]:
    """Every string field of every record of ``paths`` (texts, message contents, prompts, replies)."""
    if not paths:
        raise ConfigError("no corpus given: name the text or conversation files to train the tokenizer on")
    texts: list[str] = []
    for path in paths:
        for _, _, row in iter_rows(path):
            texts.extend(_strings(row))
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key in ("text", "prompt", "completion", "content", "chosen", "rejected", "messages")
                if key in value for s in _strings(value[key])]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []
