"""Run directories: the resolved config, metrics (JSON lines + TensorBoard + a PNG of the curves) and a progress
bar; checkpoints live in ``checkpoints/`` and are written by :class:`moss_rlhf.checkpoint.Checkpointer`.

Layout of a run directory::

    config.yaml           the resolved configuration
    metrics.jsonl         one JSON object per logged step ({"step": …, "train/loss": …, …})
    tb/                   TensorBoard event files
    checkpoints/step-N/   everything needed for an exact resume (``checkpoint.py``)
    model/                the final model (save_pretrained, written atomically)
    curves.png            the loss curves

A run directory holds one run:

- starting afresh (no ``--resume``) where an earlier run left checkpoints or metrics is refused unless
  ``--overwrite`` says to delete them — otherwise a later ``--resume`` would continue the older run's checkpoint,
  and the curves of two runs would mix;
- a resume that changes what determines the trajectory (``--lr``, ``--batch-size``, ``--data``, ``--seed``...) is
  refused unless ``--resume-override`` names the options; accepted changes are recorded in ``resumes.jsonl``;
- one run at a time: the main process holds an exclusive lock on ``.lock`` (released when it ends, however it ends);
  a second run on the same directory stops with a message naming the holder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from moss_rlhf.config import ConfigError, save_yaml, to_dict
from moss_rlhf.data.formats import DataError
from moss_rlhf.files import atomic_write_text, recover_directory

# what a run writes into its directory (and --overwrite deletes; nothing else there is touched)
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "model", "best", "best.json", "samples", "curves.png",
                 "held_out.jsonl", "resumes.jsonl")


class RunDir:
    """A run's directory. Only the main process (rank 0) writes; other ranks get a no-op logger."""

    def __init__(self, out: str | os.PathLike, cfg: Any, is_main: bool = True, resume: bool = False,
                 overwrite: bool = False):
        self.path = Path(out)
        self.is_main = is_main
        self._tb = None
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a directory")
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            _lock(self.path)
        try:
            earlier, changes = self._check(cfg, resume, overwrite)
        except BaseException:
            if is_main:
                _unlock(self.path)
            raise
        if not is_main:
            return
        if earlier and not resume:  # --overwrite
            for name in RUN_ARTIFACTS:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        for name in ("model", "best"):
            recover_directory(self.path / name)
        if changes:
            record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": {k: list(v) for k, v in changes.items()}}
            append_line(self.path / "resumes.jsonl", json.dumps(record))
        save_yaml(cfg, self.path / "config.yaml")

    def _check(self, cfg: Any, resume: bool, overwrite: bool) -> tuple[list[str], dict]:
        """What an earlier run left here, and what a resume would change; refuses a start that would mix runs."""
        earlier = [name for name in ("checkpoints", "metrics.jsonl") if (self.path / name).exists()]
        if earlier and not resume and not overwrite:
            raise ConfigError(f"--out {self.path} holds an earlier run ({', '.join(earlier)}): pass --resume to "
                              f"continue it, or --overwrite to delete it and start afresh")
        changes = resume_changes(self.path, cfg) if resume and (self.path / "checkpoints").exists() else {}
        refused = sorted(set(changes) - set(getattr(cfg, "resume_override", [])))
        if refused:
            shown = "; ".join(f"--{k.replace('_', '-')} {changes[k][0]!r} → {changes[k][1]!r}" for k in refused)
            raise ConfigError(f"--resume: {shown}: the checkpoints in {self.path} belong to a run with the saved "
                              f"values; pass --resume-override {','.join(refused)} to change them anyway, or "
                              f"--overwrite to start afresh")
        return earlier, changes

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.path / "model"

    # ---------------------------------------------------------------------------------------------------- metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        append_line(self.metrics_path, json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}))
        writer = self._writer()
        if writer is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    writer.add_scalar(key, float(value), step)
            writer.flush()

    def _writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but metrics.jsonl alone is still a complete record
                self._tb = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._tb or None

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, forget metrics logged after the checkpoint we continue from (they will be logged again)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        rows = read_metrics(self.path)
        kept = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= after_step)
        atomic_write_text(self.metrics_path, kept)

    def close(self) -> None:
        if self._tb:
            self._tb.close()
            self._tb = None
        if self.is_main:
            _unlock(self.path)

# ---------------------------------------------------------------------------------------------------- one run at a time

_HELD: dict[str, list[int]] = {}  # run directories this process holds -> [lock file descriptor, holders]


def _lock(path: Path) -> None:
    """Take the run directory's exclusive lock (this process may take it again: stages run one after another)."""
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"--out {path} is in use by {holder}; wait for that run to end or choose another --out") \
            from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%H:%M:%S')})".encode())
    _HELD[key] = [fd, 1]


def _unlock(path: Path) -> None:
    held = _HELD.get(str(path.resolve()))
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[str(path.resolve())]
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])


def resume_changes(path: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Options whose value differs from the run's saved config.yaml, except those marked ``free_on_resume``
    (logging, checkpointing, the device...): the ones that would change the trajectory of the run."""
    saved_file = path / "config.yaml"
    if not saved_file.exists() or not dataclasses.is_dataclass(cfg):
        return {}
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # the same YAML round trip as the saved values
    free = {f.name for cls in type(cfg).__mro__ if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)
            if f.metadata.get("free_on_resume")}  # as marked where the option is first declared
    return {name: (saved[name], value) for name, value in current.items()
            if name not in free and name in saved and saved[name] != value}


def append_line(path: Path, text: str) -> None:
    """``text`` and a newline at the end of ``path`` in one write() on an O_APPEND descriptor: a run killed at any
    moment leaves whole lines (a buffered text file writes a long line in 8 KiB pieces); :func:`read_metrics` still
    passes over a last line cut short (a full disk, a crash of the machine)."""
    data = (text + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a short write (rare) continues where it stopped
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """A run's ``metrics.jsonl`` rows. A last line without its newline — an append that a killed run, or a run
    still writing, did not finish — is passed over; any other bad line is an error naming the file and line."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), number, None, f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise DataError(str(path), number, "step", "expected an object with a numeric step")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------ plots


def plot_curves(run: str | os.PathLike, keys: list[str] | None = None, filename: str = "curves.png",
                title: str | None = None) -> Path | None:
    """One panel per metric (default: every key with 'loss' in it) against the step; written atomically."""
    rows = read_metrics(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_keys = sorted({k for r in rows for k in r if k != "step"})
    keys = [k for k in (keys or [k for k in all_keys if "loss" in k]) if k in all_keys] or all_keys[:4]
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 40 else None, linewidth=1.4)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(run) / filename
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar over optimizer steps showing loss, tokens/s and ETA; silent off the main process."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.1)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def update(self, n_tokens: int = 0, **postfix: float) -> None:
        self._tokens += n_tokens
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self._tokens:
            shown["tok/s"] = f"{self._tokens / elapsed:,.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
