"""One checkpointer for every training loop: the loop names what it trains and what else must survive a restart,
and ``save(step)`` / ``restore()`` do the rest.

Layout of a checkpoint::

    checkpoints/step-00000200/
        <name>/        each tracked model, save_pretrained (readable by transformers; LoRA: merged weights)
        state.pt       state_dict() of every other tracked object (optimizers, schedules, running statistics, KL
                       controllers), LoRA adapter weights, the RNG states, the step and the loop's plain values
        manifest.json  the SHA-256 of every file above

With models sharded by FSDP (``--parallel fsdp``), those models and their optimizers go to ``sharded/`` instead, through
``torch.distributed.checkpoint``: every process writes its own shards (no process ever holds a whole model or
optimizer), and a resumed run must have as many processes. Only trainable weights go there: frozen ones (a LoRA
model's base) are the start model's, loaded again on resume, so a LoRA checkpoint holds the adapters, not the base
again. The final model is still one ``save_pretrained`` directory (``models.save_model`` gathers it once).

A checkpoint is written into a temporary directory, fsynced and renamed into place (``files.atomic_directory``), so
a run killed at any moment leaves either the previous checkpoint or the new one, never half of one; only the last
``keep`` are kept. ``restore()`` loads the newest checkpoint whose files match its manifest into the very objects
that were saved, so the loop continues exactly where it stopped; a damaged one (a disk error, a file truncated by
hand) is passed over with a warning for the one before it.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from moss_rlhf import distributed
from moss_rlhf.config import ConfigError
from moss_rlhf.files import atomic_directory, checksums, staging_path


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
        # name -> model for the sharded models, name -> (its model, optimizer) for their optimizers
        self.sharded = {k: m for k, m in objects.items() if isinstance(m, torch.nn.Module) and
                        distributed.is_sharded(m)}
        self.sharded_optimizers = {k: (owner, o) for k, o in objects.items() if isinstance(o, torch.optim.Optimizer)
                                   for owner in self.sharded.values() if _holds(owner, o)}
        self.in_dcp = set(self.sharded) | set(self.sharded_optimizers)  # the rest goes to <name>/ and state.pt

    def latest(self) -> Path | None:
        """The newest intact checkpoint (its files match its manifest), or None."""
        return next((c for c in reversed(sorted(self.root.glob("step-*"))) if intact(c)), None)

    def save(self, step: int, **values: Any) -> Path | None:
        """Write ``checkpoints/step-N`` with every tracked object and ``values`` (plain Python data). Every process
        calls this: with sharded models each writes its shards, and the main process publishes the directory."""
        if not self.is_main and not self.sharded:
            return None
        from moss_rlhf.models import save_model, trainable_state

        final = self.root / f"step-{step:08d}"
        state: dict[str, Any] = {"step": step, "values": values, "rng": rng_state(), "objects": {}, "adapters": {}}
        staging = atomic_directory(final) if self.is_main else contextlib.nullcontext(staging_path(final))
        with staging as tmp:
            if self.sharded:
                import torch.distributed.checkpoint as dcp

                distributed.barrier()  # the main process has made the staging directory
                dcp.save(self._sharded_state(), checkpoint_id=str(tmp / "sharded"))
                distributed.barrier()  # every process has written its shards
            if self.is_main:
                for name, obj in self.objects.items():
                    if name in self.in_dcp:
                        continue
                    if isinstance(obj, torch.nn.Module):
                        save_model(obj, self.tokenizer, tmp / name)
                        state["adapters"][name] = trainable_state(obj)
                    else:
                        state["objects"][name] = obj.state_dict()
                torch.save(state, tmp / "state.pt")
                (tmp / MANIFEST).write_text(json.dumps(checksums(tmp), indent=0, sort_keys=True),
                                            encoding="utf-8")
        if self.sharded:
            distributed.barrier()  # published before anyone goes on (or deletes older ones)
            if not self.is_main:
                return None
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint into the tracked objects and the RNGs; returns its values with ``"step"``, or
        None (with a note) when there is none yet."""
        from moss_rlhf.models import load_trainable_state, load_weights

        found = sorted(self.root.glob("step-*"))
        checkpoint = self.latest() if self.is_main or not self.sharded else None
        if self.sharded:  # every process loads the one the main process found intact
            checkpoint = distributed.broadcast_object(checkpoint)
        for damaged in (c for c in found if checkpoint is None or c > checkpoint):
            if self.is_main:
                print(f"{self.desc}: warning: {damaged} is damaged (its files do not match its manifest); "
                      f"resuming from the checkpoint before it")
        if checkpoint is None and found:
            raise ConfigError(f"{self.root}: no intact checkpoint ({', '.join(c.name for c in found)} are damaged); "
                              f"--overwrite starts afresh")
        if checkpoint is None:
            if self.is_main:
                print(f"{self.desc}: resuming, but {self.root} holds no checkpoint yet; starting from step 0")
            return None
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        missing = [name for name in self.objects if name not in state.get("objects", {}) and name not in
                   state.get("adapters", {}) and name not in self.in_dcp]
        written_sharded = (checkpoint / "sharded").is_dir()
        if bool(self.sharded) != written_sharded:
            raise ConfigError(f"{checkpoint}: written by a --parallel {'fsdp' if written_sharded else 'ddp'} run, "
                              f"whose models are {'' if written_sharded else 'not '}sharded; resume it with the same "
                              f"--parallel (--overwrite starts afresh)")
        if missing:
            raise ConfigError(f"{checkpoint}: this checkpoint holds no {', '.join(missing)} (written by another "
                              f"kind of run, or by an older moss-rlhf); --overwrite starts afresh")
        if self.sharded:
            self._load_sharded(checkpoint / "sharded")
        for name, obj in self.objects.items():
            if name in self.in_dcp:
                continue
            if isinstance(obj, torch.nn.Module):
                load_weights(obj, checkpoint / name)
                load_trainable_state(obj, state["adapters"].get(name))
            else:
                obj.load_state_dict(state["objects"][name])
        set_rng_state(state["rng"])
        if self.is_main:
            print(f"{self.desc}: resumed from {checkpoint} at step {state['step']}")
        return {**state["values"], "step": state["step"]}

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        for model in self.sharded.values():
            distributed.reshard(model)  # its shards, not the root's weights a forward left gathered
        state = {name: get_model_state_dict(model, options=_trainable_only()) for name, model in self.sharded.items()}
        state.update({name: get_optimizer_state_dict(model, optimizer)
                      for name, (model, optimizer) in self.sharded_optimizers.items()})
        return state

    def _load_sharded(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._sharded_state()
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except Exception as e:  # another number of processes, another model
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ConfigError(f"{folder}: cannot load the sharded checkpoint ({reason[:300]}); a sharded run "
                              f"resumes with the same models and number of processes") from None
        for name, model in self.sharded.items():
            set_model_state_dict(model, state[name], options=_trainable_only())
        for name, (model, optimizer) in self.sharded_optimizers.items():
            set_optimizer_state_dict(model, optimizer, state[name])


def _trainable_only():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights are left out, and so not missed on loading (dcp.load has already checked every trainable one)
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _holds(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps ``model``'s parameters."""
    mine = {id(p) for p in model.parameters()}
    return any(id(p) in mine for group in optimizer.param_groups for p in group["params"])


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
