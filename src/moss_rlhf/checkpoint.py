"""One checkpointer for every training loop: the loop names what it trains and what else must survive a restart,
and ``save(step)`` / ``restore()`` do the rest.

Layout of a checkpoint::

    checkpoints/step-00000200/
        <name>/      each tracked model, save_pretrained (readable by transformers; LoRA: merged weights)
        state.pt     state_dict() of every other tracked object (optimizers, schedules, running statistics, KL
                     controllers), LoRA adapter weights, the RNG states, the step and the loop's plain values

A checkpoint is written into a temporary directory and renamed into place, so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one; only the last ``keep`` are kept. ``restore()``
loads the newest into the very objects that were saved, so the loop continues exactly where it stopped.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from moss_rlhf.config import ConfigError, atomic_directory


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
        found = sorted(self.root.glob("step-*"))
        return found[-1] if found else None

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
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint into the tracked objects and the RNGs; returns its values with ``"step"``, or
        None (with a note) when there is none yet."""
        from moss_rlhf.models import load_trainable_state, load_weights

        checkpoint = self.latest()
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
