"""Build, load and save models: causal LMs from a size preset or any ``transformers`` checkpoint, masked LMs for the
optional encoder objective, scalar scorers (reward model / critic), and LoRA adapters through ``peft``.

Everything is saved with ``save_pretrained`` (safetensors), so a plain ``AutoModelForCausalLM.from_pretrained``
— or vLLM — loads what we write.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf.config import ConfigError, NonFiniteError
from moss_rlhf.files import atomic_directory
from moss_rlhf.losses import last_token_index

# Llama-architecture presets. Vocabulary size comes from the tokenizer.
PRESETS: dict[str, dict] = {
    # ~1.5M parameters with a 4k vocabulary: tests and the demo world on a laptop CPU.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=352, max_position_embeddings=512),
    # ~2M parameters with the demo world's 1.7k vocabulary: between the two, for a demo model that knows its world.
    "mini": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
                 intermediate_size=512, max_position_embeddings=512),
    # ~14M parameters with an 8k vocabulary: the throughput benchmark and a stronger demo.
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                  intermediate_size=1024, max_position_embeddings=1024),
    # ~110M parameters: a real GPU run.
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, max_position_embeddings=2048),
}


@dataclass
class LoraOptions:
    r: int = 0  # 0 disables LoRA
    alpha: int = 16
    dropout: float = 0.0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU if there is one; a named device must exist (no silent fall-back to the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path: str, flag: str = "--model") -> None:
    """Fail early, in one line, on a model directory that does not exist (a hub id such as ``org/name`` passes),
    and on a size preset given where a trained model belongs."""
    if path in PRESETS and not Path(path).exists():
        raise ConfigError(f"{flag}: {path!r} is a size preset (for `moss-rlhf pretrain --model`), not a saved model; "
                          f"give a directory written by an earlier stage (e.g. runs/pretrain/model)")
    if Path(path).exists():
        if Path(path).is_dir() and not (Path(path) / "config.json").exists():
            raise ConfigError(f"{flag}: {path} holds no config.json; expected a model saved with save_pretrained "
                              f"(e.g. runs/sft/model)")
        return
    if not _HUB_ID.match(path) or path.startswith(("runs", ".")):
        raise ConfigError(f"{flag}: {path} does not exist")


def build_causal_lm(preset_or_config: str, tokenizer, seed: int = 0):
    """A fresh Llama from a named preset, or any architecture from a ``config.json`` path."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if preset_or_config in PRESETS:
        config = LlamaConfig(**PRESETS[preset_or_config], **special, tie_word_embeddings=True,
                             rms_norm_eps=1e-5, rope_theta=10000.0)
    elif Path(preset_or_config).exists():
        config = AutoConfig.from_pretrained(preset_or_config)
        for key, value in special.items():
            setattr(config, key, value)
    else:
        raise ConfigError(f"unknown model preset or config path {preset_or_config!r}; presets: {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_masked_lm(preset: str, tokenizer, seed: int = 0):
    """An encoder (BERT) of the preset's size, for the masked-LM pretraining objective."""
    from transformers import BertConfig, BertForMaskedLM

    p = PRESETS[preset]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=p["hidden_size"],
                        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
                        intermediate_size=p["intermediate_size"], max_position_embeddings=p["max_position_embeddings"],
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


@contextlib.contextmanager
def quiet_transformers(notices: bool = True):
    """Silence transformers' per-file progress bars ("Loading weights", "Writing model shards") — and with
    ``notices=False`` its warnings too — for one load or save, then restore the caller's settings: our own progress
    bars cover long work, and importing this module changes nothing."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if not notices:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def reading(path: str, flag: str, what: str = "model"):
    """Turn the errors of loading a user's model or tokenizer (a hub id that cannot be reached, a truncated or
    garbage weights file, an unknown architecture) into one line naming the flag and the path."""
    from safetensors import SafetensorError

    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"{flag}: cannot load the {what} {path}: {reason[:300]}") from None


def refuse_nonfinite(model, path: str, flag: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"{flag}: {path} holds NaN or Inf weights ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); nothing can be trained or sampled from it")


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None, flag: str = "--model", **kwargs):
    """A causal LM from a save_pretrained directory or hub id (``kwargs`` go to ``from_pretrained``); its weights
    must be finite."""
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path, flag)
    with reading(name_or_path, flag), quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32, **kwargs)
    refuse_nonfinite(model, name_or_path, flag)
    return model


def load_scorer(name_or_path: str, tokenizer=None, dtype: torch.dtype | None = None, flag: str = "--model",
                trained: bool = False):
    """A sequence scorer with one output (reward model or critic). From an LM checkpoint, the head starts at zero so
    the first rewards are 0 and the Bradley–Terry loss starts at log 2 — refused with ``trained``, where a reward
    model or a judge is expected (a zero head scores every reply 0); from a reward checkpoint, the head is loaded."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_path(name_or_path, flag)
    with reading(name_or_path, flag):
        config = AutoConfig.from_pretrained(name_or_path)
    is_scorer = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained and not is_scorer:
        raise ConfigError(f"{flag}: {name_or_path} is not a reward model (a {', '.join(config.architectures or [])} "
                          f"without a trained score head); train one with `moss-rlhf reward`")
    config.num_labels = 1
    if config.pad_token_id is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with reading(name_or_path, flag), quiet_transformers(notices=False):  # a new head is new on purpose: no alarm
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config,
                                                                   dtype=dtype or torch.float32)
    if not is_scorer:
        torch.nn.init.zeros_(score_head(model).weight)
    refuse_nonfinite(model, name_or_path, flag)
    return model


