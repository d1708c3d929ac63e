"""Typed run configurations: dataclasses, loadable from YAML, overridable per command-line flag, saved with every run.

Every stage has one flat dataclass (a stage may extend :class:`TrainConfig`, the knobs that all training loops
share). A field's ``metadata["help"]`` is its ``--help`` text, so the dataclass is the single source of truth for
defaults, types and documentation. Precedence: dataclass default < ``--config file.yaml`` < explicit flags, and the
merged values are validated once, at the end (so a YAML file may leave out what a flag gives). Validation checks
values only and never touches the file system: a stage checks its paths when it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moss_rlhf.files import atomic_write_text

C = TypeVar("C")


class UserError(ValueError):
    """A mistake of the user's (a flag, a file, too little data): the CLI prints its message as one line and exits
    with status 2, without a traceback. Every such mistake raises a subclass of this, never a bare ``ValueError``."""


class ConfigError(UserError):
    """A configuration value or file is invalid; the message says which and why."""


class NonFiniteError(UserError):
    """A loss, gradient, reward, advantage, logit or weight is NaN or infinite: the run stops (or, with
    ``--on-nonfinite skip``, skips the step) and nothing non-finite is ever saved."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its ``--help`` text (mutable defaults are wrapped in a factory). Optional bounds, checked
    by :func:`validate`: ``at_least``/``at_most`` (inclusive), ``above``/``below`` (exclusive); ``choices``;
    ``free_on_resume``: the option may change when a run resumes (it does not change the run's trajectory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


class Config:
    """Base of every config dataclass: an instance is validated when it is made (bounds, choices, then its own
    ``check()``), so no stage ever runs on an invalid one, whether it came from flags, YAML or Python code."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class TrainConfig(Config):
    """Knobs shared by every training loop (pretrain, sft, reward, ppo)."""

    out: str = option("runs/run", "run directory: config.yaml, metrics.jsonl, TensorBoard logs, checkpoints, "
                                  "final model", free_on_resume=True)
    seed: int = option(0, "random seed (data order, initialisation, sampling)")
    max_steps: int = option(200, "optimizer steps to run", at_least=1)
    batch_size: int = option(8, "sequences per micro-batch per process", at_least=1)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", at_least=1)
    lr: float = option(1e-3, "peak learning rate (AdamW)", above=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms)", at_least=0.0)
    beta1: float = option(0.9, "AdamW beta1", at_least=0.0, below=1.0)
    beta2: float = option(0.95, "AdamW beta2", at_least=0.0, below=1.0)
    warmup_steps: int = option(20, "linear warm-up steps before the cosine decay", at_least=0)
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio", at_least=0.0, at_most=1.0)
    max_grad_norm: float = option(1.0, "global gradient-norm clip (0 disables)", at_least=0.0)
    precision: str = option("fp32", "autocast precision: fp32 or bf16", choices=("fp32", "bf16"))
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)", at_least=0, free_on_resume=True)
    eval_batches: int = option(8, "batches per evaluation", at_least=1, free_on_resume=True)
    save_every: int = option(100, "checkpoint every N steps (0: only at the end)", at_least=0, free_on_resume=True)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", at_least=1, free_on_resume=True)
    resume: bool = option(False, "continue from the last intact checkpoint in --out", free_on_resume=True)
    resume_override: list[str] = option([], "with --resume: options that may differ from the run's saved config "
                                            "(e.g. max_steps); any other change is refused", free_on_resume=True)
    overwrite: bool = option(False, "start afresh in an --out that holds an earlier run's checkpoints (deletes them)",
                             free_on_resume=True)
    on_nonfinite: str = option("stop", "a NaN/Inf loss or gradient norm: stop (nothing of that step is applied or "
                                       "saved) or skip the step", choices=("stop", "skip"), free_on_resume=True)
    max_skipped_steps: int = option(10, "with --on-nonfinite skip: stop after this many skipped steps", at_least=0,
                                    free_on_resume=True)
    log_every: int = option(10, "write metrics every N steps", at_least=1, free_on_resume=True)
    device: str = option("auto", "cpu, cuda, cuda:1, ... or auto", free_on_resume=True)
    progress: bool = option(True, "show a progress bar", free_on_resume=True)
    parallel: str = option("ddp", "with several processes: ddp (whole models everywhere) or fsdp (FSDP2: weights, "
                                  "gradients and optimizer state sharded; checkpoints sharded too)",
                           choices=("ddp", "fsdp"))
    cpu_offload: bool = option(False, "fsdp: keep the shards and the optimizer step on the CPU")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward instead of "
                                                   "storing them (less memory, ~a third more compute)")
    compile: bool = option(False, "torch.compile (inductor) each transformer block of the models, and RL's decode "
                                  "step: faster steps after 10-60 s of compilation on first use (cached on disk "
                                  "for later runs); for long runs. On the CPU it needs a C++ compiler",
                           free_on_resume=True)

    def check(self) -> None:
        """The checks every training loop shares (a stage's own ``check`` calls this first)."""
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError("--cpu-offload needs --parallel fsdp")
        if self.compile:
            check_compile(self.parallel, self.device)


def check_compile(parallel: str, device: str) -> None:
    """``--compile`` can run here: not with FSDP2 (its hooks gather a block's weights around the block, where a
    compiled block would trace them), and on the CPU with a C++ compiler for inductor's kernels."""
    import torch

    if parallel == "fsdp":
        raise ConfigError("--compile is not supported with --parallel fsdp (use --parallel ddp or drop --compile)")
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    compiler = os.environ.get("CXX") or "g++"
    if on_cpu and shutil.which(compiler) is None:
        raise ConfigError(f"--compile on the CPU needs a C++ compiler for inductor's kernels: {compiler!r} is not on "
                          f"the PATH (install g++, set CXX, or drop --compile)")


# --------------------------------------------------------------------------------------------------------------------
# YAML <-> dataclass


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(value: Any, typ: Any, name: str, source: str) -> Any:
    """Check and convert one value to the field's declared type, naming the field and source on failure."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name, source)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: field '{name}' expects a list, got {value!r}")
        return [_coerce(v, inner, name, source) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: field '{name}' expects true/false, got {value!r}")
    if typ in (int, float, str):
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: field '{name}' expects an integer, got {value!r}")
        if typ in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{source}: field '{name}' expects a number, got {value!r}")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: field '{name}' expects {typ.__name__}, got {value!r}") from None
    return value


def coerce_values(cls: type, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Each value converted to its field's type; unknown keys and wrong types are errors that name the key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; known: "
                          f"{', '.join(known)}")
    return {name: _coerce(v, _field_type(cls, known[name]), name, source) for name, v in values.items()}


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build (and so validate) a config from a mapping; an error names the source."""
    values = coerce_values(cls, values, source)
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


_BOUNDS = {"at_least": (lambda v, b: v >= b, "at least"), "at_most": (lambda v, b: v <= b, "at most"),
           "above": (lambda v, b: v > b, "above"), "below": (lambda v, b: v < b, "below")}


def validate(cfg: Any) -> None:
    """Check ``choices`` and bounds metadata (floats must also be finite), then run the dataclass's own ``check()``
    if it has one. Values only: nothing here reads the file system."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:  # None: filled later (a preset)
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value!r}")
        for key, (holds, words) in _BOUNDS.items():
            bound = f.metadata.get(key)
            if bound is not None and isinstance(value, (int, float)) and not holds(value, bound):
                raise ConfigError(f"{flag} must be {words} {bound}, got {value!r}")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def load_yaml(cls: type[C], path: str | os.PathLike) -> C:
    """A config from a YAML file alone, validated."""
    return from_dict(cls, read_yaml_values(cls, path), source=str(path))


def read_yaml_values(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The YAML file's fields, type-checked but not yet validated as a whole (flags may still complete them)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return coerce_values(cls, values, source=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------------------------------------------------
# argparse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field, with the field's help and default; values stay None unless given."""
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="VALUE",
                                help=help_text + "; repeat the flag for several")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                choices=f.metadata.get("choices"), help=help_text)
        if f.metadata.get("positional"):  # `moss-rlhf chat MODEL` as well as `--model MODEL`
            # SUPPRESS: when the positional is absent it leaves the flag's value alone
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"same as {flag}")


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults, then the YAML file, then the flags that were given; then one validation of the result."""
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        values.update(read_yaml_values(cls, args.config))
        source = f"{args.config} + command line"
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return from_dict(cls, values, source=source)
