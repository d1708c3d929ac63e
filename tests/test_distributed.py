"""FSDP2 (``--parallel fsdp``) against one process: every stage's run on two processes (gloo) with sharded models
equals the single-process run on the same global batch; a sharded checkpoint resumes exactly; the gathered final
model loads in plain transformers. The helpers (lockstep padding, whole copies of sharded weights) are checked on
their own."""

from __future__ import annotations

import shutil

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.plan import PlanConfig, plan
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import dpo, pretrain, reward, sft
from moss_rlhf.stages.dpo import DPOConfig
from moss_rlhf.stages.pretrain import PretrainConfig
from moss_rlhf.stages.reward import RewardConfig
from moss_rlhf.stages.sft import SFTConfig
from tests.conftest import assert_weights_close, run_in_processes, single_thread, write_jsonl
from tests.stages.test_reward import preference_rows, varied_rows

COMMON = dict(max_steps=3, warmup_steps=1, log_every=1, eval_every=3, save_every=0, progress=False, device="cpu")


def steady(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "per_s" not in k} for r in rows]


def stage_config(stage: str, out, tiny_model_dir, data_dir, corpus_file, conversations_file, tokenizer_dir,
                 **overrides):
    """A 3-step run of ``stage`` whose held-out set does not divide evenly over two processes (the lockstep
    padding of evaluation is exercised). ``lora_r=0`` is left out (pretrain and reward have no LoRA)."""
    values = {**COMMON, "out": str(out), "batch_size": 4, **overrides}
    if not values.get("lora_r", 1):
        del values["lora_r"]
    if stage == "pretrain":
        return pretrain.run, PretrainConfig(**{"model": "tiny", "tokenizer": str(tokenizer_dir),
                                               "data": [str(corpus_file)], "seq_len": 32, "lr": 3e-3,
                                               "eval_batches": 3, **values})
    if stage == "sft":
        return sft.run, SFTConfig(**{"model": str(tiny_model_dir), "data": [str(conversations_file)], "seq_len": 64,
                                     "max_len": 64, "lr": 3e-3, "eval_batches": 3, **values})
    data = write_jsonl(data_dir / "prefs.jsonl", varied_rows(87) if stage == "dpo" else preference_rows(87))
    if stage == "reward":
        return reward.run, RewardConfig(**{"model": str(tiny_model_dir), "data": [str(data)], "max_len": 64,
                                           "lr": 3e-3, **values})
    return dpo.run, DPOConfig(**{"model": str(tiny_model_dir), "data": [str(data)], "max_len": 64, "lr": 2e-3,
                                 "kl_prompts": 3, "kl_max_new_tokens": 6, **values})


