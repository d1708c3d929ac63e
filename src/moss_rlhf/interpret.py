"""``moss-rlhf inspect MODEL "I love to code"``: look inside a model on one text.

- the tokenization: every token with its id and the text it stands for (byte-level BPE pieces of a Chinese
  character are shown as the escaped bytes they carry, since alone they are not a whole character);
- attention maps: one PNG per layer, one heatmap per head, query tokens down, key tokens across. The model is loaded
  with ``attn_implementation="eager"`` because fused kernels (SDPA, flash) never materialise the attention matrix;
- per-layer norms: the mean L2 norm of the residual stream after each layer (how the activations grow with depth)
  and the Frobenius norm of each layer's weights — a table and a PNG.

The report (``moss_rlhf.report``) uses :func:`attention_maps` and :func:`plot_attention_comparison` to show attention
before and after RLHF.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.files import atomic_write_text


@dataclass
class InspectConfig(Config):
    model: str = option("runs/sft/model", "model to inspect (save_pretrained directory or hub id)", positional=True)
    text: str = option("I love to code", "the text to run through the model", positional=True)
    out: str = option("runs/inspect", "directory for attention_layer*.png, norms.png and inspect.json")
    chat: bool = option(False, "wrap the text as a user turn with the chat template (as the chat model sees it)")
    max_tokens: int = option(48, "longest text in tokens (attention maps of more tokens are unreadable)",
                             at_least=1)
    device: str = option("auto", "cpu, cuda or auto")

    def check(self) -> None:
        if not self.text.strip():
            raise ConfigError("the text to inspect is empty")


@dataclass
class Inspection:
    ids: list[int]
    tokens: list[str]                 # readable text of each token
    attentions: torch.Tensor          # [layers, heads, T, T]
    activation_norms: list[float]     # mean L2 norm per token: [embeddings, after layer 0, after layer 1, ...]
    weight_norms: list[float]         # per layer: Frobenius norm of the layer's weights


def load_for_inspection(path: str, device: str = "auto"):
    """Model (eager attention, eval mode) and tokenizer."""
    from moss_rlhf.models import check_vocabulary, load_causal_lm, resolve_device
    from moss_rlhf.tokenizer import load_tokenizer

    model = load_causal_lm(path, attn_implementation="eager")
    tokenizer = load_tokenizer(path)
    check_vocabulary(model, tokenizer)
    return model.to(resolve_device(device)).eval(), tokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves, the others are
    shifted to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shift)] = byte
            shift += 1
    return chars


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Readable text of each token. A token holding part of a multi-byte character (byte-level BPE splits Chinese
    characters) shows the orphan bytes escaped, e.g. ``\\xab很``, instead of the replacement character."""
    alphabet = _byte_level_alphabet()
    texts = []
    for token_id in ids:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            raw = tokenizer.convert_ids_to_tokens(token_id)
            if all(ch in alphabet for ch in raw):
                text = bytes(alphabet[ch] for ch in raw).decode("utf-8", errors="backslashreplace")
        texts.append(text)
    return texts


def encode_text(tokenizer, text: str, chat: bool, max_tokens: int) -> list[int]:
    from moss_rlhf.tokenizer import encode_chat

    if chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens]


