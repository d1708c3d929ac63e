"""Where a stage's data comes from: the user's files, or — by default — the embedded demo world, written once into
a directory and then read through the very same loaders as user files."""

from __future__ import annotations

import json
from pathlib import Path

from moss_rlhf.data.formats import iter_rows

DEFAULT_WORLD_DIR = "runs/world"


def ensure_world(world_dir: str | Path = DEFAULT_WORLD_DIR, seed: int = 0, size: str = "default") -> Path:
    """The demo world's directory, generated if absent or written by another seed, size or world version."""
    from moss_rlhf.demo.world import WORLD_VERSION, write_world

    world_dir = Path(world_dir)
    meta_path = world_dir / "world.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if (meta.get("version"), meta.get("seed"), meta.get("size")) == (WORLD_VERSION, seed, size):
            return world_dir
    write_world(world_dir, seed=seed, size=size)
    return world_dir


def world_file(name: str, world_dir: str | Path = DEFAULT_WORLD_DIR, seed: int = 0, size: str = "default") -> str:
    return str(ensure_world(world_dir, seed, size) / name)


def corpus_texts(paths: list[str], seed: int = 0, world_dir: str | Path = DEFAULT_WORLD_DIR,
                 size: str = "default") -> list[str]:
    """Plain texts for tokenizer training from files of any record kind (text, conversations, preferences, prompts);
    the demo world's pretraining corpus and SFT conversations when no file is given."""
    if not paths:
        root = ensure_world(world_dir, seed, size)
        paths = [str(root / "pretrain.jsonl"), str(root / "sft.jsonl")]
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
