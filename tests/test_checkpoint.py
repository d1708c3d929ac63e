"""The one checkpointer: a restore puts back exactly what was saved (model weights, LoRA adapters, optimizer and
schedule state, running statistics, RNG streams, plain values); only the last ``keep`` are kept; a save that fails
half-way leaves the previous checkpoint as it was; restoring where there is none says so and returns None."""

from __future__ import annotations

import random

import pytest
import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import Checkpointer, seed_everything
from moss_rlhf.config import TrainConfig
from moss_rlhf.losses import RunningMoments
from moss_rlhf.models import LoraOptions, apply_lora, load_causal_lm
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import Trainee


def _train_a_bit(trainee: Trainee, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (2, 12), generator=g)
    trainee.model(input_ids=ids, labels=ids).loss.backward()
    trainee.step()
    trainee.schedule.step()


@pytest.mark.parametrize("lora_r", [0, 4])
def test_restore_puts_back_exactly_what_was_saved(tmp_path, tiny_model_dir, lora_r, capsys):
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def fresh():
        model = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraOptions(lora_r, 8))
        trainee = Trainee.create(model, TrainConfig(lr=1e-2, warmup_steps=2, max_steps=10), distributed.init("cpu"))
        moments = RunningMoments()
        objects = {"policy": model, "opt": trainee.optimizer, "schedule": trainee.schedule, "moments": moments}
        return trainee, moments, Checkpointer(tmp_path / "ckpt", objects, tokenizer, keep=2, desc="test")

    trainee, moments, checkpointer = fresh()
    assert checkpointer.restore() is None and "holds no checkpoint yet" in capsys.readouterr().out
    _train_a_bit(trainee, 0)
    moments.update(torch.tensor([1.0, 2.0, 4.0]))
    seed_everything(5)
    checkpointer.save(1, best=0.25, first_stats={"reward/raw_mean": 0.5})
    saved_lr = trainee.schedule.get_last_lr()
    saved_moment = [s["exp_avg"].clone() for s in trainee.optimizer.state.values()]
    expected_draws = (random.random(), torch.rand(3))
    _train_a_bit(trainee, 1)  # the uninterrupted run goes on...
    after_step_2 = {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}

    resumed, resumed_moments, resumed_checkpointer = fresh()  # ...a new process restores step 1
    values = resumed_checkpointer.restore()
    assert values == {"best": 0.25, "first_stats": {"reward/raw_mean": 0.5}, "step": 1}
    draws = (random.random(), torch.rand(3))
    assert draws[0] == expected_draws[0] and torch.equal(draws[1], expected_draws[1])  # the RNG streams continue
    assert resumed_moments.state_dict() == moments.state_dict()
    assert resumed.schedule.get_last_lr() == saved_lr and resumed.schedule.last_epoch == 1
    for restored, saved in zip((s["exp_avg"] for s in resumed.optimizer.state.values()), saved_moment, strict=True):
        assert torch.equal(restored, saved)
    _train_a_bit(resumed, 1)  # and the same next step gives the same weights, bit for bit
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, after_step_2[key]), key


def test_only_the_last_checkpoints_are_kept_and_a_failed_save_changes_nothing(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    model = load_causal_lm(str(tiny_model_dir))
    moments = RunningMoments()
    checkpointer = Checkpointer(tmp_path / "ckpt", {"model": model, "moments": moments}, keep=2)
    for step in (1, 2, 3):
        moments.update(torch.tensor([float(step)]))
        checkpointer.save(step)
    assert [p.name for p in sorted((tmp_path / "ckpt").glob("step-*"))] == ["step-00000002", "step-00000003"]
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # dies after the model is written, before state.pt
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save(4)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*")) == before
    assert checkpointer.latest().name == "step-00000003"


@pytest.mark.parametrize("damage", ["truncate weights", "delete state", "flip a byte"])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, tiny_model_dir, capsys, damage):
    model = load_causal_lm(str(tiny_model_dir))
    moments = RunningMoments()
    checkpointer = Checkpointer(tmp_path / "ckpt", {"model": model, "moments": moments}, keep=3, desc="test")
    for step in (1, 2):
        moments.update(torch.tensor([float(step)]))
        checkpointer.save(step, marker=step)
    latest = tmp_path / "ckpt" / "step-00000002"
    weights = latest / "model" / "model.safetensors"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete state":
        (latest / "state.pt").unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    fresh = RunningMoments()
    values = Checkpointer(tmp_path / "ckpt", {"model": load_causal_lm(str(tiny_model_dir)), "moments": fresh},
                          desc="test").restore()
    assert values["step"] == 1 and values["marker"] == 1 and fresh.count == 1
    assert "step-00000002 is damaged" in capsys.readouterr().out
    (tmp_path / "ckpt" / "step-00000001" / "state.pt").unlink()
    from moss_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="no intact checkpoint"):
        Checkpointer(tmp_path / "ckpt", {"moments": RunningMoments()}).restore()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "model"])
def test_a_kill_inside_a_write_leaves_the_previous_or_the_new_copy(tmp_path, tiny_model_dir, what):
    """A process that does nothing but write (checkpoints, or the final model directory over and over) is killed at
    random moments, so the kills land inside writes: every time, what is on disk is complete and loads."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from moss_rlhf.files import recover_directory

    script = textwrap.dedent(f"""
        import torch
        from moss_rlhf.checkpoint import Checkpointer
        from moss_rlhf.models import load_causal_lm, save_model
        model = load_causal_lm({str(tiny_model_dir)!r})
        checkpointer = Checkpointer({str(tmp_path / 'ckpt')!r}, {{"model": model}}, keep=2)
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model.lm_head.weight.fill_(float(step))
            if {what!r} == "checkpoint":
                checkpointer.save(step)
            else:
                save_model(model, None, {str(tmp_path / 'model')!r})
            if step == 1:
                open({str(tmp_path / 'wrote-once')!r}, "w").close()
        """)
    rng = random.Random(7)
    wrote_once = tmp_path / "wrote-once"
    for _ in range(4):
        wrote_once.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not wrote_once.exists() and proc.poll() is None:  # the kill comes after a first write, however slow
            time.sleep(0.02)
        time.sleep(rng.uniform(0.2, 1.5))
        assert proc.poll() is None, "the writer stopped on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if what == "checkpoint":
            checkpointer = Checkpointer(tmp_path / "ckpt", {"model": load_causal_lm(str(tiny_model_dir))})
            visible = sorted((tmp_path / "ckpt").glob("step-*"))
            assert visible and checkpointer.latest() == visible[-1]  # a published checkpoint is a whole one
            values = checkpointer.restore()  # and it holds the weights of its own step
            assert float(checkpointer.objects["model"].lm_head.weight[0, 0]) == values["step"]
        else:
            recover_directory(tmp_path / "model")
            loaded = load_causal_lm(str(tmp_path / "model"))
            assert torch.all(loaded.lm_head.weight == loaded.lm_head.weight[0, 0])
