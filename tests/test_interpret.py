"""``moss-rlhf inspect``: tokens with ids, attention maps that are real attention (rows are causal distributions),
per-layer norms, and the PNG files written."""

from __future__ import annotations

import json

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.interpret import (inspect_text, layer_weight_norms, load_for_inspection,
                                 plot_attention_comparison, token_texts)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inspection(str(tiny_model_dir), "cpu")


def test_attention_rows_are_causal_distributions(loaded):
    model, tokenizer = loaded
    found = inspect_text(model, tokenizer, "Lin went to the park with Bo.")
    n = len(found.ids)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert found.attentions.shape == (layers, heads, n, n)
    assert torch.allclose(found.attentions.sum(-1), torch.ones(layers, heads, n), atol=1e-5)
    assert found.attentions.triu(diagonal=1).abs().max() == 0  # no query attends to a later key
    assert len(found.activation_norms) == layers + 1 and all(v > 0 for v in found.activation_norms)
    assert len(found.weight_norms) == layers
    assert tokenizer.decode(found.ids) == "Lin went to the park with Bo."


def test_weight_norms_follow_the_weights(loaded):
    model, _ = loaded
    before = layer_weight_norms(model)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.mul_(2.0)
    try:
        after = layer_weight_norms(model)
        assert after[1] == pytest.approx(2 * before[1], rel=1e-5)
        assert after[0] == pytest.approx(before[0]) and after[2] == pytest.approx(before[2])
    finally:
        with torch.no_grad():
            for p in model.model.layers[1].parameters():
                p.mul_(0.5)


def test_chinese_pieces_are_shown_as_bytes(loaded):
    _, tokenizer = loaded
    ids = tokenizer("猫很小。", add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids)
    assert all("\ufffd" not in t for t in texts)
    # byte-level BPE cuts 猫 (e7 8c ab) in two here; the pieces show their bytes, whole characters stay readable
    joined = "".join(texts)
    assert joined == "猫很小。" or ("\\x" in joined and joined.endswith("很小。")), texts


def test_inspect_command_writes_maps_and_norms(tiny_model_dir, tmp_path, capsys):
    from moss_rlhf.cli import main

    out = tmp_path / "inspect"
    assert main(["inspect", str(tiny_model_dir), "I love to code", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "inspect.json").read_text(encoding="utf-8"))
    assert summary["text"] == "I love to code" and summary["layers"] == 4 and summary["heads"] == 4
    for token_id in summary["ids"]:
        assert str(token_id) in printed
    for layer in range(4):
        png = out / f"attention_layer{layer}.png"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    assert (out / "norms.png").exists() and "weight norm" in printed


def test_chat_mode_and_comparison_plot(loaded, tmp_path):
    model, tokenizer = loaded
    found = inspect_text(model, tokenizer, "Hello", chat=True)
    assert found.tokens[0] == "<|bos|>" and "<|assistant|>" in found.tokens
    path = plot_attention_comparison(found.tokens, found.attentions[-1], found.attentions[-1] * 0.5, 3,
                                     tmp_path / "cmp.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    from moss_rlhf.cli import main

    assert main(["inspect", str(tiny_model_dir), "   "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no tokens"):
        inspect_text(*load_for_inspection(str(tiny_model_dir), "cpu"), "hi", max_tokens=0)
