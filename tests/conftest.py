"""Shared fixtures: a small structured corpus, a tiny tokenizer trained on it, and a tiny saved model — all built
locally in seconds (nothing is downloaded)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HH_FILE = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

NAMES = ["Lin", "Ana", "Bo", "Mei", "Tom", "Sara"]
PLACES = ["the park", "the market", "the school", "the river", "the library"]
THINGS = ["an apple", "a book", "a red ball", "tea", "a small cat"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """Templated sentences: enough structure that a tiny model can learn far below the unigram entropy."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(NAMES), rng.choice(NAMES)
        out.append(f"{a} went to {rng.choice(PLACES)} with {b}. {a} saw {rng.choice(THINGS)} there. "
                   f"猫很小。 {b} said thank you.")
    return out


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        convs.append([{"role": "user", "content": f"Where did {name} go?"},
                      {"role": "assistant", "content": f"{name} went to {place}."}])
    return convs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    return write_jsonl(root / "corpus.jsonl", [{"text": t} for t in make_sentences(800)])


@pytest.fixture(scope="session")
def eval_corpus_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus_eval")
    return write_jsonl(root / "eval.jsonl", [{"text": t} for t in make_sentences(60, seed=1)])


@pytest.fixture(scope="session")
def conversations_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversations")
    return write_jsonl(root / "sft.jsonl", [{"messages": c} for c in make_conversations(300)])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from moss_rlhf.tokenizer import train_tokenizer

    texts = make_sentences(400) + [m["content"] for c in make_conversations(200) for m in c]
    tokenizer = train_tokenizer(texts, vocab_size=384)
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama (random init) with our tokenizer, saved with save_pretrained."""
    from moss_rlhf.models import build_causal_lm, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    model = build_causal_lm("tiny", tokenizer, seed=0)
    path = tmp_path_factory.mktemp("tiny_model")
    save_model(model, tokenizer, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_processes(fn, *args, world_size: int = 2) -> None:
    """``fn(*args)`` in ``world_size`` fresh processes joined in a gloo group, as ``torchrun`` would start them."""
    import torch

    torch.multiprocessing.spawn(_process_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                                join=True)


def _process_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moss_rlhf import distributed

    try:
        fn(*args)
        distributed.shutdown(wait_for_all=True)
    finally:
        distributed.shutdown()


@contextlib.contextmanager
def single_thread():
    """Train tiny fixtures on one thread: a 1.5M-parameter model gains nothing from more, and on a shared 2-core
    machine a second thread stalls on the other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_weights_close(first: dict, second: dict) -> None:
    """Weights of two runs that should be the same but sum their gradients in another order (FSDP's reduce-scatter
    against one process): Adam turns the rounding of a near-zero gradient element into a step of up to lr, so a few
    elements may differ by a fraction of lr; the mean difference stays at rounding level."""
    assert first.keys() == second.keys()
    for key in first:
        difference = (second[key].float() - first[key].float()).abs()
        assert float(difference.max()) < 3e-4 and float(difference.mean()) < 2e-6, key
