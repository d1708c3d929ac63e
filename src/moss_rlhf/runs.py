"""Run directories: the resolved config, metrics (JSON lines + TensorBoard + a PNG of the curves) and a progress
bar; checkpoints live in ``checkpoints/`` and are written by :class:`moss_rlhf.checkpoint.Checkpointer`.

Layout of a run directory::

    config.yaml           the resolved configuration
    metrics.jsonl         one JSON object per logged step ({"step": …, "train/loss": …, …})
    tb/                   TensorBoard event files
    checkpoints/step-N/   everything needed for an exact resume (``checkpoint.py``)
    model/                the final model (save_pretrained, written atomically)
    curves.png            the loss curves

A run directory holds one run: starting afresh (no ``--resume``) where an earlier run left checkpoints or metrics is
refused unless ``--overwrite`` says to delete them — otherwise a later ``--resume`` would continue the older run's
checkpoint, and the curves of two runs would mix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from moss_rlhf.config import ConfigError, save_yaml

# what a run writes into its directory (and --overwrite deletes; nothing else there is touched)
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "model", "best", "best.json", "samples", "curves.png",
                 "held_out.jsonl")


class RunDir:
    """A run's directory. Only the main process (rank 0) writes; other ranks get a no-op logger."""

    def __init__(self, out: str | os.PathLike, cfg: Any, is_main: bool = True, resume: bool = False,
                 overwrite: bool = False):
        self.path = Path(out)
        self.is_main = is_main
        self._tb = None
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a directory")
        earlier = [name for name in ("checkpoints", "metrics.jsonl") if (self.path / name).exists()]
        if earlier and not resume and not overwrite:
            raise ConfigError(f"--out {self.path} holds an earlier run ({', '.join(earlier)}): pass --resume to "
                              f"continue it, or --overwrite to delete it and start afresh")
        if not is_main:
            return
        if earlier and not resume:  # --overwrite
            for name in RUN_ARTIFACTS:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.path / "config.yaml")

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
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
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
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(kept, encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def close(self) -> None:
        if self._tb:
            self._tb.close()
            self._tb = None

def read_metrics(run: str | os.PathLike) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
