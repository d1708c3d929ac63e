"""Typed run configurations: dataclasses, loadable from YAML, overridable per command-line flag, saved with every run.

Every stage has one flat dataclass (a stage may extend :class:`TrainConfig`, the knobs that all training loops
share). A field's ``metadata["help"]`` is its ``--help`` text, so the dataclass is the single source of truth for
defaults, types and documentation. Precedence: dataclass default < ``--config file.yaml`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message says which and why."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its ``--help`` text (mutable defaults are wrapped in a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Knobs shared by every training loop (pretrain, sft, reward, ppo)."""

    out: str = option("runs/run", "run directory: config.yaml, metrics.jsonl, TensorBoard logs, checkpoints, final model")
    seed: int = option(0, "random seed (data order, initialisation, sampling)")
    max_steps: int = option(200, "optimizer steps to run")
    batch_size: int = option(8, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    warmup_steps: int = option(20, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio")
    max_grad_norm: float = option(1.0, "global gradient-norm clip (0 disables)")
    precision: str = option("fp32", "autocast precision: fp32 or bf16", choices=("fp32", "bf16"))
    eval_every: int = option(50, "evaluate every N steps (0 disables)")
    eval_batches: int = option(8, "batches per evaluation")
    save_every: int = option(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue from the last checkpoint in --out")
    log_every: int = option(10, "write metrics every N steps")
    device: str = option("auto", "cpu, cuda, cuda:1, ... or auto")
    progress: bool = option(True, "show a progress bar")


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


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build a config from a mapping; unknown keys and wrong types are errors that name the key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(known)}")
    kwargs = {name: _coerce(v, _field_type(cls, known[name]), name, source) for name, v in values.items()}
    cfg = cls(**kwargs)
    validate(cfg, source)
    return cfg


def validate(cfg: Any, source: str = "config") -> None:
    """Check ``choices`` metadata and run the dataclass's own ``check()`` if it has one."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{source}: field '{f.name}' must be one of {', '.join(map(str, choices))}, "
                              f"got {getattr(cfg, f.name)!r}")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def load_yaml(cls: type[C], path: str | os.PathLike) -> C:
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
    return from_dict(cls, values, source=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Defaults, then the YAML file, then the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(to_dict(load_yaml(cls, args.config)))
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return from_dict(cls, values, source="command line")
