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

Group sampling (GRPO, RLOO, DAPO: k replies to each prompt) repeats every prompt k times. With shared prompts a
group is packed as its prompt once and then its replies, each reply attending to the prompt and to itself through
an explicit mask, with the positions it would have alone — the shared-prefix forward of Prefix Grouper (Liu et
al. 2025, arXiv 2506.05433): the prompt's k − 1 copies leave the linear layers, their gradients flow into the one
copy. The RL stage's Llama-family SDPA models attend by the rows' :class:`AttentionLayout` (``packed_attention``):
each sequence, prompt and reply only over what they may see, so a group always shares its prompt. Any other model
takes the rows' mask and computes each unit's whole attention square; where that would cost more than the prompt
copies it saves (long replies to a short prompt) the group stays apart (:func:`prompt_sharing_pays`).

The same :class:`PackedRows` of a micro-batch is used when its experience is made and at every update on it, so
the first update's probability ratio is exactly 1. Results equal the padded forward's up to float rounding (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moss_rlhf import losses
from moss_rlhf.data.collate import fewest_padded_rows
from moss_rlhf.distributed import is_sharded
from moss_rlhf.models import base_model, final_hidden_states, likelihood_bonus, likelihood_weight, score_head, unwrap
from moss_rlhf.packed_attention import NAME as PACKED_ATTENTION
from moss_rlhf.packed_attention import AttentionLayout, installed

# the attention implementations that take a custom mask (shared prompts); flash and flex kernels take none here
MASKED_ATTENTION = ("sdpa", "eager", PACKED_ATTENTION)
# ``share_prompts`` where every model attends by the layout (``packed_attention``): sharing a prompt costs no square
SHARE_ALWAYS = 2 ** 62


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
    layout: AttentionLayout                       # the segments each position attends within (packed_attention)
    attention_mask: torch.Tensor | None = None  # [rows, 1, width, width] bool with shared prompts; None: by position

    @property
    def n_tokens(self) -> int:
        """Positions the decoder runs on (real tokens and the rows' end padding)."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> PackedRows:
        return PackedRows(*(getattr(self, f).to(device) for f in ("input_ids", "position_ids", "predict_index",
                                                                     "targets", "scatter_index", "last_index")),
                          self.shape, self.layout.to(device),
                          None if self.attention_mask is None else self.attention_mask.to(device))

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-response-token values ``[N]`` → the padded layout ``[b, R]`` (0 after each response's end);
        differentiable."""
        b, width = self.shape
        return flat.new_zeros(b * width).index_copy(0, self.scatter_index, flat).view(b, width)


def pack_sequences(sequences: torch.Tensor, attention_mask: torch.Tensor, response_width: int,
                   max_row: int = 0, share_prompts: int = 0) -> PackedRows:
    """Pack padded rollout rows (``[b, P+R]``: left-padded prompt, right-padded response of width ``R``) without
    their padding, into rows of at most ``max_row`` tokens (0, and never less than: the longest unit).
    Attention computes the whole square of a row and keeps only its diagonal blocks, so rows no wider than the
    longest unit never cost more attention than the padded batch, while short units still share rows.

    A unit is one sequence. With ``share_prompts`` (the hidden size ``d`` of the models that will run the rows; 0:
    never), consecutive rows with the same prompt (a group of replies) make one unit where that is less work
    (:func:`prompt_sharing_pays`): the prompt once, then each reply, every reply attending to the prompt and to
    itself only (:func:`shared_prompt_mask`), its rotary positions continuing from the prompt's end as alone."""
    device = sequences.device
    prompt_width = sequences.shape[1] - response_width
    # plain lists: a rollout's few thousand tokens are laid out faster in Python than by per-sequence tensor ops
    prompts, replies = [], []
    for row, keep in zip(sequences.tolist(), attention_mask.bool().tolist()):
        prompts.append([t for t, k in zip(row[:prompt_width], keep[:prompt_width]) if k])
        replies.append([t for t, k in zip(row[prompt_width:], keep[prompt_width:]) if k])
    runs: list[list[int]] = []  # consecutive rows with one prompt
    for i, prompt in enumerate(prompts):
        if share_prompts and runs and prompts[runs[-1][0]] == prompt:
            runs[-1].append(i)
        else:
            runs.append([i])
    units = [unit for run in runs for unit in (
        [run] if prompt_sharing_pays(len(prompts[run[0]]), [len(replies[i]) for i in run], share_prompts)
        else [[i] for i in run])]
    shared = any(len(unit) > 1 for unit in units)
    lengths = [len(prompts[unit[0]]) + sum(len(replies[i]) for i in unit) for unit in units]
    layout = fewest_padded_rows(lengths, max(max_row, max(lengths)))
    width = max(sum(lengths[u] for u in row) for row in layout)
    ids, positions = [0] * (len(layout) * width), [0] * (len(layout) * width)
    # per position: its unit (row end padding: a unit of its own) and its branch (0: the prompt, j: the j-th reply)
    unit_of, branch = [-1] * (len(layout) * width), [0] * (len(layout) * width)
    predict, targets, scatter, last = [], [], [], [0] * len(prompts)
    trunks, branches = [], []  # the attention layout's segments (AttentionLayout)
    for r, row in enumerate(layout):
        at = r * width  # flat position
        for u in row:
            prompt = prompts[units[u][0]]
            ids[at:at + len(prompt)] = prompt
            positions[at:at + len(prompt)] = range(len(prompt))
            unit_of[at:at + lengths[u]] = [u] * lengths[u]
            prompt_end = at + len(prompt) - 1
            prompt_positions = list(range(at, at + len(prompt)))
            if lengths[u]:
                trunks.append(list(range(at, at + lengths[u])) if len(units[u]) == 1 else prompt_positions)
            at += len(prompt)
            for j, i in enumerate(units[u], start=1):
                reply = replies[i]
                n = len(reply)
                ids[at:at + n] = reply
                positions[at:at + n] = range(len(prompt), len(prompt) + n)
                branch[at:at + n] = [j] * n
                # the prompt's last token predicts the reply's first, each reply token the next
                predict += [prompt_end, *range(at, at + n - 1)][:n]
                targets += reply
                scatter += range(i * response_width, i * response_width + n)
                last[i] = at + n - 1 if n else prompt_end
                if len(units[u]) > 1 and n:
                    branches.append((prompt_positions, list(range(at, at + n))))
                at += n
        end = (r + 1) * width
        positions[at:end] = range(end - at)  # the row's end padding: a segment of its own, never read
    shape = (len(layout), width)
    mask = shared_prompt_mask(torch.tensor(unit_of).view(shape), torch.tensor(branch).view(shape)) if shared else None
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return PackedRows(as_long(ids).view(shape), as_long(positions).view(shape), as_long(predict), as_long(targets),
                      as_long(scatter), as_long(last), (len(prompts), response_width),
                      AttentionLayout.build(trunks, branches), mask).to(device)


def prompt_sharing_pays(prompt: int, replies: list[int], hidden_size: int) -> bool:
    """Whether a group of ``len(replies)`` replies to one prompt (lengths in tokens) is less work packed as one unit
    than as separate sequences, for a decoder of hidden size ``d``. Sharing saves the linear layers' work on the
    prompt's other copies, about ``24·d²`` FLOPs per position and layer (the projections and a gated MLP: ~12·d²
    weights, 2 FLOPs each), and attention then computes the unit's whole square instead of each sequence's, ``4·d``
    FLOPs per query-key pair and layer: worth it when ``6·d·(k − 1)·P`` exceeds the squares' difference. A long
    prompt with short replies (retrieval, long instructions) shares; long replies to a short prompt (reasoning
    traces) do not: their unit's square would cost more than the prompt copies it saves."""
    k = len(replies)
    if k < 2 or hidden_size <= 0:
        return False
    extra_square = (prompt + sum(replies)) ** 2 - sum((prompt + n) ** 2 for n in replies)
    return 6 * hidden_size * (k - 1) * prompt > extra_square


def prompt_sharing(models) -> int:
    """``pack_sequences``'s ``share_prompts`` for rows that ``models`` will run: :data:`SHARE_ALWAYS` where all of
    them attend by the layout (a reply's attention then costs the same with its prompt shared or not), else the
    smallest hidden size among them (attention weighs most against the linear layers there), or 0 where one of them
    runs attention that takes no mask."""
    if all(installed(m) for m in models):
        return SHARE_ALWAYS
    if not takes_attention_masks(models):
        return 0
    return min(getattr(base_model(m).config, "hidden_size", 0) or 0 for m in models)


def shared_prompt_mask(unit_of: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, width, width]`` boolean attention mask (True: may attend) of rows packed with shared prompts: a
    position sees the earlier positions of its own unit that are the unit's prompt or of its own reply. End padding
    (unit -1) sees only earlier padding, so that no row of the mask is empty."""
    index = torch.arange(unit_of.shape[1])
    causal = index[None, :, None] >= index[None, None, :]
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_unit & visible_branch)[:, None]


def attention_implementation(model) -> str:
    return getattr(base_model(model).config, "_attn_implementation", None) or "eager"


def takes_attention_masks(models) -> bool:
    """Whether every one of ``models`` takes the attention mask of shared prompts."""
    return all(attention_implementation(model) in MASKED_ATTENTION for model in models)


def attention_for(model, packed: PackedRows) -> dict:
    """The keyword arguments that make ``model``'s attention see only what each position may: the layout for a model
    that attends by it (and a placeholder mask, so that transformers builds none); otherwise the attention mask —
    None for rows told apart by their restarting positions, with shared prompts the boolean mask for SDPA, or the
    additive one (0 or the dtype's lowest) for eager attention."""
    if installed(model):
        return dict(attention_mask=_NO_MASK.to(packed.input_ids.device), packed_layout=packed.layout)
    return dict(attention_mask=_mask_for(model, packed))


# a 4D mask is taken as it is: what a model that attends by the layout is given, so that no mask is built
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def _mask_for(model, packed: PackedRows) -> torch.Tensor | None:
    mask = packed.attention_mask
    if mask is None:
        return None
    implementation = attention_implementation(model)
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"shared prompts need attention that takes a mask ({', '.join(MASKED_ATTENTION)}); this model "
                     f"runs {implementation!r}")


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
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                    **attention_for(model, packed))
        logits = out.logits.flatten(0, 1)[packed.predict_index]
    else:
        hidden = final_hidden_states(model, packed.input_ids, position_ids=packed.position_ids, logits_to_keep=1,
                                     **attention_for(model, packed))
        hidden = hidden.flatten(0, 1)[packed.predict_index]
        if (type(head) is torch.nn.Linear and not is_sharded(model)
                and len(hidden) * head.out_features > losses.HEAD_BLOCK_ELEMENTS):
            # logits too large to hold: block by block, never all at once (losses.linear_logprobs)
            logprobs, entropy = losses.linear_logprobs(hidden, head.weight, head.bias, packed.targets, temperature)
            entropy = entropy if entropy_grad and torch.is_grad_enabled() else entropy.detach()
            return packed.unpack(logprobs), packed.unpack(entropy) if with_entropy else None
        logits = head(hidden)
    logprobs, entropy = losses.logits_logprobs(logits, packed.targets, temperature, with_entropy,
                                               entropy_grad and torch.is_grad_enabled())
    return packed.unpack(logprobs), packed.unpack(entropy) if with_entropy else None


