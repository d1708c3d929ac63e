"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) or load any Hugging Face tokenizer, with a chat
template and the special tokens the pipeline relies on.

Byte-level BPE (GPT-2 style) starts from the 256 byte values, so UTF-8 text of any script — Chinese included —
round-trips exactly, and no character is ever unknown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.data.formats import Message

BOS, EOS, PAD, MASK = "<|bos|>", "<|end|>", "<|pad|>", "<|mask|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, MASK, *ROLE_TOKENS]
# CJK ideographs (with extension A and the compatibility block), CJK punctuation and full-width forms
CJK_CHARACTER = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"

# Every turn is "<|role|>content<|end|>"; generation stops at <|end|>, which is also our eos token, so a chat reply
# and a pretraining document end the same way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Used for tokenizers that come without a chat template of their own (base models). A turn ends with eos, where
# generation stops and the reward model reads its score; the newline after it only separates turns. The generation
# prompt stops before the space that precedes the content, so the reply's first token is the " word" token the
# model saw after "assistant:" in training (with "assistant: " the space would be a token of its own).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@dataclass
class TokenizerConfig(Config):
    corpus: list[str] = option([], "text files to train on (any text, conversation or preference format)")
    out: str = option("runs/tokenizer", "directory to save the tokenizer to (Hugging Face format)")
    vocab_size: int = option(4096, "vocabulary size, special tokens included", at_least=len(SPECIAL_TOKENS) + 256)
    min_frequency: int = option(2, "minimum pair frequency for a merge", at_least=1)
    split_cjk: bool = option(True, "every CJK character a token of its own (BPE would merge Chinese words across "
                                   "word boundaries)")

    def check(self) -> None:
        if not self.corpus:
            raise ConfigError("give --corpus FILE (repeat for several): the texts to train the tokenizer on")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, split_cjk: bool = True):
    """Train byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` with our chat template.

    ``split_cjk``: every CJK character is a token of its own (BERT's Chinese-character rule). Chinese has no spaces,
    so plain BPE merges across word boundaries ("鸟很慢" — bird, very, slow — became one token in the demo world),
    and a small model must then learn each merged phrase apart instead of translating word by word."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CJK_CHARACTER), "isolated"), byte_level])
                         if split_cjk else byte_level)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str, flag: str = "--tokenizer"):
    """Load any Hugging Face tokenizer (hub id or local path) and make it usable by every stage: it gets a pad
    token (its eos) and a chat template if it has none. ``flag`` names the option it came from in errors."""
    from transformers import AutoTokenizer

    from moss_rlhf.models import check_model_path, reading

    if not Path(name_or_path).exists():
        check_model_path(name_or_path, flag)  # a missing directory, or a hub id
    with reading(name_or_path, flag, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token is None:
        raise ConfigError(f"{flag}: {name_or_path} has no end-of-sequence token, so no reply could ever end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn: eos, and the special token the chat template closes a turn with
    (``<|end|>`` in ours, ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3). Generation stops at any of them,
    SFT's labels and the reward model's input end there, and the reward model reads its score there — whatever the
    template renders after it (a newline) belongs to the next turn."""
    ids = {tokenizer.eos_token_id}
    ids.add(_turn_end_token(tokenizer))
    return sorted(i for i in ids if i is not None)


_MARK = "⁣moss-rlhf-turn⁣"


def _turn_end_token(tokenizer) -> int | None:
    """The special token right after an assistant message in the rendered template, if there is one."""
    try:
        rendered = render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}])
    except Exception:  # a template that refuses this conversation has no turn end we can learn from it
        return None
    if _MARK not in rendered:
        return None
    after = rendered.split(_MARK, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}
    return ids[0] if ids and ids[0] in special else None


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation (special tokens come from the template, never added twice)."""
    return tokenizer(render_chat(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def run(cfg: TokenizerConfig) -> str:
    """``moss-rlhf tokenizer``: train on the given corpus and save; returns the directory."""
    from moss_rlhf.data.corpus import corpus_texts

    texts = [t for t in corpus_texts(cfg.corpus) if t.strip()]
    if not texts:
        raise ConfigError(f"--corpus {', '.join(cfg.corpus)}: no text to train a tokenizer on")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency, cfg.split_cjk)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(cfg.out)
    print(f"tokenizer: {len(tokenizer)} tokens trained on {len(texts)} documents -> {cfg.out}")
    return cfg.out