def check_vocabulary(model, tokenizer, flag: str = "--tokenizer") -> None:
    """Refuse a tokenizer that does not belong to the model: ids beyond its embedding, or another end token."""
    embeddings = base_model(model).get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ConfigError(f"{flag}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{embeddings}: they do not belong together")
    eos = getattr(base_model(model).config, "eos_token_id", None)
    if eos is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in (
            eos if isinstance(eos, list) else [eos]):
        raise ConfigError(f"{flag}: the tokenizer's end token is id {tokenizer.eos_token_id}, the model's is {eos}: "
                          f"they do not belong together")


def context_length(model) -> int | None:
    """The positions ``model`` reads (its config's ``max_position_embeddings``, GPT-2's ``n_positions``); None where
    the config does not say."""
    return getattr(getattr(base_model(model), "config", None), "max_position_embeddings", None)


# the names transformers gives a table of learned absolute positions (GPT-2 and GPT-Neo, OPT and BioGPT, BERT)
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def check_positions(model, longest: int, flag: str) -> None:
    """Refuse, before any step, sequences longer than a model with learned absolute positions has positions for: it
    would stop at the first such batch with an IndexError. Rotary and ALiBi models read any length (the sampler
    alone holds them to ``max_position_embeddings``)."""
    positions = context_length(model)
    learned = any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
                  for name, m in model.named_modules())
    if learned and positions and longest > positions:
        raise ConfigError(f"{flag} {longest}: the model ({base_model(model).config.model_type}) has learned "
                          f"positions for {positions} tokens only; give {flag} {positions} or less")


