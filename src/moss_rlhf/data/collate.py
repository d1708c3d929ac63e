"""Turn records into token batches: sequence packing for pretraining, chat rendering with assistant-only labels for
SFT (packed per batch or padded), a reply rendered for a reward model, KTO's mismatched pairs, padding, and a
deterministic, resumable, process-sharded batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moss_rlhf.config import ConfigError, UserError
from moss_rlhf.data.formats import Message
from moss_rlhf.tokenizer import encode_chat, stop_token_ids

IGNORE = -100  # label of a token that carries no loss (prompt, padding)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


class TokenData:
    """A tokenized data set: ``batch(indices)`` returns tensors with ``n_targets`` (what the loss is divided by)."""

    def __init__(self, n: int, make_batch: Callable[[list[int]], dict[str, torch.Tensor]]):
        self.n = n
        self.make_batch = make_batch

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.make_batch(indices)


def pack_texts(tokenizer, texts: Sequence[str | list[Message]], seq_len: int) -> torch.Tensor:
    """Concatenate ``bos text eos`` documents and cut the stream into ``[N, seq_len]`` rows (the tail is dropped).
    A conversation (a list of messages) is rendered with the chat template instead, every token trained on, and
    ends with eos. Packing wastes no compute on padding; documents attend across their boundary, as in GPT-style
    pretraining."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    plain = [text for text in texts if isinstance(text, str)]
    encoded = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
    stream: list[int] = []
    for text in texts:
        if isinstance(text, str):
            stream.extend(bos + next(encoded) + [tokenizer.eos_token_id])
        else:
            ids = encode_chat(tokenizer, text)
            stream.extend(ids + ([] if ids and ids[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]))
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len} (--seq-len)")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chat_example(tokenizer, messages: list[Message], max_len: int, stop_ids: Sequence[int] | None = None) -> Example:
    """Render a conversation with the chat template; labels keep assistant tokens only, up to and including the turn
    end (``tokenizer.stop_token_ids``: where generation stops), so the model learns to stop. What a template renders
    after the turn end (a newline before the next turn) carries no loss, and a conversation that ends with an
    assistant turn ends at its turn end — the token a reward model reads its score at, as in PPO's rollouts. Works
    with any template that renders a prefix of the conversation as a prefix of its tokens: each assistant turn is
    located by rendering the conversation up to it."""
    stops = set(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _encode(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _encode(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise UserError("the tokenizer's chat template does not render conversations prefix-consistently "
                            "(each turn must only append tokens); SFT labels cannot be located")
        reply = upto[len(prefix):]
        end = next((k + 1 for k, token in enumerate(reply) if token in stops), len(reply))
        labels.extend([IGNORE] * (len(prefix) - len(ids)))
        labels.extend(reply[:end] + [IGNORE] * (len(reply) - end))
        ids = upto
    full = _encode(tokenizer, messages, add_generation_prompt=False)
    labels.extend([IGNORE] * (len(full) - len(labels)))
    labelled = [k for k, label in enumerate(labels) if label != IGNORE]
    if messages and messages[-1]["role"] == "assistant" and labelled:
        # the conversation ends where its last reply does (at the turn end), not after the template's trailing text
        full, labels = full[:labelled[-1] + 1], labels[:labelled[-1] + 1]
    return Example(full[:max_len], labels[:max_len])


def reply_example(tokenizer, prompt: list[Message], reply: str, max_len: int) -> Example:
    """A reply to a prompt conversation, rendered as reward training, PPO and evaluation all see it: ending at the
    reply's turn end, the token its score is read at. A long one keeps its end (the reply and that token). Labels
    mark this reply only (up to its turn end), not the assistant turns of a multi-turn prompt."""
    example = chat_example(tokenizer, prompt + [{"role": "assistant", "content": reply}], max_len=1 << 30)
    labels = list(example.labels)
    start = len(labels)  # the final labelled run: this reply
    while start > 0 and labels[start - 1] == IGNORE:
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    labels[:start] = [IGNORE] * start
    return Example(example.input_ids[-max_len:], labels[-max_len:])


def conversation_data(tokenizer, conversations: Sequence[list[Message]], max_len: int, pack: bool = True,
                      seq_len: int = 0) -> TokenData:
    """Conversations for supervised learning (SFT, PPO-ptx): one item per conversation that has an assistant reply;
    a micro-batch is packed into rows of ``seq_len`` (:func:`pack_examples`: the same loss as padding, less
    compute) or padded to its longest example. ``n_targets`` counts the assistant tokens."""
    stops = stop_token_ids(tokenizer)
    examples = [e for e in (chat_example(tokenizer, c, max_len, stops) for c in conversations)
                if any(label != IGNORE for label in e.labels[1:])]

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [examples[i] for i in indices]
        out = (pack_examples(chosen, seq_len or max_len, tokenizer.pad_token_id) if pack
               else pad_examples(chosen, tokenizer.pad_token_id))
        out["n_targets"] = (out["labels"][:, 1:] != IGNORE).sum()
        return out

    return TokenData(len(examples), batch)


def _encode(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    if not messages:
        rendered = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=add_generation_prompt) \
            if add_generation_prompt else ""
    else:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack a micro-batch's examples into rows of at most ``seq_len`` tokens, none split, each attending only to
    itself.

    Instead of an attention mask, ``position_ids`` restart at 0 for every example: transformers (the
    ``masking_utils`` packed-sequence path for eager/SDPA attention, varlen kernels for FlashAttention) turns the
    restarts into a block-diagonal causal mask, and rotary positions are those the example has alone. So a packed
    batch gives the same loss and gradient as the same examples padded (tested), while computing only
    ``rows × width`` positions instead of ``examples × longest`` — for chat data of mixed lengths, nearly half of the
    padded batch is padding. Padding at a row's end forms its own segment and carries no loss.
    """
    lengths = [min(len(e.input_ids), seq_len) for e in examples]
    rows = fewest_padded_rows(lengths, seq_len)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids[:n])
            labels[r, at:at + n] = torch.tensor(examples[i].labels[:n])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def fewest_padded_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Rows of example indices: first-fit decreasing at several row capacities — ``seq_len`` and even splits of the
    total over more and more rows, down to the longest example — keeping the narrowest layout whose ``rows × width``
    is within 5% of the fewest positions. Narrow rows matter as much as few positions: attention computes the whole
    ``width × width`` square of a row (only its diagonal blocks are kept), so a row of many short examples costs
    attention work that a narrower layout of the same size does not."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total, longest = sum(lengths), max(lengths)
    fewest = -(-total // seq_len)
    splits = {fewest + extra for extra in range(4)} | {fewest * factor for factor in (2, 3, 4, 6, 8, 12, 16, 24, 32)}
    capacities = {seq_len} | {max(longest, -(-total // k)) for k in splits if k <= len(lengths)}
    layouts = []
    for capacity in sorted(capacities):
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if fit is None:
                rows.append([])
                room.append(capacity)
                fit = len(rows) - 1
            rows[fit].append(i)
            room[fit] -= lengths[i]
        width = capacity - min(room)
        layouts.append((len(rows) * width, width, rows))
    fewest_positions = min(positions for positions, _, _ in layouts)
    return min((layout for layout in layouts if layout[0] <= 1.05 * fewest_positions), key=lambda x: x[1])[2]


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

    def positions(self, step: int, micro: int, rank: int) -> range:
        """Where in the data stream this micro-batch of this rank lies (the same for the same example whatever the
        number of processes: per-example seeds are derived from it)."""
        start = step * self.global_batch + micro * self.batch_size * self.world_size + rank * self.batch_size
        return range(start, start + self.batch_size)

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        out = []
        epoch_cache: dict[int, torch.Tensor] = {}
        for p in self.positions(step, micro, rank):
            epoch, within = divmod(p, self.n_examples)
            if epoch not in epoch_cache:
                epoch_cache[epoch] = self._permutation(epoch)
            out.append(int(epoch_cache[epoch][within]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n_examples


def mismatched_partners(prompts: list[list[dict]], seed: int) -> list[int]:
    """For each record, another record whose prompt differs: the next one in a seeded random cycle."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = []
    position = {record: k for k, record in enumerate(order)}
    for i, prompt in enumerate(prompts):
        k = position[i]
        for step in range(1, len(order)):
            j = order[(k + step) % len(order)]
            if prompts[j] != prompt:
                partner.append(j)
                break
        else:
            raise ConfigError("kto needs records of at least two different prompts (its KL estimate pairs each "
                              "prompt with another prompt's reply)")
    return partner
