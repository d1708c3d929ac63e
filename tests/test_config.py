"""Configs: defaults < YAML < flags; wrong types and unknown keys are clear errors; the resolved config is saved;
every subcommand's --help documents every option."""

from __future__ import annotations

import dataclasses

import pytest

from moss_rlhf.cli import _commands, build_parser
from moss_rlhf.config import ConfigError, from_args, load_yaml, save_yaml
from moss_rlhf.stages.pretrain import PretrainConfig


def test_yaml_then_flags_override_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.01\nmax_steps: 7\ndata: [a.jsonl, b.jsonl]\n")
    args = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "run.yaml"), "--max-steps", "9"])
    cfg = from_args(PretrainConfig, args)
    assert (cfg.lr, cfg.max_steps, cfg.data, cfg.batch_size) == (0.01, 9, ["a.jsonl", "b.jsonl"], 32)
    save_yaml(cfg, tmp_path / "saved.yaml")
    assert load_yaml(PretrainConfig, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, message", [
    ("lr: fast\n", "field 'lr' expects float"),
    ("learning_rate: 0.1\n", "unknown field(s) learning_rate"),
    ("precision: fp8\n", "--precision must be one of fp32, bf16"),
    ("lr: -1\n", "--lr must be above 0.0, got -1.0"),
    ("max_grad_norm: .nan\n", "--max-grad-norm must be a finite number"),
    ("lr: [\n", "line 2: not valid YAML"),
    ("- a\n", "expected a mapping"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(PretrainConfig, tmp_path / "bad.yaml")
    assert message in str(info.value) and "bad.yaml" in str(info.value)


def test_every_subcommand_documents_every_option(capsys):
    parser = build_parser()
    for name, (_, config_cls, _) in _commands().items():
        groups = config_cls.items() if isinstance(config_cls, dict) else [(None, (None, config_cls, None))]
        for sub, (_, cls, _) in groups:
            argv = [name] + ([sub] if sub else []) + ["--help"]
            with pytest.raises(SystemExit):
                parser.parse_args(argv)
            text = capsys.readouterr().out
            for f in dataclasses.fields(cls):
                assert "--" + f.name.replace("_", "-") in text, (argv, f.name)
                assert f.metadata.get("help"), (cls.__name__, f.name)


def test_yaml_may_leave_out_what_the_flags_give(tmp_path):
    """YAML, then flags, then one validation: a YAML without the required data is completed by --data."""
    (tmp_path / "run.yaml").write_text("lr: 0.01\n")
    args = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "run.yaml"), "--data", "x.jsonl"])
    cfg = from_args(PretrainConfig, args)
    assert (cfg.lr, cfg.data) == (0.01, ["x.jsonl"])
    with pytest.raises(ConfigError, match=r"run.yaml \+ command line: give --data"):
        from_args(PretrainConfig, build_parser().parse_args(["pretrain", "--config", str(tmp_path / "run.yaml")]))


def test_validation_never_touches_the_file_system(tmp_path, monkeypatch):
    """Paths are checked when a stage starts: a config naming missing files is still a valid config."""
    import builtins
    import os
    from pathlib import Path

    from moss_rlhf.evaluate import EvaluateConfig
    from moss_rlhf.stages.rl import RLConfig

    def refuse(*args, **kwargs):
        raise AssertionError("validation touched the file system")

    for name in ("exists", "is_dir", "is_file", "stat", "open", "read_text"):
        monkeypatch.setattr(Path, name, refuse)
    monkeypatch.setattr(os.path, "exists", refuse)
    monkeypatch.setattr(builtins, "open", refuse)
    EvaluateConfig(model_a="/nowhere/a", model_b="/nowhere/b", prompts="/nowhere/p.jsonl", judge="/nowhere/rm")
    RLConfig(policy="/nowhere", prompts=["/nowhere/p.jsonl"])
    for name, (_, cls, _) in _commands().items():
        classes = cls.values() if isinstance(cls, dict) else [(None, cls, None)]
        for _, config_cls, _ in classes:
            try:
                config_cls()
            except ConfigError:
                pass  # a required value is missing: a value check, not a file check


def test_configs_made_in_python_are_validated_too():
    from moss_rlhf.stages.sft import SFTConfig

    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        SFTConfig(data=["x"], batch_size=0)
    with pytest.raises(ConfigError, match="give --data"):
        SFTConfig()


# numeric options that may take any value: seeds, and a strength threshold that may be negative
ANY_NUMBER = {"seed", "flip_below"}
# numeric options bounded in their config's own check(), with a message that names both ends
BOUNDED_IN_CHECK = {("ServeConfig", "port")}


def test_every_numeric_option_is_range_checked():
    """Every int or float option of every command carries bounds or choices, checked when the config is made: an
    out-of-range value is an error that names the flag, never a run on silent garbage (an export of margins below
    zero, annotators who err more often than always)."""
    import typing

    classes = [cls for _, config_cls, _ in _commands().values()
               for _, cls, _ in (config_cls.values() if isinstance(config_cls, dict) else [(None, config_cls, None)])]
    unchecked = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            exempt = f.name in ANY_NUMBER or (cls.__name__, f.name) in BOUNDED_IN_CHECK
            bounded = any(k in f.metadata for k in ("at_least", "at_most", "above", "below", "choices"))
            if hints[f.name] in (int, float, int | None, float | None) and not (bounded or exempt):
                unchecked.add(f"{cls.__name__}.{f.name}")
    assert not unchecked, f"numeric options without bounds: {sorted(unchecked)}"


@pytest.mark.parametrize("argv, message", [
    (["feedback", "export", "--min-agreement", "5"], "--min-agreement must be at most 1.0, got 5.0"),
    (["feedback", "export", "--margin-much", "-1"], "--margin-much must be at least 0.0, got -1.0"),
    (["feedback", "simulate", "--error-rate", "2"], "--error-rate must be at most 1.0, got 2.0"),
    (["feedback", "simulate", "--annotators", "0"], "--annotators must be at least 1, got 0"),
    (["feedback", "create", "--k", "1"], "--k must be at least 2, got 1"),
    (["feedback", "serve", "--port", "70000"], "--port must be at most 65535, got 70000"),
    (["chat", "--top-p", "5"], "--top-p must be at most 1.0, got 5.0"),
])
def test_out_of_range_options_are_refused_before_anything_runs(argv, message):
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError, match=message):
        from_args(args._config, args)


@pytest.mark.parametrize("argv, env, message", [
    (["sft", "--compile", "--parallel", "fsdp"], {}, "--compile is not supported with --parallel fsdp"),
    (["rl", "--compile", "--device", "cpu"], {"CXX": "no-such-compiler"},
     "--compile on the CPU needs a C.. compiler for inductor's kernels: 'no-such-compiler' is not on the PATH"),
])
def test_compile_is_refused_where_it_cannot_run(argv, env, message, monkeypatch):
    """--compile with FSDP2, or on the CPU without a C++ compiler: one line before anything loads, not an inductor
    traceback at the first forward."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError, match=message):
        from_args(args._config, args)