def score_head(model) -> torch.nn.Linear:
    """The linear scoring layer of a ``*ForSequenceClassification`` model (``score`` for Llama/Qwen/Mistral/GPT-2)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__} has no linear score head")


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None, packed_layout=None,
                        **forward_kwargs) -> torch.Tensor:
    """The last layer's (normed) hidden states ``[B, T, d]`` of a transformers causal LM or scorer.

    With gradients on, through ``model(...)`` itself (``forward_kwargs`` go there, e.g. ``logits_to_keep``): under
    DDP only the wrapper's forward prepares the gradient all-reduce — a backbone called directly would let each
    process train on its own gradients (the 1-vs-2-process tests catch that) — and asking for every layer's output
    costs nothing, since backward keeps them anyway. Without gradients (scoring rollouts, evaluation), through the
    inner backbone, so that only the last layer's output is held, not one tensor per layer — except for a model
    sharded by FSDP, whose every forward runs through its root (which gathers the embeddings and heads).
    ``packed_layout``: packed rows' attention layout, for a model that attends by it (``packed_attention``)."""
    from moss_rlhf.distributed import is_sharded

    layout = {} if packed_layout is None else {"packed_layout": packed_layout}
    if torch.is_grad_enabled() or is_sharded(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True, use_cache=False, **layout, **forward_kwargs)
        return out.hidden_states[-1]
    base = base_model(model)
    backbone = getattr(base, base.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    **layout).last_hidden_state


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One scalar per token ``[B, T]`` from a scorer: the critic's values. The backbone runs once and the head is
    applied to every hidden state."""
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
    return score_head(unwrap(model))(hidden).squeeze(-1).float()


# A reward model's score may add its reply's mean log-likelihood under its own language-model head
# (``moss-rlhf reward --likelihood-weight``). The weight is saved in the model's config.json, so every reader of the
# model — reward training and evaluation, RL's rollouts, ``--judge`` — scores a reply alike.
LIKELIHOOD_WEIGHT = "moss_rlhf_likelihood_weight"


def likelihood_weight(model) -> float:
    """The weight of the reply's mean log-likelihood in this scorer's reward (0: the score head alone)."""
    config = base_model(model).config
    weight = float(getattr(config, LIKELIHOOD_WEIGHT, 0.0) or 0.0)
    if weight and not getattr(config, "tie_word_embeddings", False):
        raise ConfigError(f"the reward model's config sets {LIKELIHOOD_WEIGHT} {weight:g}, which reads the likelihood "
                          f"through the input embeddings; that is the language-model head only with tied embeddings "
                          f"(tie_word_embeddings), which this {type(base_model(model)).__name__} does not have")
    return weight


def mean_reply_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                        n_rows: int) -> torch.Tensor:
    """Each row's mean log-probability of its reply tokens ``[n_rows]`` (0 for a row without any): ``hidden [N, d]``
    the final hidden states at the positions that predict the ``N`` reply tokens ``targets``, ``rows`` the row of
    each, ``head [V, d]`` the output projection (for a model sharded by FSDP2, read after its forward, which leaves
    the root's weights gathered). The logits are formed block by block (``losses.linear_logprobs``)."""
    from moss_rlhf.losses import linear_logprobs

    logprobs, _ = linear_logprobs(hidden, head, None, targets)
    total = logprobs.new_zeros(n_rows).index_add(0, rows, logprobs)
    count = logprobs.new_zeros(n_rows).index_add(0, rows, torch.ones_like(logprobs))
    return total / count.clamp(min=1)


def likelihood_bonus(model, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                     n_rows: int) -> torch.Tensor:
    """The scorer's ``likelihood_weight`` × each row's mean reply log-probability under its tied embeddings
    (:func:`mean_reply_logprobs`'s arguments)."""
    head = base_model(model).get_input_embeddings().weight
    return likelihood_weight(model) * mean_reply_logprobs(hidden, head, targets, rows, n_rows)


def reply_likelihood_bonus(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`likelihood_bonus` per row ``[B]`` of padded ``hidden [B, T, d]`` (the final hidden states), the reply's
    tokens marked by ``labels [B, T]`` (``IGNORE`` elsewhere, as ``collate.reply_example`` writes them); zeros for a
    scorer without the term."""
    from moss_rlhf.data.collate import IGNORE

    if not likelihood_weight(model):
        return hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    targets = labels[:, 1:]
    counted = targets != IGNORE
    return likelihood_bonus(model, hidden[:, :-1][counted], targets[counted], counted.nonzero()[:, 0], len(hidden))


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them: the positions the sampler
    generates with, and every later forward pass over its rollouts must use."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """One scalar per sequence ``[B]``: the score at the last non-pad token (works for left and right padding) —
    the turn end of the reply, where reward training reads it too (``collate.reply_example``) — plus, for a reward
    model trained with ``--likelihood-weight``, that weight × the reply's mean log-likelihood (the reply's tokens
    marked by ``labels``)."""
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids_of(attention_mask))
    last = last_token_index(attention_mask).clamp(min=0)
    at_last = hidden[torch.arange(len(hidden), device=hidden.device), last]
    scores = score_head(unwrap(model))(at_last).squeeze(-1).float()
    if likelihood_weight(model):
        if labels is None:
            raise ValueError("this reward model adds the reply's likelihood: give the reply's labels")
        scores = scores + reply_likelihood_bonus(model, hidden, labels)
    return scores


def apply_lora(model, options: LoraOptions, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters on every linear layer (peft); a no-op when ``options.r == 0``."""
    if options.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, config)


