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
