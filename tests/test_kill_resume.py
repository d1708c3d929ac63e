"""Kill -9 at random points of a run's progress — a checkpoint is written every step, so some kills land inside one
— then ``--resume`` until the run finishes: every stage ends with the metrics and the weights of the uninterrupted
run, bit for bit, on one process and on two (torchrun, gloo)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import free_port, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(argv: list[str], out, processes: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "moss_rlhf.cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
        str(free_port()), "-m", "moss_rlhf.cli"]
    return subprocess.Popen(launcher + argv + ["--out", str(out), "--resume", "--no-progress", "--device", "cpu"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a kill reaches torchrun's workers too


def finish(argv, out, processes: int = 1) -> None:
    proc = start(argv, out, processes)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def steady(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k} for r in rows]


def weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def last_checkpoint_step(out) -> int:
    steps = [int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def kill_after_step(proc: subprocess.Popen, out, step: int, delay: float) -> bool:
    """Kill the run ``delay`` seconds after it checkpointed ``step``: progress, not the clock, decides when, so a fast
    machine cannot finish before the kill and a slow one cannot be killed while it still loads."""
    while proc.poll() is None and last_checkpoint_step(out) < step:
        time.sleep(0.02)
    time.sleep(delay)  # lands the kill anywhere in the next steps, inside a checkpoint write or between two
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    return True


def killed_then_resumed_equals_uninterrupted(tmp_path, argv: list[str], seed: int, processes: int = 1,
                                             kills: int = 3) -> None:
    from moss_rlhf.runs import read_metrics

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    finish(argv, reference, processes)
    max_steps = int(argv[argv.index("--max-steps") + 1])
    rng = random.Random(seed)
    # Increasing steps in the first two thirds: every resumed run gets past the last kill and none reaches the end.
    targets = sorted(rng.sample(range(1, 2 * max_steps // 3), kills))
    killed, mid_write = 0, 0
    for step in targets:
        proc = start(argv, interrupted, processes)
        killed += kill_after_step(proc, interrupted, step, delay=rng.uniform(0.0, 0.15))
        proc.wait()
        mid_write += any(interrupted.glob("checkpoints/.step-*.tmp")) or any(interrupted.glob(".model.*"))
    print(f"{argv[0]}: {killed} kills while running, {mid_write} of them inside a checkpoint or model write")
    assert killed == kills  # each kill must interrupt a running stage, or this tests nothing
    finish(argv, interrupted, processes)
    assert steady(read_metrics(interrupted)) == steady(read_metrics(reference))
    expected, got = weights(reference), weights(interrupted)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    from moss_rlhf.models import load_scorer, save_model
    from moss_rlhf.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("kill")
    prefs = [{"prompt": f"Where did person {i} go?", "chosen": f"To the park, number {i}.",
              "rejected": "No." + " no" * (i % 4)} for i in range(120)]
    write_jsonl(root / "prefs.jsonl", prefs)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Where did person {i} go?"} for i in range(60)])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(scorer, tokenizer, root / "rm")
    return root


COMMON = ["--save-every", "1", "--keep-checkpoints", "2", "--log-every", "1"]


@pytest.mark.slow
def test_pretrain(tmp_path, corpus_file, eval_corpus_file, tokenizer_dir):
    killed_then_resumed_equals_uninterrupted(tmp_path, [
        "pretrain", "--data", str(corpus_file), "--eval-data", str(eval_corpus_file), "--tokenizer",
        str(tokenizer_dir), "--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--max-steps", "30",
        "--eval-every", "10", *COMMON], seed=1)


@pytest.mark.slow
def test_sft(tmp_path, tiny_model_dir, conversations_file):
    killed_then_resumed_equals_uninterrupted(tmp_path, [
        "sft", "--model", str(tiny_model_dir), "--data", str(conversations_file), "--batch-size", "8",
        "--max-len", "64", "--seq-len", "64", "--max-steps", "30", "--eval-every", "10", *COMMON], seed=2)


@pytest.mark.slow
def test_reward(tmp_path, tiny_model_dir, data):
    killed_then_resumed_equals_uninterrupted(tmp_path, [
        "reward", "--model", str(tiny_model_dir), "--data", str(data / "prefs.jsonl"), "--batch-size", "8",
        "--max-len", "64", "--max-steps", "30", "--eval-every", "10", "--lm-coef", "0.1", *COMMON], seed=3)


@pytest.mark.slow
def test_ppo(tmp_path, tiny_model_dir, data, conversations_file):
    killed_then_resumed_equals_uninterrupted(tmp_path, [
        "ppo", "--policy", str(tiny_model_dir), "--reward-model", str(data / "rm"), "--prompts",
        str(data / "prompts.jsonl"), "--eval-size", "8", "--rollout-batch", "8", "--mini-batch", "4",
        "--batch-size", "4", "--max-new-tokens", "8", "--max-steps", "12", "--eval-every", "4", "--lr", "1e-3",
        "--ptx-data", str(conversations_file), "--ptx-coef", "0.1", "--adaptive-kl", *COMMON], seed=4)


@pytest.mark.slow
def test_sft_on_two_processes(tmp_path, tiny_model_dir, conversations_file):
    killed_then_resumed_equals_uninterrupted(tmp_path, [
        "sft", "--model", str(tiny_model_dir), "--data", str(conversations_file), "--batch-size", "4",
        "--max-len", "64", "--seq-len", "64", "--max-steps", "30", "--eval-every", "10", *COMMON], seed=5,
        processes=2)