def disable_dropout(model) -> None:
    """Set every dropout rate of ``model`` to 0: ``nn.Dropout`` modules, the rates attention layers read at forward
    time (Llama's ``attention_dropout``) and the config's. Online RL needs this (TRL and OpenRLHF do the same): with
    dropout the policy that samples, the one that scores the old log-probs and the one being updated are three
    different random functions, and the probability ratio is not 1 before the first update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(unwrap(model), "config", None)
    for key, value in (config.to_dict() if config is not None else {}).items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


def compile_layers(model) -> None:
    """``torch.compile`` each transformer block of ``model`` in place (inductor, shapes dynamic), as torchtune does:
    the blocks share one compiled graph, so compilation costs what one block's does, and the model stays the same
    module — its state dict, saving, LoRA adapters and DDP wrapping are unchanged. The embeddings and the output
    head stay eager (our log-probs read the head's output, ``losses.logits_logprobs``). Packed rows vary in
    length from step to step; dynamic shapes compile them once, not once per length."""
    from moss_rlhf.config import ConfigError

    base = base_model(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    blocks = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ConfigError(f"--compile: {type(base).__name__} keeps no list of transformer blocks where "
                          f"transformers' decoders do (.layers or .h)")
    # one block function serves every model of a run, and each of its variants is a compilation of its own: with
    # and without gradients, LoRA's layers and plain ones, with and without a packed layout (PPO-max under LoRA
    # with a critic and evaluations made 7); dynamo's default limit of 8 would leave any beyond it eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in blocks:
        block.compile(dynamic=True)


def unwrap(model):
    """The plain transformers model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def base_model(model):
    """The transformers model under every wrapper: DDP, torch.compile and peft's LoRA."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts(model, argument: str) -> bool:
    """Whether the underlying transformers model's forward takes ``argument`` (``logits_to_keep``, ``cache``)."""
    return argument in inspect.signature(base_model(model).forward).parameters


def save_model(model, tokenizer, path: str | Path, write: bool = True) -> None:
    """``save_pretrained`` (safetensors) of model and tokenizer, written atomically (a crash leaves the previous
    directory or the new one, never half of one); LoRA adapters are merged first so the result loads in plain
    transformers. A model sharded by FSDP is gathered first, once, into one directory: every process calls this,
    and the one with ``write`` (the main one) writes."""
    from moss_rlhf.distributed import full_state_dict, is_sharded, unsharded_skeleton

    model = unwrap(model)
    gathered = is_sharded(model)
    if gathered:  # onto the main process's CPU, into a skeleton that takes the tensors as they are (no second copy)
        state = full_state_dict(model, write)
        if not write:
            return
        model = unsharded_skeleton(model)
        model.load_state_dict(state, assign=True)
        model.tie_weights()
    elif not write:
        return
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"refusing to save {path}: {len(bad)} weight tensor(s) hold NaN or Inf "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    if hasattr(model, "merge_and_unload"):  # a copy: the training model keeps its adapters
        model = (model if gathered else copy.deepcopy(model)).merge_and_unload()
    with atomic_directory(path) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def load_weights(model, path: str | Path) -> None:
    """Load a save_pretrained folder's weights into an existing model in place (exact resume). Keys missing from the
    file may only be tied ones (e.g. ``lm_head.weight`` tied to the embeddings)."""
    from safetensors.torch import load_file

    target = unwrap(model)
    if hasattr(target, "get_base_model"):  # LoRA: the folder holds merged weights; adapters come from state.pt
        return
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k} if getattr(target.config, "tie_word_embeddings",
                                                                                 False) else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{path}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def trainable_state(model) -> dict[str, torch.Tensor] | None:
    """LoRA adapters' weights (saved in state.pt for resume); None for a fully trained model (its folder has all)."""
    target = unwrap(model)
    if not hasattr(target, "get_base_model"):
        return None
    return {k: v.detach().cpu().clone() for k, v in target.named_parameters() if v.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor] | None) -> None:
    if not state:
        return
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
