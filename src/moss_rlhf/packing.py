"""Padding-free forward passes over RL sequences: the update phase's and experience making's only way to run a model.

A rollout is stored padded — prompts left-padded, responses right-padded — because that is how a sampler produces
it. Run as it is, every forward pays for the padding, and the output projection (a large share of a small model's
FLOPs: ``V·d`` per position) runs over prompt positions whose logits nobody reads. Here each micro-batch's
sequences are packed once, when the experience is made, into as few and as narrow rows as first-fit decreasing finds
(``data.collate.fewest_padded_rows``, as SFT packs conversations), with ``position_ids`` restarting at 0 for every
sequence: transformers turns the restarts into a block-diagonal causal mask (eager/SDPA) or varlen kernels
(FlashAttention), and rotary positions are those the sequence has alone. Then:

* the policy's and the reference's log-probs: the decoder runs on real tokens only, and the output projection on
  the positions that predict a response token only (one row of logits per sampled token);
* the critic's values: the value head at those same positions;
* the reward model's score: at each sequence's last token (its turn end).

The same :class:`PackedRows` of a micro-batch is used when its experience is made and at every update on it, so
the first update's probability ratio is exactly 1. Results equal the padded forward's up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moss_rlhf import losses
from moss_rlhf.data.collate import fewest_padded_rows
from moss_rlhf.distributed import is_sharded
from moss_rlhf.losses import entropy_from_logits, token_logprobs
from moss_rlhf.models import final_hidden_states, score_head, unwrap


@dataclass
class PackedRows:
    """A micro-batch of ``b`` sequences packed into ``[rows, width]``; indices are into the flattened rows."""

    input_ids: torch.Tensor       # [rows, width]
    position_ids: torch.Tensor    # [rows, width], restarting at 0 for every sequence
    predict_index: torch.Tensor   # [N] flat position predicting each response token (N: response tokens)
    targets: torch.Tensor         # [N] the response tokens
    scatter_index: torch.Tensor   # [N] where each response token sits in the padded [b, R] layout (flat)
    last_index: torch.Tensor      # [b] flat position of each sequence's last token
    shape: tuple[int, int]        # (b, R): the padded response layout

    @property
    def n_tokens(self) -> int:
        """Positions the decoder runs on (real tokens and the rows' end padding)."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> PackedRows:
        return PackedRows(*(getattr(self, f).to(device) for f in ("input_ids", "position_ids", "predict_index",
                                                                     "targets", "scatter_index", "last_index")),
                          self.shape)

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-response-token values ``[N]`` → the padded layout ``[b, R]`` (0 after each response's end);
        differentiable."""
        b, width = self.shape
        return flat.new_zeros(b * width).index_copy(0, self.scatter_index, flat).view(b, width)


def pack_sequences(sequences: torch.Tensor, attention_mask: torch.Tensor, response_width: int,
                   max_row: int = 0) -> PackedRows:
    """Pack padded rollout rows (``[b, P+R]``: left-padded prompt, right-padded response of width ``R``) without
    their padding, into rows of at most ``max_row`` tokens (0, and never less than: the longest sequence).
    Attention computes the whole square of a row and keeps only its diagonal blocks, so rows no wider than the
    longest sequence never cost more attention than the padded batch, while short sequences still share rows."""
    device = sequences.device
    sequences, attention_mask = sequences.cpu(), attention_mask.cpu().bool()
    prompt_width = sequences.shape[1] - response_width
    tokens = [row[keep] for row, keep in zip(sequences, attention_mask)]
    n_prompt = attention_mask[:, :prompt_width].sum(1).tolist()
    lengths = [len(t) for t in tokens]
    layout = fewest_padded_rows(lengths, max(max_row, max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in layout)
    ids = torch.zeros((len(layout), width), dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    predict, targets, scatter, last = [], [], [], [0] * len(tokens)
    for r, row in enumerate(layout):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = tokens[i]
            positions[r, at:at + n] = torch.arange(n)
            first = r * width + at + n_prompt[i]  # flat position of the first response token
            n_response = n - n_prompt[i]
            predict.append(torch.arange(first - 1, first - 1 + n_response))
            targets.append(tokens[i][n_prompt[i]:])
            scatter.append(i * response_width + torch.arange(n_response))
            last[i] = r * width + at + n - 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # the row's end padding: a segment of its own, never read
    return PackedRows(ids, positions, torch.cat(predict), torch.cat(targets), torch.cat(scatter), torch.tensor(last),
                      (len(tokens), response_width)).to(device)


def packed_logprobs(model, packed: PackedRows, temperature: float = 1.0, with_entropy: bool = False,
                    entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[b, R]`` of the response tokens under ``softmax(logits / temperature)`` (0 after each response's
    end), and the entropies of those distributions when asked (differentiable only with ``entropy_grad``).
    ``temperature`` 0 (greedy) scores at 1. The output projection runs at the predicting positions only when the
    logits are a plain projection of the last hidden state (``training.plain_output_head``); other models (logit
    soft-capping, scaling) compute every position's logits and keep the same ones. Logits of more than
    ``losses.HEAD_BLOCK_ELEMENTS`` are never held whole: a plain linear head's log-probs and entropies are then
    computed block by block, forward and backward (``losses.linear_logprobs``)."""
    from moss_rlhf.training import plain_output_head

    head = plain_output_head(model)
    temperature = temperature if temperature > 0 else 1.0
    if head is None:
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        logits = out.logits.flatten(0, 1)[packed.predict_index]
    else:
        hidden = final_hidden_states(model, packed.input_ids, None, packed.position_ids, logits_to_keep=1)
        hidden = hidden.flatten(0, 1)[packed.predict_index]
        if (type(head) is torch.nn.Linear and not is_sharded(model)
                and len(hidden) * head.out_features > losses.HEAD_BLOCK_ELEMENTS):
            # logits too large to hold: block by block, never all at once (losses.linear_logprobs)
            logprobs, entropy = losses.linear_logprobs(hidden, head.weight, head.bias, packed.targets, temperature)
            entropy = entropy if entropy_grad and torch.is_grad_enabled() else entropy.detach()
            return packed.unpack(logprobs), packed.unpack(entropy) if with_entropy else None
        logits = head(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    # one [N, V] float32 copy at a time (token_logprobs and entropy_from_logits loop over their first dimension)
    logprobs = packed.unpack(token_logprobs(logits[None], packed.targets[None])[0])
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = packed.unpack(entropy_from_logits(logits[None])[0])
    return logprobs, entropy


def _token_scores(model, packed: PackedRows) -> torch.Tensor:
    hidden = final_hidden_states(model, packed.input_ids, None, packed.position_ids)
    return score_head(unwrap(model))(hidden).squeeze(-1).float().flatten()


def packed_values(critic, packed: PackedRows) -> torch.Tensor:
    """The critic's values ``[b, R]``: its score at the position that predicts each response token (the state
    before it)."""
    return packed.unpack(_token_scores(critic, packed)[packed.predict_index])


def packed_sequence_scores(model, packed: PackedRows) -> torch.Tensor:
    """A scorer's value ``[b]`` at each sequence's last token: the reward model's score at the reply's turn end."""
    return _token_scores(model, packed)[packed.last_index]
