"""Every command that reads user files, fed a corpus of bad inputs (malformed JSON at line N, missing and mistyped
fields, an empty file, binary garbage, a broken .gz, wrong parquet columns, chosen == rejected, non-UTF-8, a
directory instead of a file, a missing path, a model directory without config.json, a truncated or garbage
safetensors file, NaN weights, a tokenizer that does not fit the model, a causal LM as a reward model, nonsensical
numbers): each gets exactly one line on stderr that names the file (and the line and field where they exist), exit
status 2, and no traceback."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from moss_rlhf.cli import main

# a record every reader accepts (text, conversation, preference, prompt, labelling candidates), so that what is
# wrong with a file shows on its second line
GOOD = json.dumps({"text": "a", "prompt": "q", "completion": "a", "chosen": "a", "rejected": "b",
                   "responses": ["a", "b"]})
TEXT_CASES = {  # file name -> (content, what the message must name)
    "malformed.jsonl": (GOOD + '\n{"text": "b"\n', ["malformed.jsonl:2", "not valid JSON"]),
    "missing.jsonl": ('{"text": "a"}\n{"txt": "b"}\n', ["missing.jsonl:2", "text: missing"]),
    "mistyped.jsonl": ('{"text": "a"}\n{"text": 3}\n', ["mistyped.jsonl:2", "text: expected str"]),
    "empty.jsonl": ("", ["empty.jsonl", "no records"]),
    "latin1.jsonl": (b'{"text": "caf\xe9"}\n', ["latin1.jsonl:1", "not UTF-8"]),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The corpus of broken files."""
    root = tmp_path_factory.mktemp("bad")
    for name, (content, _) in TEXT_CASES.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "garbage.jsonl").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))
    rows = "".join(json.dumps({"text": f"row {i} " + "x" * (i % 37)}) + "\n" for i in range(400))
    packed = gzip.compress(rows.encode())
    (root / "broken.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (root / "a-directory.jsonl").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"words": ["a", "b"]}), root / "columns.parquet")
    (root / "same.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                                     '{"prompt": "q", "chosen": "same", "rejected": "same"}\n')
    (root / "nan-margin.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    return root


STRUCTURAL = [(name, expected) for name, (_, expected) in TEXT_CASES.items() if name != "missing.jsonl"
              and name != "mistyped.jsonl"] + [
    ("garbage.jsonl", ["garbage.jsonl:1", "not UTF-8"]),
    ("broken.jsonl.gz", ["broken.jsonl.gz", "not a valid gzip file"]),
    ("a-directory.jsonl", ["a-directory.jsonl"]),
    ("nowhere.jsonl", ["nowhere.jsonl", "not found"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tokenizer_dir):
    """Broken model directories beside a good one, and a reward model."""
    from safetensors.torch import load_file, save_file

    from moss_rlhf.models import build_causal_lm, load_scorer, save_model
    from moss_rlhf.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    scorer = load_scorer(str(tiny_model_dir), tokenizer)
    scorer.score.weight.data.normal_(0, 0.1)
    save_model(scorer, tokenizer, root / "rm")
    no_config = root / "no-config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    garbage = root / "garbage"
    shutil.copytree(tiny_model_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not safetensors at all" * 100)
    nan = root / "nan"
    shutil.copytree(tiny_model_dir, nan)
    weights = load_file(str(nan / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first].view(-1)[0] = float("nan")
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    other_vocab = root / "other-vocab"  # a model whose embedding is smaller than its tokenizer
    small = train_tokenizer(["Lin went to the park."] * 50, vocab_size=280)
    save_model(build_causal_lm("tiny", small, seed=1), tokenizer, other_vocab)
    return {"good": str(tiny_model_dir), "rm": str(root / "rm"), "no-config": str(no_config),
            "truncated": str(truncated), "garbage": str(garbage), "nan": str(nan), "other-vocab": str(other_vocab)}


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line ``moss-rlhf CMD: error: ...`` holding ``expected``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"moss-rlhf {argv[0]}: error:"), (argv, err)
    for text in expected:
        assert text in lines[0], (argv, text, lines[0])
    return lines[0]


def data_commands(f: str, tmp: Path, models: dict) -> dict[str, list[str]]:
    """Each command with a data file ``f`` in the place it reads one."""
    out = str(tmp / "out")
    return {
        "pretrain": ["pretrain", "--data", f, "--model", "tiny", "--out", out, "--device", "cpu"],
        "sft": ["sft", "--data", f, "--model", models["good"], "--out", out, "--device", "cpu"],
        "reward": ["reward", "--data", f, "--model", models["good"], "--out", out, "--device", "cpu"],
        "ppo": ["ppo", "--prompts", f, "--policy", models["good"], "--reward-model", models["rm"], "--out", out,
                "--device", "cpu"],
        "evaluate": ["evaluate", models["good"], models["good"], "--prompts", f, "--judge", "gold", "--device", "cpu",
                     "--out", str(tmp / "e.json")],
        "generate": ["generate", "--model", models["good"], "--prompts-file", f, "--device", "cpu"],
        "feedback import": ["feedback", "import", "--db", str(tmp / "fb.db"), "--name", "x", "--file", f],
        "feedback create": ["feedback", "create", "--db", str(tmp / "fb2.db"), "--name", "x", "--prompts", f,
                            "--model", models["good"], "--device", "cpu"],
        "tokenizer": ["tokenizer", "--corpus", f, "--out", out],
    }


@pytest.mark.parametrize("case", [name for name, _ in STRUCTURAL] + ["columns.parquet"])
def test_broken_files_are_one_line_in_every_command(bad, models, tmp_path, capsys, case):
    expected = dict(STRUCTURAL).get(case, ["columns.parquet:1", "missing"])
    for name, argv in data_commands(str(bad / case), tmp_path, models).items():
        if name == "tokenizer" and case == "columns.parquet":
            continue  # a tokenizer reads the text of any record: a table of words is text to it
        command = argv[0] if argv[0] != "feedback" else "feedback"
        message = refused(capsys, argv, *([] if case == "empty.jsonl" and name == "tokenizer" else expected))
        assert message.startswith(f"moss-rlhf {command}: error:")


@pytest.mark.parametrize("case, commands", [
    ("missing.jsonl", ["pretrain", "evaluate", "generate", "feedback import"]),
    ("mistyped.jsonl", ["pretrain"]),
    ("same.jsonl", ["reward"]),
    ("nan-margin.jsonl", ["reward"]),
])
def test_wrong_records_name_the_line_and_field(bad, models, tmp_path, capsys, case, commands):
    expected = {"missing.jsonl": ["missing.jsonl:"], "mistyped.jsonl": ["mistyped.jsonl:2", "text: expected str"],
                "same.jsonl": ["same.jsonl:2", "rejected: is the same reply as chosen"],
                "nan-margin.jsonl": ["nan-margin.jsonl:1", "margin: expected a finite number"]}[case]
    table = data_commands(str(bad / case), tmp_path, models)
    for name in commands:
        refused(capsys, table[name], *expected)


@pytest.mark.parametrize("broken, expected", [
    ("no-config", ["holds no config.json"]), ("truncated", ["cannot load the model"]),
    ("garbage", ["cannot load the model"]), ("nan", ["NaN or Inf weights"]), ("missing", ["does not exist"]),
    ("other-vocab", ["do not belong together"]),
])
def test_broken_models_are_one_line_in_every_command(models, tmp_path, capsys, broken, expected):
    path = models.get(broken, str(tmp_path / "no-such-model"))
    prompts = tmp_path / "p.jsonl"  # good data for every command: only the model is wrong
    prompts.write_text((GOOD + "\n") * 100)
    for argv in (["sft", "--model", path, "--data", str(prompts), "--out", str(tmp_path / "s"), "--device", "cpu"],
                 ["reward", "--model", path, "--data", str(prompts), "--out", str(tmp_path / "r"), "--device", "cpu"],
                 ["ppo", "--policy", path, "--reward-model", models["rm"], "--prompts", str(prompts), "--out",
                  str(tmp_path / "p"), "--device", "cpu", "--eval-size", "4"],
                 ["evaluate", path, models["good"], "--prompts", str(prompts), "--judge", "gold", "--device", "cpu"],
                 ["generate", "--model", path, "--prompt", "hi", "--device", "cpu"],
                 ["chat", path, "--device", "cpu"],
                 ["serve", path, "--device", "cpu"],
                 ["inspect", path, "hello", "--device", "cpu", "--out", str(tmp_path / "i")],
                 ["feedback", "create", "--db", str(tmp_path / "fb.db"), "--name", "x", "--prompts", str(prompts),
                  "--model", path, "--device", "cpu"]):
        refused(capsys, argv, *expected)


def test_a_causal_lm_is_no_reward_model_or_judge(models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n' * 100)
    refused(capsys, ["ppo", "--policy", models["good"], "--reward-model", models["good"], "--prompts", str(prompts),
                     "--out", str(tmp_path / "p"), "--device", "cpu", "--eval-size", "4"], "--reward-model",
            "is not a reward model")
    refused(capsys, ["evaluate", models["good"], models["good"], "--prompts", str(prompts), "--judge", models["good"],
                     "--device", "cpu"], "--judge", "is not a reward model")


def test_an_output_path_that_cannot_be_written_is_refused(models, tmp_path, capsys):
    refused(capsys, ["generate", "--model", models["good"], "--prompt", "hi", "--max-new-tokens", "2", "--out",
                     str(tmp_path), "--device", "cpu"], f"{tmp_path}: is a directory")


def test_an_rl_run_whose_prompt_and_reply_cannot_fit_is_refused_at_the_start(models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n' * 40)
    refused(capsys, ["rl", "--policy", models["good"], "--reward-model", models["rm"], "--prompts", str(prompts),
                     "--out", str(tmp_path / "rl"), "--device", "cpu", "--eval-size", "4", "--max-new-tokens", "500",
                     "--max-steps", "1"],
            "--max-prompt-len 128 + --max-new-tokens 500 exceed the policy's context of 512 tokens")


def test_a_prompt_longer_than_the_context_is_refused(models, tmp_path, capsys):
    """Named by flag or by file and line, before anything is sampled."""
    long = "Lin went to the park. " * 200
    refused(capsys, ["generate", "--model", models["good"], "--prompt", long, "--device", "cpu"],
            "--prompt 1: a prompt of", "exceeds the model's context of 512 tokens")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    refused(capsys, ["generate", "--model", models["good"], "--prompts-file", str(prompts), "--device", "cpu"],
            f"{prompts}:2: a prompt of", "exceeds the model's context of 512 tokens")


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["sft", "--log-every", "0"], "--log-every must be at least 1"),
    (["sft", "--lr", "-1"], "--lr must be above 0"),
    (["sft", "--seq-len", "0"], "--seq-len must be at least 2"),
    (["sft", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["sft", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["sft", "--min-lr-ratio", "-5"], "--min-lr-ratio must be at least 0"),
    (["sft", "--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["sft", "--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["sft", "--lr", "nan"], "--lr must be a finite number"),
    (["sft", "--max-len", "0"], "--max-len must be at least 2"),
    (["generate", "--prompt", "x", "--top-k", "-3"], "--top-k must be at least 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p must be above 0"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature must be at least 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    (["ppo", "--prompts", "p", "--kl-coef", "-1"], "--kl-coef must be at least 0"),
    (["ppo", "--prompts", "p", "--clip-eps", "-1"], "--clip-eps must be above 0"),
    (["ppo", "--prompts", "p", "--gamma", "2"], "--gamma must be at most 1"),
    (["ppo", "--prompts", "p", "--eval-size", "0"], "--eval-size must be at least 1"),
    (["sft", "--batch-size", "many"], "field 'batch_size' expects int"),
])
def test_nonsensical_numbers_are_refused(capsys, argv, expected):
    if argv[0] == "sft":
        argv = argv + ["--data", "x.jsonl"]
    refused(capsys, argv, expected)


def test_a_device_that_is_not_there_is_refused(models, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(capsys, ["generate", "--model", models["good"], "--prompt", "x", "--device", "cuda"],
            "--device cuda: no such CUDA device")
    prompts = tmp_path / "c.jsonl"
    prompts.write_text('{"prompt": "q", "completion": "a"}\n' * 20)
    refused(capsys, ["sft", "--model", models["good"], "--data", str(prompts), "--device", "cuda:3", "--out",
                     str(tmp_path / "s")], "--device cuda:3")


def test_an_output_path_that_is_a_file_is_refused(models, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    data = tmp_path / "c.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n' * 20)
    refused(capsys, ["sft", "--model", models["good"], "--data", str(data), "--out", str(tmp_path / "taken"),
                     "--device", "cpu"], "is a file")


def test_a_store_that_is_not_a_database_is_refused(tmp_path, capsys):
    (tmp_path / "notes.db").write_text("not a database\n" * 200)
    refused(capsys, ["feedback", "export", "--db", str(tmp_path / "notes.db"), "--out", str(tmp_path / "x.jsonl")],
            "notes.db", "cannot open the database")
    refused(capsys, ["feedback", "export", "--db", str(tmp_path / "typo.db"), "--out", str(tmp_path / "x.jsonl")],
            "typo.db", "no feedback database there")
    assert not (tmp_path / "typo.db").exists()


def test_a_size_preset_is_no_trained_model(tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n' * 30)
    refused(capsys, ["sft", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "s")],
            "--model: 'tiny' is a size preset")


def test_the_demo_report_and_feedback_readers_refuse_bad_input_in_one_line(bad, models, tmp_path, capsys):
    refused(capsys, ["demo", "--quick", "--out", str(tmp_path / "d1"), "--corpus", str(bad / "malformed.jsonl")],
            "malformed.jsonl:2", "not valid JSON")
    refused(capsys, ["demo", "--quick", "--out", str(tmp_path / "d2"), "--model", models["good"], "--sft-data",
                     str(bad / "latin1.jsonl"), "--device", "cpu"], "latin1.jsonl:1", "not UTF-8")
    refused(capsys, ["report", str(tmp_path / "no-pipeline")], "no-pipeline", "not found")
    (tmp_path / "pipe" / "sft").mkdir(parents=True)
    (tmp_path / "pipe" / "sft" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2,\n')
    refused(capsys, ["report", str(tmp_path / "pipe")], "metrics.jsonl:2")
    for command in (["agreement"], ["simulate"], ["serve"], ["export", "--out", str(tmp_path / "x.jsonl")],
                    ["revoke-token", "--name", "a"]):
        refused(capsys, ["feedback", *command, "--db", str(tmp_path / "typo.db")], "typo.db",
                "no feedback database there")
