"""The trained model in use, from Python: ``moss_rlhf.load(path)`` returns an :class:`Assistant`.

- ``generate(prompt)``: raw text continuation (no chat template), for base / pretrained models;
- ``respond(messages)``: a multi-turn chat reply through the model's chat template;
- ``stream(messages)``: the same reply as an iterator of text pieces, decoded incrementally so multi-byte UTF-8
  (Chinese) is never cut in half — used by ``moss-rlhf chat`` and the server's streaming responses;
- ``translate``, ``analyze_sentiment``, ``classify``: tasks phrased the way the demo world asks them. Sentiment and
  classification do not parse free text: every candidate label is scored by the model's log-likelihood of that label
  as the assistant's whole reply (label tokens and the end-of-turn token), and the scores are normalised over the
  candidates with a softmax — so the answer is always one of the labels, with a probability.

Every method takes one input or a list of inputs (a list in, a list out) and batches internally.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from moss_rlhf.sampling import SamplingConfig, fresh_seeds, prompt_seeds
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.tokenizer import stop_token_ids

# The demo world's phrasings (moss_rlhf.demo.tasks), so a model trained there answers these requests as it learned
# to; the reply templates are the demo world's reference answers, whose likelihood scores each label.
SENTIMENT_PROMPT = 'What is the sentiment of "{text}"?'
SENTIMENT_REPLY = "The sentiment is {label}."
SENTIMENT_LABELS = ("positive", "negative", "neutral")
CLASSIFY_PROMPT = 'Topic of "{text}"? Choose from: {options}.'
CLASSIFY_REPLY = "The topic is {label}."
TRANSLATE_PROMPT = "Translate to {language}: {text}"

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Label:
    label: str
    score: float  # probability of ``label`` among the candidates


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or a stop string) or "length"


class _StopGeneration(Exception):
    """Raised from the per-token callback to end a streamed reply early (a stop string appeared, or the reader left)."""


def _sampling(defaults: SamplingConfig, overrides: dict) -> SamplingConfig:
    unknown = set(overrides) - set(SamplingConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(SamplingConfig.__dataclass_fields__)}")
    return replace(defaults, **overrides)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class Assistant:
    """A causal LM and its tokenizer on one device, with chat, completion and scoring helpers."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu",
                 sampling: SamplingConfig | None = None):
        from moss_rlhf.models import check_vocabulary

        check_vocabulary(model, tokenizer)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.sampling = sampling or SamplingConfig(max_new_tokens=128, temperature=0.7, top_p=0.9)
        self.stop_ids = stop_token_ids(tokenizer)
        self.sampler = BuiltinSampler(self.model, stop_ids=self.stop_ids, pad_id=tokenizer.pad_token_id)
        self.name = getattr(model.config, "_name_or_path", "") or "model"

    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None) -> "Assistant":
        from moss_rlhf.models import load_causal_lm, resolve_device
        from moss_rlhf.tokenizer import load_tokenizer

        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = load_causal_lm(path, dtype, **kwargs)
        assistant = cls(model, load_tokenizer(path), resolve_device(device))
        assistant.name = str(path)
        return assistant

    # ------------------------------------------------------------------------------------------------- encoding

    def encode(self, prompt: str | Messages) -> list[int]:
        """Token ids of a raw prompt (str) or of a conversation ready for the assistant's reply (messages)."""
        from moss_rlhf.tokenizer import encode_chat

        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            bos = self.tokenizer.bos_token_id
            # pretraining documents start with bos (collate.pack_texts), so a raw continuation should too
            return ids if bos is None or ids[:1] == [bos] else [bos] + ids
        return encode_chat(self.tokenizer, self._as_messages(prompt), add_generation_prompt=True)

    def overflow(self, prompt: str | Messages, max_new_tokens: int) -> tuple[int, int] | None:
        """``(prompt tokens, context)`` when ``prompt`` and a reply of ``max_new_tokens`` do not fit the model's
        context (what the sampler would refuse), else None: the server, the chat and ``generate`` ask first."""
        from moss_rlhf.models import context_length

        context, length = context_length(self.model), len(self.encode(prompt))
        return (length, context) if context and length + max_new_tokens > context else None

    @staticmethod
    def _seeds(seed: int | None, start: int, n: int) -> list[int]:
        """Seeded: the same call gives the same replies (prompt i with its own seed); unseeded: fresh randomness."""
        return fresh_seeds(n) if seed is None else prompt_seeds(seed, range(start, start + n))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)

    # ----------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def complete(self, prompts: Sequence[str | Messages], stop: Sequence[str] = (), seed: int | None = None,
                 batch_size: int = 16, **sampling) -> list[Completion]:
        """One completion per prompt (raw strings are continued, message lists get a chat reply), with token counts
        and finish reasons: the engine behind ``generate``, ``respond`` and the server."""
        cfg = _sampling(self.sampling, sampling)
        results: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [self.encode(p) for p in prompts[start:start + batch_size]]
            rollout = self.sampler.generate(encoded, cfg, self._seeds(seed, start, len(encoded)))
            for row, prompt_ids in enumerate(encoded):
                n = int(rollout.response_mask[row].sum())
                text, hit_stop = _cut_at_stop(self._decode(rollout.response_ids[row, :n].tolist()), stop)
                reason = "stop" if bool(rollout.finished[row]) or hit_stop else "length"
                results.append(Completion(text, len(prompt_ids), n, reason))
        return results

    def generate(self, prompt: str | Sequence[str], **sampling) -> str | list[str]:
        """Continue raw text (no chat template)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [c.text for c in self.complete(prompts, **sampling)]
        return texts[0] if isinstance(prompt, str) else texts

    def respond(self, messages: Messages | Sequence[Messages] | str, **sampling) -> str | list[str]:
        """The assistant's reply to a conversation (a user message string is a one-turn conversation)."""
        single = isinstance(messages, str) or (bool(messages) and isinstance(messages[0], dict))
        conversations = [self._as_messages(messages)] if single else [self._as_messages(m) for m in messages]
        texts = [c.text for c in self.complete(conversations, **sampling)]
        return texts[0] if single else texts

    @staticmethod
    def _as_messages(value: Messages | str) -> Messages:
        from moss_rlhf.data.formats import checked_messages

        return [{"role": "user", "content": value}] if isinstance(value, str) else checked_messages(value)

    def stream(self, prompt: str | Messages, stop: Sequence[str] = (), seed: int | None = None,
               on_finish=None, **sampling) -> Iterator[str]:
        """Yield the reply as it is generated. Text is released only when it decodes to whole characters and cannot
        be the start of a stop string. ``on_finish(Completion)`` receives the totals at the end."""
        cfg = _sampling(self.sampling, sampling)
        pieces: queue.Queue = queue.Queue()
        done = object()
        cancelled = threading.Event()
        prompt_ids = self.encode(prompt)
        holdback = max((len(s) for s in stop), default=1) - 1

        def worker() -> None:
            tokens: list[int] = []
            emitted = 0
            reason = "length"

            def on_token(step: int, choice: torch.Tensor) -> None:
                nonlocal emitted, reason
                if cancelled.is_set():
                    raise _StopGeneration
                token = int(choice[0])
                if token in self.stop_ids:
                    reason = "stop"
                    return
                tokens.append(token)
                text = self._decode(tokens)
                cut, hit = _cut_at_stop(text, stop)
                if hit:
                    reason = "stop"
                    pieces.put(cut[emitted:])
                    emitted = len(cut)
                    raise _StopGeneration
                ready = len(text) - holdback
                if not text.endswith("\ufffd") and ready > emitted:  # U+FFFD: a character still missing bytes
                    pieces.put(text[emitted:ready])
                    emitted = ready

            try:
                try:
                    self.sampler.generate([prompt_ids], cfg, self._seeds(seed, 0, 1), on_token=on_token)
                except _StopGeneration:
                    pass
                text, _ = _cut_at_stop(self._decode(tokens), stop)
                if len(text) > emitted and not cancelled.is_set():
                    pieces.put(text[emitted:])
                if on_finish is not None:
                    on_finish(Completion(text, len(prompt_ids), len(tokens) + (reason == "stop"), reason))
            except BaseException as error:  # re-raised in the reader's thread
                pieces.put(error)
            finally:
                pieces.put(done)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
        finally:
            cancelled.set()  # the reader stopped early: end generation at the next token
            thread.join()

    # ---------------------------------------------------------------------------------------------------- tasks

    def translate(self, text: str | Sequence[str], target_language: str = "Chinese", **sampling) -> str | list[str]:
        texts = [text] if isinstance(text, str) else list(text)
        sampling.setdefault("temperature", 0.0)
        replies = self.respond([[{"role": "user", "content": TRANSLATE_PROMPT.format(language=target_language,
                                                                                      text=t)}] for t in texts],
                               **sampling)
        return replies[0] if isinstance(text, str) else replies

    def analyze_sentiment(self, text: str | Sequence[str]) -> Label | list[Label]:
        """Positive, negative or neutral, with its probability."""
        texts = [text] if isinstance(text, str) else list(text)
        prompts = [SENTIMENT_PROMPT.format(text=t) for t in texts]
        labels = self._best_labels(prompts, SENTIMENT_LABELS, SENTIMENT_REPLY)
        return labels[0] if isinstance(text, str) else labels

    def classify(self, text: str | Sequence[str], labels: Sequence[str]) -> Label | list[Label]:
        """The most likely of ``labels`` for each text (topic classification), with its probability."""
        if len(labels) < 2:
            raise ValueError(f"classify needs at least two labels, got {list(labels)}")
        texts = [text] if isinstance(text, str) else list(text)
        prompts = [CLASSIFY_PROMPT.format(text=t, options=", ".join(labels)) for t in texts]
        result = self._best_labels(prompts, labels, CLASSIFY_REPLY)
        return result[0] if isinstance(text, str) else result

    def _best_labels(self, prompts: list[str], labels: Sequence[str], reply_template: str) -> list[Label]:
        probabilities = self.label_probabilities(prompts, labels, reply_template)
        best = probabilities.argmax(-1).tolist()
        return [Label(labels[i], float(probabilities[row, i])) for row, i in enumerate(best)]

    @torch.no_grad()
    def label_probabilities(self, prompts: Sequence[str | Messages], labels: Sequence[str],
                            reply_template: str = "{label}", batch_size: int = 32) -> torch.Tensor:
        """``[N, L]``: softmax over labels of log P(reply | prompt), the reply being ``reply_template`` filled with
        the label and closed by the end-of-turn token — the model's own belief that this is its whole answer. The
        end token matters: without it "positive" would also collect the probability of "positively"."""
        from moss_rlhf.data.collate import IGNORE, chat_example, pad_examples
        from moss_rlhf.losses import token_logprobs

        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be one or more distinct strings, got {list(labels)}")
        if not prompts:
            return torch.zeros(0, len(labels))
        examples = [chat_example(self.tokenizer, self._as_messages(prompt) + [
            {"role": "assistant", "content": reply_template.format(label=label)}], max_len=1 << 30)
            for prompt in prompts for label in labels]
        scores: list[torch.Tensor] = []
        for start in range(0, len(examples), batch_size):
            batch = pad_examples(examples[start:start + batch_size], self.tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            targets = batch["labels"][:, 1:].to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            logprobs = token_logprobs(logits[:, :-1], ids[:, 1:])
            scores.append((logprobs * (targets != IGNORE)).sum(-1).cpu())
        return torch.cat(scores).view(len(prompts), len(labels)).softmax(-1)
