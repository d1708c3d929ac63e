"""Attention over packed rows that computes only what each token may see: a sequence attends within itself, a reply
of a shared prompt to the prompt and to itself — never the square of a whole packed row.

``packing.pack_sequences`` packs an RL micro-batch into a few wide rows (no padding between sequences, a group's
prompt once). Through transformers' SDPA attention such a row costs its whole square under a block-diagonal mask:
on the GRPO benchmark (16 rows of 141 tokens, each a prompt and its 4 replies of ~32 tokens) one layer's masked
attention took 3.3 ms forward and 9.7 ms forward and backward, where the squares that count — each prompt with
itself, each reply with its prompt and itself (Prefix Grouper, Liu et al. 2025, arXiv 2506.05433) — took 2.1 and
6.1 ms as two batched SDPA calls. This module is that computation as a transformers attention function
(``AttentionInterface``): the query, key and value of every position are gathered into one padded batch per kind
of segment by the :class:`AttentionLayout` that ``pack_sequences`` builds, attend there (a sequence alone or a
shared prompt: causal; a reply: its prompt, then itself causally), and are put back in place.

The function is installed (:func:`install`) on the RL stage's Llama-family models that run SDPA; it acts only on a
forward that passes ``packed_layout=`` (``packing``'s forwards do) and is transformers' own SDPA attention on every
other (sampling's prompt pass, evaluation). The attention implementation is not part of a saved config, so a saved
model loads as it was. Results equal the masked SDPA's up to float rounding (tested, forward and backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "moss_rlhf_packed"

# the transformers model types whose attention layers take the layout through the forward's keyword arguments
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class AttentionLayout:
    """Where each packed position's attention happens, as indices into the flattened ``[rows · width]`` positions.

    A *trunk* attends causally within itself: a sequence packed alone, or a shared prompt. A *branch* is a reply of
    a shared prompt: its queries see the prompt's keys, then their own causally. Each kind is gathered into one
    padded batch (a trunk padded by repeating its first position, which only padded queries see; branches by their
    own first positions, hidden by ``branch_mask``); ``trunk_keep`` / ``branch_keep`` pick the real positions out of
    the padded batches, in the order of ``destination``. Rows' end padding is in no segment: its output is 0."""

    trunk_index: torch.Tensor             # [T, Lt]
    trunk_keep: torch.Tensor              # [n_t] into trunk_index.flatten()
    branch_query: torch.Tensor | None     # [B, Lb]
    branch_key: torch.Tensor | None       # [B, Lp + Lb]: the prompt's positions, then the reply's
    branch_mask: torch.Tensor | None      # [B, 1, Lb, Lp + Lb] bool, True: may attend
    branch_keep: torch.Tensor | None      # [n_b] into branch_query.flatten()
    destination: torch.Tensor             # [n_t + n_b] flat positions the outputs go to

    @classmethod
    def build(cls, trunks: list[list[int]], branches: list[tuple[list[int], list[int]]]) -> AttentionLayout:
        """From each trunk's positions and each branch's ``(prompt positions, reply positions)``."""
        trunk_index, trunk_keep, destination = _padded(trunks)
        if not branches:
            return cls(trunk_index, trunk_keep, None, None, None, None, destination)
        replies, reply_keep, reply_destination = _padded([reply for _, reply in branches])
        prompt_width, reply_width = max(len(prompt) for prompt, _ in branches), replies.shape[1]
        prompts = torch.tensor([prompt + [prompt[0]] * (prompt_width - len(prompt)) for prompt, _ in branches])
        visible = torch.arange(prompt_width)[None, :] < torch.tensor([len(prompt) for prompt, _ in branches])[:, None]
        causal = torch.ones(reply_width, reply_width, dtype=torch.bool).tril()
        mask = torch.cat([visible[:, None, :].expand(-1, reply_width, -1), causal.expand(len(branches), -1, -1)], 2)
        return cls(trunk_index, trunk_keep, replies, torch.cat([prompts, replies], 1), mask[:, None], reply_keep,
                   torch.cat([destination, reply_destination]))

    def to(self, device: torch.device) -> AttentionLayout:
        return AttentionLayout(*(None if t is None else t.to(device) for t in (
            self.trunk_index, self.trunk_keep, self.branch_query, self.branch_key, self.branch_mask, self.branch_keep,
            self.destination)))


def _padded(segments: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, longest]`` positions (each segment padded with its first), the indices of the real ones in the
    flattened padded batch, and those real positions in the same order."""
    width = max((len(s) for s in segments), default=1)
    index = torch.tensor([s + [s[0]] * (width - len(s)) for s in segments], dtype=torch.long).view(-1, width)
    keep = torch.tensor([i * width + j for i, s in enumerate(segments) for j in range(len(s))], dtype=torch.long)
    return index, keep, index.flatten()[keep]


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     packed_layout: AttentionLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: ``query [rows, heads, width, d]``, ``key``/``value [rows, kv_heads,
    width, d]`` → ``[rows, width, heads, d]``. Without ``packed_layout``, transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = packed_layout
    rows, heads, width, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value))
    options = dict(dropout_p=dropout, scale=scaling, enable_gqa=k.shape[1] != heads)

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [n, L] positions -> [n, heads, L, d]
        return x.index_select(0, index.flatten()).view(*index.shape, x.shape[1], dim).transpose(1, 2)

    def real(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # [n, heads, L, d] -> [kept, heads, d]
        return out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, keep)

    trunk = layout.trunk_index
    pieces = [real(F.scaled_dot_product_attention(gather(q, trunk), gather(k, trunk), gather(v, trunk),
                                                  is_causal=True, **options), layout.trunk_keep)]
    if layout.branch_query is not None:
        pieces.append(real(F.scaled_dot_product_attention(
            gather(q, layout.branch_query), gather(k, layout.branch_key), gather(v, layout.branch_key),
            attn_mask=layout.branch_mask, **options), layout.branch_keep))
    out = q.new_zeros(rows * width, heads, dim).index_copy(0, layout.destination, torch.cat(pieces))
    return out.view(rows, width, heads, dim), None


def install(model) -> bool:
    """Makes ``model`` (a Llama-family causal LM or scorer running SDPA attention, with no sliding window) attend by
    :func:`packed_attention`; returns whether it does. Other models keep their attention (packed rows then take
    masks, ``packing.attention_for``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    from moss_rlhf.models import base_model

    lm = base_model(model)
    config = getattr(lm, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == NAME:
        return True
    windowed = ("sliding_attention" in (getattr(config, "layer_types", None) or ())
                or getattr(config, "sliding_window", None) is not None
                and getattr(config, "use_sliding_window", None) is not False)  # Mistral's window is on by default
    if implementation != "sdpa" or getattr(config, "model_type", None) not in FAMILIES or windowed:
        return False
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, packed_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # without a layout: SDPA, with SDPA's masks
    lm.set_attn_implementation(NAME)
    return True


def installed(model) -> bool:
    from moss_rlhf.models import base_model

    return getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) == NAME
