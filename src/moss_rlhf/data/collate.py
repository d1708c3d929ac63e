"""Turn records into token batches: sequence packing for pretraining, chat rendering with assistant-only labels for
SFT, padding, and a deterministic, resumable, process-sharded batch order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moss_rlhf.data.formats import Message

IGNORE = -100  # label of a token that carries no loss (prompt, padding)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate ``bos text eos`` documents and cut the stream into ``[N, seq_len]`` rows (the tail is dropped).
    Packing wastes no compute on padding; documents attend across their boundary, as in GPT-style pretraining."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(bos + ids + [tokenizer.eos_token_id])
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chat_example(tokenizer, messages: list[Message], max_len: int) -> Example:
    """Render a conversation with the chat template; labels keep assistant tokens only (their end token included,
    so the model learns to stop). Works with any template that renders a prefix of the conversation as a prefix of
    its tokens: each assistant turn is located by rendering the conversation up to it."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _encode(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _encode(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise ValueError("the chat template does not render conversations prefix-consistently")
        labels.extend([IGNORE] * (len(prefix) - len(ids)))
        labels.extend(upto[len(prefix):])
        ids = upto
    full = _encode(tokenizer, messages, add_generation_prompt=False)
    labels.extend([IGNORE] * (len(full) - len(ids)))
    return Example(full[:max_len], labels[:max_len])


def _encode(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    if not messages:
        rendered = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=add_generation_prompt) \
            if add_generation_prompt else ""
    else:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily fill ``[N, seq_len]`` rows with whole examples in order (none is split); padding carries no loss."""
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex.input_ids) > seq_len:
            rows_ids.append(cur_ids)
            rows_labels.append(cur_labels)
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + ex.input_ids[:seq_len]
        cur_labels = cur_labels + ex.labels[:seq_len]
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_labels.append(cur_labels)
    ids = torch.full((len(rows_ids), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), seq_len), IGNORE, dtype=torch.long)
    for r, (i, l) in enumerate(zip(rows_ids, rows_labels)):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(l)] = torch.tensor(l)
    return ids, labels


def pad_examples(examples: Sequence[Example], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[r, sl] = torch.tensor(ex.input_ids)
        labels[r, sl] = torch.tensor(ex.labels)
        mask[r, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        if len(s):
            ids[r, width - len(s):] = torch.tensor(list(s))
            mask[r, width - len(s):] = 1
    return ids, mask


@dataclass(frozen=True)
class BatchOrder:
    """Which examples each process reads at each step, as a pure function of (seed, step).

    The data stream is the concatenation of per-epoch permutations. Step ``s`` consumes ``global_batch =
    batch_size * grad_accum * world_size`` positions of it; micro-batch ``j`` of rank ``r`` takes its slice. So a
    resumed run needs only the step to continue exactly, and 8×1, 2×4 or 2 processes × 4 all see the same examples
    in each optimizer step.
    """

    n_examples: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=g)

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + micro * self.batch_size * self.world_size + rank * self.batch_size
        out = []
        epoch_cache: dict[int, torch.Tensor] = {}
        for p in range(start, start + self.batch_size):
            epoch, within = divmod(p, self.n_examples)
            if epoch not in epoch_cache:
                epoch_cache[epoch] = self._permutation(epoch)
            out.append(int(epoch_cache[epoch][within]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n_examples
