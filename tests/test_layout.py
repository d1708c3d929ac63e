"""The directions of use hold: no stage imports demo code (the demo hands the stages its files and its judge); shared
parts never import a stage, the CLI, the demo or the web app; the pure math imports nothing of ours; sampling
happens in one place; a stage's loop reads in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moss_rlhf"
SHARED = ["config.py", "tokenizer.py", "models.py", "checkpoint.py", "runs.py", "distributed.py", "training.py",
          "rollout.py", "scoring.py", "losses.py", "advantages.py", "packing.py", "rewards.py", "update.py",
          "sampling/__init__.py", "sampling/builtin.py", "sampling/decoders.py", "data/formats.py", "data/collate.py",
          "data/splits.py", "data/corpus.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("stage", sorted(p.name for p in (PACKAGE / "stages").glob("*.py")))
def test_stages_import_no_demo_code(stage):
    demo = [m for m in imported_modules(PACKAGE / "stages" / stage) if m.startswith("moss_rlhf.demo")]
    assert not demo, f"stages/{stage} imports {demo}"


@pytest.mark.parametrize("part", SHARED)
def test_shared_parts_import_no_stage_cli_demo_or_app(part):
    banned = ("moss_rlhf.stages", "moss_rlhf.cli", "moss_rlhf.demo", "moss_rlhf.feedback", "moss_rlhf.evaluate",
              "moss_rlhf.report", "moss_rlhf.serve", "moss_rlhf.chat", "moss_rlhf.assistant")
    bad = [m for m in imported_modules(PACKAGE / part) if m.startswith(banned)]
    assert not bad, f"{part} imports {bad}"


def test_pure_math_imports_nothing_of_ours():
    assert not [m for m in imported_modules(PACKAGE / "losses.py") if m.startswith("moss_rlhf")]


def test_one_sampling_loop():
    """Only the built-in sampler runs a model token by token (its loop in builtin.py, the forward with a KV cache
    that the loop calls in decoders.py); everything else asks a sampler."""
    loops = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if "past_key_values" in p.read_text(encoding="utf-8") or "use_cache=True" in p.read_text(encoding="utf-8")]
    assert loops == ["sampling/decoders.py"]


@pytest.mark.parametrize("stage", sorted(p.name for p in (PACKAGE / "stages").glob("*.py")))
def test_stage_files_read_in_one_sitting(stage):
    assert len((PACKAGE / "stages" / stage).read_text(encoding="utf-8").splitlines()) <= 400


def test_every_module_opens_with_a_docstring():
    """Each module says what it does (and which paper it implements) before any code; empty package markers aside."""
    sources = {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}
    bare = [name for name, text in sources.items() if text.strip() and not ast.get_docstring(ast.parse(text))]
    assert not bare, f"modules without a docstring: {bare}"
