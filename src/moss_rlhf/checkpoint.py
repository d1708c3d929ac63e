"""One checkpointer for every training loop: the loop names what it trains and what else must survive a restart,
and ``save(step)`` / ``restore()`` do the rest.

Layout of a checkpoint::

    checkpoints/step-00000200/
        <name>/        each tracked model, save_pretrained (readable by transformers; LoRA: merged weights)
        state.pt       state_dict() of every other tracked object (optimizers, schedules, running statistics, KL
                       controllers), LoRA adapter weights, the RNG states, the step and the loop's plain values
        manifest.json  the SHA-256 of every file above

A checkpoint is written into a temporary directory, fsynced and renamed into place (``files.atomic_directory``), so
a run killed at any moment leaves either the previous checkpoint or the new one, never half of one; only the last
``keep`` are kept. ``restore()`` loads the newest checkpoint whose files match its manifest into the very objects
that were saved, so the loop continues exactly where it stopped; a damaged one (a disk error, a file truncated by
hand) is passed over with a warning for the one before it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.files import atomic_directory, checksums


class Checkpointer:
    """Checkpoints of ``objects`` (name → ``nn.Module`` or anything with ``state_dict``/``load_state_dict``) under
    ``root``. Only the main process writes; every process restores."""

    def __init__(self, root: str | Path, objects: dict[str, Any], tokenizer=None, keep: int = 2,
                 is_main: bool = True, desc: str = "train"):
        self.root = Path(root)
        self.objects = objects
        self.tokenizer = tokenizer
        self.keep = keep
        self.is_main = is_main
        self.desc = desc

    def latest(self) -> Path | None:
        """The newest intact checkpoint (its files match its manifest), or None."""
        return next((c for c in reversed(sorted(self.root.glob("step-*"))) if intact(c)), None)

    def save(self, step: int, **values: Any) -> Path | None:
        """Write ``checkpoints/step-N`` with every tracked object and ``values`` (plain Python data)."""
        if not self.is_main:
            return None
        from moss_rlhf.models import save_model, trainable_state

        final = self.root / f"step-{step:08d}"
        state: dict[str, Any] = {"step": step, "values": values, "rng": rng_state(), "objects": {}, "adapters": {}}
        with atomic_directory(final) as tmp:
            for name, obj in self.objects.items():
                if isinstance(obj, torch.nn.Module):
                    save_model(obj, self.tokenizer, tmp / name)
                    state["adapters"][name] = trainable_state(obj)
                else:
                    state["objects"][name] = obj.state_dict()
            torch.save(state, tmp / "state.pt")
            (tmp / MANIFEST).write_text(json.dumps(checksums(tmp), indent=0, sort_keys=True), encoding="utf-8")
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint into the tracked objects and the RNGs; returns its values with ``"step"``, or
        None (with a note) when there is none yet."""
        from moss_rlhf.models import load_trainable_state, load_weights

        found = sorted(self.root.glob("step-*"))
        checkpoint = self.latest()
        for damaged in (c for c in found if checkpoint is None or c > checkpoint):
            if self.is_main:
                print(f"{self.desc}: warning: {damaged} is damaged (its files do not match its manifest); "
                      f"resuming from the checkpoint before it")
        if checkpoint is None and found:
            raise ConfigError(f"{self.root}: no intact checkpoint ({', '.join(c.name for c in found)} are damaged); "
                              f"--overwrite starts afresh")
        if checkpoint is None:
            if self.is_main:
                print(f"{self.desc}: --resume given but {self.root} holds no checkpoint yet; starting from step 0")
            return None
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        missing = [name for name in self.objects if name not in state.get("objects", {}) and name not in
                   state.get("adapters", {})]
        if missing:
            raise ConfigError(f"{checkpoint}: this checkpoint holds no {', '.join(missing)} (written by another "
                              f"kind of run, or by an older moss-rlhf); --overwrite starts afresh")
        for name, obj in self.objects.items():
            if isinstance(obj, torch.nn.Module):
                load_weights(obj, checkpoint / name)
                load_trainable_state(obj, state["adapters"].get(name))
            else:
                obj.load_state_dict(state["objects"][name])
        set_rng_state(state["rng"])
        if self.is_main:
            print(f"{self.desc}: resumed from {checkpoint} at step {state['step']}")
        return {**state["values"], "step": state["step"]}


MANIFEST = "manifest.json"


def intact(checkpoint: Path) -> bool:
    """Whether every file of ``checkpoint`` is there with the checksum its manifest recorded (and nothing else)."""
    try:
        recorded = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    found = checksums(checkpoint)
    found.pop(MANIFEST, None)
    return found == recorded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:
        pass


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