@torch.no_grad()
def inspect_text(model, tokenizer, text: str, chat: bool = False, max_tokens: int = 48) -> Inspection:
    ids = encode_text(tokenizer, text, chat, max_tokens)
    if not ids:
        raise ConfigError(f"{text!r} encodes to no tokens")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model(input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    if not out.attentions or out.attentions[0] is None:
        raise ConfigError("the model returned no attention weights; load it with attn_implementation='eager'")
    attentions = torch.stack([a[0].float().cpu() for a in out.attentions])
    activation_norms = [float(h[0].float().norm(dim=-1).mean()) for h in out.hidden_states]
    return Inspection(ids, token_texts(tokenizer, ids), attentions, activation_norms, layer_weight_norms(model))


def attention_maps(model, tokenizer, text: str, chat: bool = False, max_tokens: int = 48):
    """``(tokens, attentions [layers, heads, T, T])`` of ``text``."""
    found = inspect_text(model, tokenizer, text, chat, max_tokens)
    return found.tokens, found.attentions


def layer_weight_norms(model) -> list[float]:
    """Frobenius norm of all weights of each transformer layer (parameters ``…layers.<i>.…`` or ``…h.<i>.…``)."""
    sums: dict[int, float] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("layers", "h", "layer") and parts[i + 1].isdigit():
                layer = int(parts[i + 1])
                sums[layer] = sums.get(layer, 0.0) + float(param.detach().float().pow(2).sum())
                break
    return [math.sqrt(sums[i]) for i in sorted(sums)]


# --------------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _heatmap(ax, matrix: torch.Tensor, tokens: list[str], title: str, show_keys: bool, show_queries: bool) -> None:
    from matplotlib.colors import PowerNorm

    # gamma 0.5: attention is mostly small weights; a square-root scale shows where the rest of it goes
    ax.imshow(matrix.numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    labels = [t.replace("\n", "\\n") or "␣" for t in tokens]
    n = len(tokens)
    fontsize = max(5, min(8, int(260 / max(n, 1))))
    ax.set_xticks(range(n), labels if show_keys else [""] * n, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels if show_queries else [""] * n, fontsize=fontsize)
    ax.tick_params(length=0)


def plot_attention_layer(tokens: list[str], layer_attention: torch.Tensor, layer: int, path: Path) -> Path:
    """One PNG with a heatmap per head of one layer (rows: query tokens, columns: key tokens)."""
    plt = _pyplot()
    heads = layer_attention.shape[0]
    cols = min(4, heads)
    rows = math.ceil(heads / cols)
    side = min(4.5, max(2.6, 0.13 * len(tokens) + 1.2))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows + 0.5), squeeze=False)
    for head in range(rows * cols):
        ax = axes.flat[head]
        if head >= heads:
            ax.axis("off")
            continue
        _heatmap(ax, layer_attention[head], tokens, f"head {head}", show_keys=True, show_queries=head % cols == 0)
    fig.suptitle(f"attention of layer {layer} (query ↓, key →; square-root colour scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)


def plot_attention_comparison(tokens: list[str], before: torch.Tensor, after: torch.Tensor, layer: int,
                              path: Path, labels: tuple[str, str] = ("before RLHF", "after RLHF")) -> Path:
    """Two rows (before, after) × one column per head, for one layer."""
    plt = _pyplot()
    heads = before.shape[0]
    side = min(3.4, max(2.4, 0.1 * len(tokens) + 1.0))
    fig, axes = plt.subplots(2, heads, figsize=(side * heads, side * 2 + 0.6), squeeze=False)
    for row, (label, attention) in enumerate(zip(labels, (before, after))):
        for head in range(heads):
            _heatmap(axes[row, head], attention[head], tokens, f"{label} · head {head}", show_keys=row == 1,
                     show_queries=head == 0)
    fig.suptitle(f"attention of layer {layer}: {labels[0]} (top) vs {labels[1]} (bottom)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96), h_pad=2.8)
    return _save(fig, path)


def plot_norms(activation_norms: list[float], weight_norms: list[float], path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    positions = list(range(len(activation_norms)))
    names = ["emb"] + [str(i) for i in range(len(activation_norms) - 1)]
    names[-1] += "\n+norm"  # the last hidden state comes after the final normalisation
    left.plot(positions, activation_norms, marker="o", color="#2563eb")
    left.set_xticks(positions, names, fontsize=8)
    left.set_title("mean activation norm after each layer", fontsize=10)
    left.set_xlabel("layer")
    left.grid(alpha=0.3)
    right.bar(range(len(weight_norms)), weight_norms, color="#16a34a")
    right.set_xticks(range(len(weight_norms)))
    right.set_title("weight norm per layer", fontsize=10)
    right.set_xlabel("layer")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# Command


def run(cfg: InspectConfig) -> Inspection:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    model, tokenizer = load_for_inspection(cfg.model, cfg.device)
    found = inspect_text(model, tokenizer, cfg.text, cfg.chat, cfg.max_tokens)
    out = Path(cfg.out)
    console = Console()
    tokens_table = Table(title=escape(f"{len(found.ids)} tokens of {cfg.text!r}"))
    for column in ("#", "id", "token"):
        tokens_table.add_column(column, justify="right" if column != "token" else "left")
    for i, (token_id, text) in enumerate(zip(found.ids, found.tokens)):
        shown = text.replace("\n", "\\n").replace("\t", "\\t")
        tokens_table.add_row(str(i), str(token_id), Text(f"'{shown}'"))  # Text: "[" in a token is not markup
    console.print(tokens_table)

    written = [plot_attention_layer(found.tokens, found.attentions[layer], layer, out / f"attention_layer{layer}.png")
               for layer in range(found.attentions.shape[0])]
    written.append(plot_norms(found.activation_norms, found.weight_norms, out / "norms.png"))
    norms_table = Table(title="per layer")
    for column in ("layer", "mean activation norm", "weight norm"):
        norms_table.add_column(column, justify="right")
    for index, activation in enumerate(found.activation_norms):
        layer = index - 1  # hidden state 0 is the embeddings, hidden state i the output of layer i - 1
        weight = found.weight_norms[layer] if 0 <= layer < len(found.weight_norms) else None
        name = "embeddings" if layer < 0 else str(layer)
        if index == len(found.activation_norms) - 1:
            name += " (+ final norm)"  # transformers returns the last hidden state after the final normalisation
        norms_table.add_row(name, f"{activation:.3f}",
                            "–" if weight is None else f"{weight:.2f}")
    console.print(norms_table)
    summary = {"model": cfg.model, "text": cfg.text, "ids": found.ids, "tokens": found.tokens,
               "layers": int(found.attentions.shape[0]), "heads": int(found.attentions.shape[1]),
               "activation_norms": found.activation_norms, "weight_norms": found.weight_norms,
               "files": [p.name for p in written]}
    atomic_write_text(out / "inspect.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"inspect: {len(written) - 1} attention maps and norms.png -> {out}")
    return found