def _hidden_states(model, packed: PackedRows) -> torch.Tensor:
    """The final hidden states ``[rows · width, d]`` of the packed rows, flattened as the indices count."""
    hidden = final_hidden_states(model, packed.input_ids, position_ids=packed.position_ids,
                                 **attention_for(model, packed))
    return hidden.flatten(0, 1)


def packed_values(critic, packed: PackedRows) -> torch.Tensor:
    """The critic's values ``[b, R]``: its score at the position that predicts each response token (the state
    before it)."""
    hidden = _hidden_states(critic, packed)[packed.predict_index]
    return packed.unpack(score_head(unwrap(critic))(hidden).squeeze(-1).float())


def packed_sequence_scores(model, packed: PackedRows) -> torch.Tensor:
    """A reward model's score ``[b]``: its head at each sequence's last token (the reply's turn end), plus, for one
    trained with ``--likelihood-weight``, that weight × the response's mean log-likelihood
    (``models.likelihood_weight``)."""
    hidden = _hidden_states(model, packed)
    scores = score_head(unwrap(model))(hidden[packed.last_index]).squeeze(-1).float()
    if likelihood_weight(model):
        rows = packed.scatter_index // packed.shape[1]
        scores = scores + likelihood_bonus(model, hidden[packed.predict_index], packed.targets, rows, packed.shape[0])
    return scores