def final_weights(path) -> dict[str, torch.Tensor]:
    """A model directory loaded by plain transformers (not by our code): a gathered FSDP model must load as any."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    scorer = any(a.endswith("ForSequenceClassification") for a in config.architectures)
    model = (AutoModelForSequenceClassification if scorer else AutoModelForCausalLM).from_pretrained(path)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage, lora_r", [("pretrain", 0), ("sft", 0), ("reward", 0), ("dpo", 0), ("dpo", 4)])
def test_fsdp_on_two_processes_matches_one_process(tmp_path, tiny_model_dir, corpus_file, conversations_file,
                                                   tokenizer_dir, stage, lora_r):
    """The same global batch (4 per process × 2 = 8 on one) with every weight, gradient and optimizer state
    sharded: the same losses, held-out metrics and final weights as one process holding everything. With LoRA the
    frozen base is sharded beside the adapters, and the final model is merged from the gathered shards."""
    args = (tiny_model_dir, tmp_path, corpus_file, conversations_file, tokenizer_dir)
    run, single = stage_config(stage, tmp_path / "single", *args, batch_size=8, lora_r=lora_r)
    with single_thread():
        run(single)
    run, sharded = stage_config(stage, tmp_path / "fsdp", *args, parallel="fsdp", lora_r=lora_r)
    run_in_processes(run, sharded)
    one, two = read_metrics(single.out), read_metrics(sharded.out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        keys = {k for k in a if isinstance(a[k], float) and "per_s" not in k and not k.startswith("memory/")}
        assert keys <= set(b), keys - set(b)
        bad = [(k, a[k], b[k]) for k in sorted(keys) if b[k] != pytest.approx(a[k], rel=1e-4, abs=1e-5)]
        assert not bad, (a["step"], bad)
    assert "eval/loss" in one[-1]
    memory = [k for k in one[0] if k.startswith("memory/")]  # the trained model's weights and optimizer state,
    assert len(memory) == (3 if stage == "dpo" and not lora_r else 2)  # and the reference DPO's KL monitor keeps
    for key in memory:  # measured on each process: half of what one process holds
        assert two[0][key] == pytest.approx(one[0][key] / 2, rel=0.02), key
    if stage in ("sft", "dpo"):  # and what `moss-rlhf plan` estimates before loading anything
        (estimate,), _ = plan(PlanConfig(model=str(tiny_model_dir), processes=2, parallel="fsdp", lora_r=lora_r))
        assert two[0]["memory/model_weights_mb"] == pytest.approx(estimate.weights / 2 ** 20, rel=0.02)
        assert two[0]["memory/model_optimizer_mb"] == pytest.approx(estimate.optimizer / 2 ** 20, rel=0.02)
    if stage == "dpo":
        assert "eval/kl_per_reply" in one[-1]  # the KL monitor sampled from the sharded policy's whole copy
    first, second = final_weights(f"{single.out}/model"), final_weights(f"{sharded.out}/model")
    assert_weights_close(first, second)
    assert any(not torch.equal(first[k], v) for k, v in final_weights(tiny_model_dir).items()
               if k in first) or stage == "pretrain"  # the runs did train


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_a_sharded_checkpoint_resumes_exactly(tmp_path, tiny_model_dir, corpus_file, conversations_file,
                                              tokenizer_dir, lora_r):
    """Sharded model and optimizer state through torch.distributed.checkpoint: a run killed after its step-2
    checkpoint and resumed repeats the uninterrupted run's losses and weights; a ddp run refuses that checkpoint.
    With LoRA the checkpoint holds the adapters and their optimizer state, not the frozen base again."""
    args = (tiny_model_dir, tmp_path, corpus_file, conversations_file, tokenizer_dir)
    options = dict(parallel="fsdp", max_steps=4, save_every=2, keep_checkpoints=3, eval_every=2, lora_r=lora_r)
    run, cfg = stage_config("sft", tmp_path / "run", *args, **options)
    run_in_processes(run, cfg)
    uninterrupted, weights = read_metrics(cfg.out), final_weights(f"{cfg.out}/model")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["manifest.json", "sharded", "state.pt"]
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # one file of shards per process
    saved = sum(f.stat().st_size for f in (checkpoint / "sharded").iterdir())
    whole = sum(v.numel() * v.element_size() for v in weights.values())
    assert saved > 2 * whole if not lora_r else saved < whole  # weights + Adam's two moments, or adapters + theirs
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    shutil.rmtree(tmp_path / "run" / "model")
    run, resumed = stage_config("sft", tmp_path / "run", *args, resume=True, **options)
    run_in_processes(run, resumed)
    assert steady(read_metrics(cfg.out)) == steady(uninterrupted)
    for key, value in final_weights(f"{cfg.out}/model").items():
        assert torch.equal(value, weights[key]), key

    run, unsharded = stage_config("sft", tmp_path / "run", *args, max_steps=6, resume=True, lora_r=lora_r,
                                  resume_override=["max_steps", "parallel"])
    with pytest.raises(ConfigError, match="written by a --parallel fsdp run"):
        run(unsharded)


@pytest.mark.slow
def test_fsdp_on_one_process_shards_over_a_group_of_one(tmp_path, tiny_model_dir, corpus_file, conversations_file,
                                                         tokenizer_dir):
    """One process started without a launcher, --parallel fsdp: the model is sharded over a group of one (FSDP on
    one device, the path of --cpu-offload on one GPU) and trains as the unsharded run does; its checkpoint is a
    sharded one, and a resume from it repeats the uninterrupted run."""
    args = (tiny_model_dir, tmp_path, corpus_file, conversations_file, tokenizer_dir)
    run, plain = stage_config("sft", tmp_path / "plain", *args, batch_size=8, max_steps=4, eval_every=2)
    run_in_processes(run, plain, world_size=1)
    options = dict(batch_size=8, parallel="fsdp", max_steps=4, save_every=2, keep_checkpoints=3, eval_every=2)
    run, sharded = stage_config("sft", tmp_path / "fsdp", *args, **options)
    run_in_processes(run, sharded, world_size=1)
    one, fsdp = read_metrics(plain.out), read_metrics(sharded.out)
    for a, b in zip(one, fsdp, strict=True):
        keys = {k for k in a if isinstance(a[k], float) and "per_s" not in k}
        bad = [(k, a[k], b[k]) for k in sorted(keys) if b[k] != pytest.approx(a[k], rel=1e-4, abs=1e-5)]
        assert not bad, (a["step"], bad)  # memory/* included: one process holds every shard
    assert_weights_close(final_weights(f"{plain.out}/model"), final_weights(f"{sharded.out}/model"))
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 1
    uninterrupted, weights = read_metrics(sharded.out), final_weights(f"{sharded.out}/model")
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "fsdp" / "model")
    run, resumed = stage_config("sft", tmp_path / "fsdp", *args, resume=True, **options)
    run_in_processes(run, resumed, world_size=1)
    assert steady(read_metrics(sharded.out)) == steady(uninterrupted)
    for key, value in final_weights(f"{sharded.out}/model").items():
        assert torch.equal(value, weights[key]), key


def test_fsdp_options_are_checked():
    with pytest.raises(ConfigError, match="--cpu-offload needs --parallel fsdp"):
        SFTConfig(data=["a.jsonl"], cpu_offload=True)
    with pytest.raises(ConfigError, match="--parallel must be one of"):
        SFTConfig(data=["a.jsonl"], parallel="zero3")
    from moss_rlhf import distributed
    from moss_rlhf.training import Trainee

    with pytest.raises(ConfigError, match="on a CPU they are there already"):
        Trainee.create(torch.nn.Linear(2, 2), SFTConfig(data=["a.jsonl"], parallel="fsdp", cpu_offload=True),
                       distributed.init("cpu"))


def _lockstep_and_copies(model_dir: str, out: str) -> None:
    from moss_rlhf import distributed
    from moss_rlhf.models import load_causal_lm

    d = distributed.init("cpu")
    model = load_causal_lm(model_dir)
    reference = load_causal_lm(model_dir)
    # 5 items over 2 processes in batches of 2: rank 0 has [0, 2], [4]; rank 1 has [1, 3] and one dummy
    assert distributed.shard_batches(5, 2, d, model) == ([[0, 2], [4]] if d.rank == 0 else [[1, 3]])
    model.generation_config.top_k = 7  # as a checkpoint's generation_config.json may set it
    distributed.shard(model, d)
    assert distributed.shard_batches(5, 2, d, model) == ([[0, 2], [4]] if d.rank == 0 else [[1, 3], None])
    assert distributed.lockstep(3 if d.rank == 0 else 1, sharded=True) == (0 if d.rank == 0 else 2)
    copy = distributed.plain_copy(model)
    assert not distributed.is_sharded(copy) and copy.generation_config.top_k == 7  # the model's, not a default
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(copy(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    distributed.reshard(model)  # the root's weights were left gathered by the forward
    with torch.no_grad():  # a change to the shards reaches the copy through copy_weights
        for p in model.parameters():
            p.mul_(0.5)
    distributed.copy_weights(model, copy)
    assert not torch.equal(copy.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    full = distributed.full_state_dict(model, d.is_main)
    if d.is_main:
        for name, tensor in copy.state_dict().items():
            assert torch.equal(tensor, full[name]), name
        torch.save(True, out)


@pytest.mark.slow
def test_lockstep_padding_and_whole_copies_of_sharded_weights(tmp_path, tiny_model_dir):
    run_in_processes(_lockstep_and_copies, str(tiny_model_dir), str(tmp_path / "done.pt"))
    assert (tmp_path / "done.pt").exists()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_sft_like_one_process(tmp_path, tiny_model_dir, conversations_file):
    """Multi-node as users launch it: two torchrun launchers (``--nnodes 2``, c10d rendezvous), one process each,
    the same command on both "machines" — here localhost — equal one process on the same global batch."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    flags = ["--model", str(tiny_model_dir), "--data", str(conversations_file), "--seq-len", "64", "--max-len", "64",
             "--lr", "3e-3", "--max-steps", "3", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "3",
             "--save-every", "0", "--no-progress", "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes",
                "-m", "moss_rlhf.cli", "sft", *flags, "--batch-size", "4", "--parallel", "fsdp",
                "--out", str(tmp_path / "nodes")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = [subprocess.Popen(launcher, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [node.communicate(timeout=900)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    from moss_rlhf.cli import main

    with single_thread():
        assert main(["sft", *flags, "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "nodes")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("train/loss", "train/grad_norm", "eval/loss"):
            assert (key not in a and key not in b) or b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert_weights_close(final_weights(tmp_path / "single" / "model"), final_weights(tmp_path / "nodes" / "model"))


def test_shutdown_ends_only_the_process_group_it_started():
    """vLLM's in-process engine starts a process group of its own and tears it down at exit; destroyed under it by
    our shutdown, it raised a traceback at every exit of a vLLM run."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import free_port

    script = textwrap.dedent(f"""
        import torch.distributed as dist
        from moss_rlhf import distributed
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        distributed.init("cpu")  # one process: starts nothing
        distributed.shutdown()
        assert dist.is_initialized(), "shutdown destroyed a group another library started"
        dist.destroy_process_group()
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _write_then_leave(marker) -> None:
    """Rank 0 writes the marker (as it writes the final model) and leaves; rank 1 leaves at once and then looks."""
    import time

    from moss_rlhf import distributed

    d = distributed.init("cpu")
    if d.rank == 0:
        time.sleep(0.5)  # slower than its peer (only makes a missing wait show; a waiting end passes at any speed)
        marker.write_text("final model")
    distributed.shutdown(wait_for_all=True)
    assert marker.exists(), "a process left before its peer had finished"


def test_a_clean_end_waits_for_every_process(tmp_path):
    """A process that tore its group down while its peer was still writing the final model aborted in gloo's
    teardown on a busy machine: a clean end waits for all, so no process leaves before the last is done."""
    run_in_processes(_write_then_leave, tmp_path / "done")


def _threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


def _free_the_group_at_shutdown(out, sharded: bool) -> None:
    """Rank by rank: the process's threads before the group starts and after ``shutdown``, with a model loaded and
    an object collective run in between (as a stage does); ``sharded``: the model sharded by FSDP2 and one training
    step run (its device mesh outlives the model in DTensor's caches)."""
    import json
    import sys

    import torch.distributed as dist

    from moss_rlhf import distributed

    assert "torch.distributed.nn" not in sys.modules  # else the probe proves nothing: the defaults are taken
    before = _threads()
    d = distributed.init("cpu")
    from transformers import LlamaConfig, LlamaForCausalLM  # imports torch.distributed.fsdp and .nn

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=50))
    if sharded:
        distributed.shard(model, d)
        ids = torch.arange(8).reshape(2, 4)
        model(input_ids=ids, labels=ids).loss.backward()
    del model
    everyone: list = [None, None]
    dist.all_gather_object(everyone, d.rank)
    distributed.shutdown(wait_for_all=True)
    (out / f"{d.rank}.json").write_text(json.dumps([before, _threads()]))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_shutdown_frees_the_group_and_its_threads(tmp_path, sharded):
    """torch modules that take ``group=dist.group.WORLD`` as a default argument hold the group for good when they are
    imported after it starts (transformers imports them when it loads a model): destroyed, it lived on with its gloo
    threads into the interpreter's shutdown, where a thread dropping a finished collective's tensors waited for the
    GIL and aborted the process after a clean run (about one two-process run in thirty). Started by ``init``, the
    group is freed at ``shutdown``: the gloo threads are gone before the process exits. FSDP2's device meshes held
    the group too, from DTensor's sharding caches, until ``shutdown`` emptied them."""
    import json

    run_in_processes(_free_the_group_at_shutdown, tmp_path, sharded)
    for rank in (0, 1):
        before, after = json.loads((tmp_path / f"{rank}.json").read_text())
        assert after == before, f"process {rank}: {after - before} threads of the process group outlived shutdown"


REUSE_PROBE = r"""
import resource
import sys
import torch
from moss_rlhf import distributed
if sys.argv[1] == "init":
    distributed.init("cpu")
sizes = [4 << 20, 1 << 18, 1 << 20, 4 << 20, 1 << 19, 3 << 20, 1 << 16] * 2  # floats: up to 16 MiB
faults = []
for step in range(12):  # a step's activations, a little longer or shorter each step, all freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(n + step % 4 * 40_000) for n in sizes]
    del kept
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_cpu_run_reuses_the_memory_it_frees():
    """After ``distributed.init`` on the CPU, steps that allocate and free activations of a few sizes (26K pages
    each) stop costing page faults after their first few: freed blocks are served again from the heap. glibc's
    default maps the larger blocks afresh for several more steps."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str, extra_env: dict | None = None) -> list[int]:
        done = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True,
                              env={**env, **(extra_env or {})}, check=True)
        return [int(n) for n in done.stdout.strip().splitlines()[-1].strip("[]").split(",")]

    kept, default = faults("init"), faults("default")
    untouched = faults("init", {"MALLOC_TRIM_THRESHOLD_": "131072"})  # a user's own setting is left alone
    after_warmup = sum(kept[2:])  # from the third step on
    assert 3 * after_warmup < sum(default[2:]), (kept, default)
    assert 3 * after_warmup < sum(untouched[2:]), (kept, untouched)
