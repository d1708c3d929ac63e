"""Run directories: the resolved config is saved; metrics go to JSON lines (and TensorBoard); a fresh run refuses a
directory that holds an earlier run unless told to overwrite it (then only the run's own files go); a resume
forgets metric rows logged after its checkpoint, and refuses a changed trajectory unless the change is named (and
then records it); one run at a time holds a directory; curves are plotted to a PNG."""

from __future__ import annotations

import json

import pytest
import yaml

from moss_rlhf.config import ConfigError, TrainConfig
from moss_rlhf.runs import RunDir, plot_curves, read_metrics


def test_config_and_metrics_are_written(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), lr=0.02)
    run = RunDir(cfg.out, cfg)
    for step in (1, 2, 3):
        run.log(step, {"train/loss": 3.0 / step, "eval/loss": float("nan")})
    run.close()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.02
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["train/loss"] == 1.0
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard event files
    assert plot_curves(tmp_path / "run").name == "curves.png"


def test_a_reused_directory_needs_resume_or_overwrite(tmp_path):
    """Otherwise a later --resume would continue the older run's checkpoint and the two runs' curves would mix."""
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out))
    first = RunDir(out, cfg)
    first.log(1, {"train/loss": 1.0})
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds an earlier run .*--resume.*--overwrite"):
        RunDir(out, cfg)
    RunDir(out, cfg, resume=True).log(2, {"train/loss": 0.5})  # a resume continues it
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    RunDir(out, cfg, overwrite=True)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the run's are left alone
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RunDir(tmp_path / "file", cfg)


def test_resume_forgets_rows_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, TrainConfig(out=str(out)))
    for step in range(1, 6):
        run.log(step, {"train/loss": float(step)})
    resumed = RunDir(out, TrainConfig(out=str(out)), resume=True)
    resumed.truncate_metrics(3)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    resumed.truncate_metrics(0)  # resumed before the first checkpoint: every row will be logged again
    assert read_metrics(out) == []


def test_a_line_cut_short_by_a_kill_is_passed_over_and_a_bad_one_is_named(tmp_path):
    """A run killed while appending leaves a last line without its newline: reading (the report) passes over it, a
    resume drops it; a malformed line anywhere else is an error with the file and line. A long row is written whole
    (one write on an append-only descriptor, not a buffered file's 8 KiB pieces)."""
    from moss_rlhf.data.formats import DataError

    out = tmp_path / "run"
    run = RunDir(out, TrainConfig(out=str(out)))
    wide = {f"metric/{i:05d}": float(i) for i in range(1000)}  # a row of ~20 KB
    for step in range(1, 4):
        run.log(step, wide)
    path = out / "metrics.jsonl"
    assert [len(line) for line in path.read_text().splitlines()] == [len(json.dumps({"step": 1, **wide}))] * 3
    with path.open("a") as fh:
        fh.write('{"step": 4, "train/lo')
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    RunDir(out, TrainConfig(out=str(out)), resume=True).truncate_metrics(3)
    assert path.read_text().endswith("}\n") and len(read_metrics(out)) == 3
    path.write_text(path.read_text().replace('"step": 2,', '"step": 2', 1))
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(out)


def test_a_resume_refuses_a_changed_trajectory_unless_overridden(tmp_path):
    from moss_rlhf.stages.sft import SFTConfig

    out = tmp_path / "run"
    cfg = SFTConfig(out=str(out), data=["a.jsonl"], lr=0.001)
    RunDir(out, cfg).close()
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    changed = SFTConfig(out=str(out), data=["a.jsonl"], lr=0.002, batch_size=3, resume=True, eval_every=7,
                        progress=False)
    with pytest.raises(ConfigError, match=r"--batch-size 64 → 3; --lr 0.001 → 0.002.*--resume-override "
                                          r"batch_size,lr"):
        RunDir(out, changed, resume=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.001  # the saved config still tells the truth
    accepted = SFTConfig(**{**changed.__dict__, "resume_override": ["lr", "batch_size"]})
    RunDir(out, accepted, resume=True).close()  # eval_every and progress may change freely
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.002
    record = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record[-1]["overrides"] == {"batch_size": [64, 3], "lr": [0.001, 0.002]}


def test_one_run_at_a_time_per_directory(tmp_path):
    """A second process on the same --out stops at once, naming the holder; the same process may go on (the demo
    runs its stages one after another)."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from moss_rlhf.config import TrainConfig
        from moss_rlhf.runs import RunDir
        RunDir({str(out)!r}, TrainConfig())
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is in use by process {holder.pid} on "):
            RunDir(out, TrainConfig(), resume=True)
    finally:
        holder.kill()
        holder.wait()
    first = RunDir(out, TrainConfig(), resume=True)  # the holder is gone: its lock went with it
    RunDir(out, TrainConfig(), resume=True).close()  # this process already holds it, and still does
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from moss_rlhf.config import TrainConfig
        from moss_rlhf.runs import RunDir
        RunDir({str(out)!r}, TrainConfig(), resume=True)
        """)], capture_output=True, text=True)
    assert "is in use by process" in probe.stderr
    first.close()
