"""Read and validate every data format the pipeline uses, with errors that name the file, the line and the field.

Record kinds (one JSON object per line of a ``.jsonl``/``.jsonl.gz`` file, or per element of a ``.json`` array):

- text:          ``{"text": str}``, or a ``.txt`` file (documents separated by blank lines)
- conversation:  ``{"messages": [{"role": "system|user|assistant", "content": str}, ...]}``
                 or ``{"prompt": str, "completion": str}``
- preference:    ``{"prompt": str | messages, "chosen": str, "rejected": str, "margin"?: float}``;
                 Anthropic HH-RLHF ``{"chosen": transcript, "rejected": transcript}`` with "Human:/Assistant:" turns
                 (the shared prompt is split from the two final replies);
                 MOSS-RLHF JSON ``{"chosen": [turns...], "rejected": [turns...]}``, turns alternating user/assistant
                 (strings, or role/content objects), the last turn being the reply.
- prompt (RL):   ``{"prompt": str}`` or ``{"messages": [...]}`` (a trailing assistant turn is dropped)

Sources: ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``, ``.txt``, a directory written by
``datasets.Dataset.save_to_disk``, or a Hugging Face dataset id (``name`` or ``name:split``) loaded through
``datasets``. Local paths and hub ids go through the same record validation.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moss_rlhf.config import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """A data file is malformed. ``str(err)`` is one line: ``file:line: field: what was expected``."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {field + ': ' if field else ''}{problem}")


@dataclass
class PromptRecord:
    """An RL prompt: the conversation to answer and the record's other fields (``extras``, e.g. the reference answer
    a verifiable reward checks)."""

    messages: list[Message]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preference:
    """One comparison: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt`` (a conversation). A pair
    scored by ``moss-rlhf reward strength`` also carries its preference strength: the mean and spread over an
    ensemble of reward models of ``r(chosen) − r(rejected)``."""

    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float = 0.0
    strength_mean: float | None = None
    strength_std: float | None = None


@dataclass(frozen=True)
class LabelledReply:
    """One unpaired judgement (KTO's data): ``reply`` to ``prompt`` is desirable or undesirable."""

    prompt: list[Message]
    reply: str
    desirable: bool


# --------------------------------------------------------------------------------------------------------------------
# Rows: (source name, line number, object)


def iter_rows(source: str | Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(source, line_or_index, row)`` for every record; line numbers are 1-based."""
    path = Path(source)
    name = str(source)
    if path.is_dir():
        yield from _iter_dataset(name, load_from_disk=True)
        return
    if not path.exists():
        if _looks_like_hub_id(name):
            yield from _iter_dataset(name, load_from_disk=False)
            return
        raise DataError(name, None, None, "file not found")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet(name)
    elif path.suffix.lower() == ".txt":
        yield from _iter_txt(path)
    elif suffixes.endswith(".jsonl") or suffixes.endswith(".jsonl.gz"):
        yield from _iter_jsonl(path)
    elif suffixes.endswith(".json") or suffixes.endswith(".json.gz"):
        yield from _iter_json(path)
    else:
        raise DataError(name, None, None, "unknown file type: expected .jsonl, .jsonl.gz, .json, .json.gz, "
                                          ".parquet, .txt or a directory saved by `datasets`")


def _open_text(path: Path):
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(str(path), None, None, f"not a valid gzip file ({e})") from None
    return raw


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), number, None, f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    raw = _open_text(path)
    seen = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = _decode_line(path, number, line).strip()
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), number, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(str(path), number, None, f"expected a JSON object, got {type(row).__name__}")
        seen += 1
        yield str(path), number, row
    if not seen:
        raise DataError(str(path), None, None, "the file holds no records")


def _iter_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    raw = _open_text(path)
    text = _decode_line(path, 1, raw) if b"\n" not in raw else None
    if text is None:
        for number, line in enumerate(raw.split(b"\n"), start=1):
            _decode_line(path, number, line)
        text = raw.decode("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        # {"data": [...]} is common; a lone object is one record.
        data = data.get("data", [data]) if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON array of objects")
    if not data:
        raise DataError(str(path), None, None, "the file holds no records")
    for index, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} (item {index})", None, None, f"expected a JSON object, got {type(row).__name__}")
        yield f"{path} (item {index})", None, row  # type: ignore[misc]


def _iter_txt(path: Path) -> Iterator[tuple[str, int, Any]]:
    raw = _open_text(path)
    lines = [_decode_line(path, n, line) for n, line in enumerate(raw.split(b"\n"), start=1)]
    doc: list[str] = []
    start = 1
    seen = 0
    for number, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not doc:
                start = number
            doc.append(line)
        elif doc:
            seen += 1
            yield str(path), start, {"text": "\n".join(doc)}
            doc = []
    if not seen:
        raise DataError(str(path), None, None, "the file holds no text")


def _iter_parquet(name: str) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(name)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(name, None, None, f"not a readable parquet file ({e})") from None
    if table.num_rows == 0:
        raise DataError(name, None, None, "the file holds no records")
    for index, row in enumerate(table.to_pylist(), start=1):
        yield name, index, row


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith((".jsonl", ".json", ".gz", ".parquet", ".txt"))


def _iter_dataset(name: str, load_from_disk: bool) -> Iterator[tuple[str, int, Any]]:
    import datasets

    try:
        if load_from_disk:
            ds = datasets.load_from_disk(name)
        else:
            repo, _, split = name.partition(":")
            ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(name, None, None, f"could not load with `datasets` ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(name, None, None, "the dataset holds no records")
    for index, row in enumerate(ds, start=1):
        yield name, index, row


# --------------------------------------------------------------------------------------------------------------------
# Field validation


def _field(row: dict, key: str, where: tuple[str, int | None], kind: type | tuple = str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(where[0], where[1], key, f"missing (record has: {', '.join(sorted(row)) or 'no fields'})")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(where[0], where[1], key, f"expected {expected}, got {type(value).__name__}")
    return value


def _messages(value: Any, where: tuple[str, int | None], key: str = "messages") -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(where[0], where[1], key, "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(where[0], where[1], f"{key}[{i}]", f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(where[0], where[1], f"{key}[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(where[0], where[1], f"{key}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def checked_messages(value: Any) -> list[Message]:
    """A conversation given in code (the Python API), checked as a data file's would be: a non-empty list of
    ``{role: system|user|assistant, content: str}``; a mistake is a :class:`DataError` naming the message."""
    return _messages(value, ("the conversation", None))


def parse_text(row: dict, where: tuple[str, int | None]) -> str:
    return _field(row, "text", where)


def parse_document(row: dict, where: tuple[str, int | None]) -> str | list[Message]:
    """A pretraining document: ``{"text"}``, or a conversation (``{"messages"}``, ``{"prompt", "completion"}``) that
    pretraining renders with the chat template (mid-training on chats, as in nanochat)."""
    if "text" in row:
        return parse_text(row, where)
    if "messages" in row or "prompt" in row or "completion" in row:
        return parse_conversation(row, where)
    raise DataError(where[0], where[1], "text", 'missing: expected {"text"} or a conversation {"messages": [...]}')


def parse_conversation(row: dict, where: tuple[str, int | None]) -> list[Message]:
    if "messages" in row:
        messages = _messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(where[0], where[1], "messages", "needs at least one assistant turn to learn from")
        return messages
    if "prompt" in row or "completion" in row:
        prompt = _field(row, "prompt", where)
        completion = _field(row, "completion", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise DataError(where[0], where[1], "messages", "missing: expected {\"messages\": [...]} or {\"prompt\", \"completion\"}")


def parse_prompt(row: dict, where: tuple[str, int | None]) -> list[Message]:
    if "messages" in row:
        messages = _messages(row["messages"], where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(where[0], where[1], "messages", "holds no user turn to answer")
        return messages
    value = _field(row, "prompt", where, (str, list))
    return _messages(value, where, "prompt") if isinstance(value, list) else [{"role": "user", "content": value}]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def split_hh_transcript(text: str, where: tuple[str, int | None], key: str) -> list[Message]:
    """"\\n\\nHuman: … \\n\\nAssistant: …" → messages. The HH-RLHF format's turns start with a blank line."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(where[0], where[1], key, "expected a transcript of '\\n\\nHuman: …' / '\\n\\nAssistant: …' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _hh_preference(chosen: str, rejected: str, where: tuple[str, int | None], margin: float) -> Preference:
    """The prompt is the two transcripts' common text up to its last "Assistant:" turn marker; each reply is the rest.
    (A few real HH-RLHF pairs differ before the final turn — e.g. a reply that runs on into another "Human:" turn —
    so comparing parsed turns would reject real data; the common prefix is what the pair actually shares.)"""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind("\n\nAssistant:", 0, common + 1)
    if cut < 0:
        cut = chosen.rfind("Assistant:", 0, common + 1)
    if cut < 0 or chosen == rejected and not chosen.strip():
        raise DataError(where[0], where[1], "chosen", "expected a transcript of '\\n\\nHuman: …' / "
                                                      "'\\n\\nAssistant: …' turns ending with an assistant reply")
    marker_end = chosen.index("Assistant:", cut) + len("Assistant:")
    prompt = split_hh_transcript(chosen[:cut], where, "chosen")
    if prompt[-1]["role"] != "user":
        raise DataError(where[0], where[1], "chosen", "the shared transcript must end with a Human turn")
    return Preference(prompt, chosen[marker_end:].strip(), rejected[marker_end:].strip(), margin)


def _turns(value: list, where: tuple[str, int | None], key: str) -> list[Message]:
    if all(isinstance(t, str) for t in value):
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(value)]
    return _messages(value, where, key)


def parse_preference(row: dict, where: tuple[str, int | None]) -> Preference:
    """A preference record of any of the three layouts. A pair must say something: its margin is finite and its two
    replies differ (a pair of one text twice carries no preference, only noise)."""
    pref = _parse_preference(row, where)
    if not math.isfinite(pref.margin):
        raise DataError(where[0], where[1], "margin", f"expected a finite number, got {pref.margin}")
    if "strength_mean" in row or "strength_std" in row:
        mean, std = (_field(row, key, where, (int, float)) for key in ("strength_mean", "strength_std"))
        if not math.isfinite(mean) or not math.isfinite(std) or std < 0:
            raise DataError(where[0], where[1], "strength_std" if math.isfinite(mean) else "strength_mean",
                            f"expected finite numbers (std ≥ 0), got {mean}, {std}")
        pref = dataclasses.replace(pref, strength_mean=float(mean), strength_std=float(std))
    if pref.chosen.strip() == pref.rejected.strip():
        raise DataError(where[0], where[1], "rejected", "is the same reply as chosen: a pair needs two different "
                                                         "replies")
    return pref


def _parse_preference(row: dict, where: tuple[str, int | None]) -> Preference:
    chosen_raw = _field(row, "chosen", where, (str, list))
    rejected_raw = _field(row, "rejected", where, (str, list))
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise DataError(where[0], where[1], "margin", f"expected a number, got {type(margin).__name__}")
    if "prompt" in row:
        if not isinstance(chosen_raw, str) or not isinstance(rejected_raw, str):
            raise DataError(where[0], where[1], "chosen", "with a 'prompt' field, chosen and rejected must be strings")
        prompt = parse_prompt(row, where)
        return Preference(prompt, chosen_raw, rejected_raw, float(margin))
    if isinstance(chosen_raw, str) != isinstance(rejected_raw, str):
        raise DataError(where[0], where[1], "rejected", "chosen and rejected must both be transcripts or both lists")
    if isinstance(chosen_raw, str):  # Anthropic HH-RLHF
        return _hh_preference(chosen_raw, rejected_raw, where, float(margin))
    chosen = _turns(chosen_raw, where, "chosen")  # MOSS-RLHF
    rejected = _turns(rejected_raw, where, "rejected")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant" or len(conv) < 2:
            raise DataError(where[0], where[1], key, "must end with an assistant reply after at least one user turn")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(where[0], where[1], "rejected", "chosen and rejected must share every turn but the last reply")
    return Preference(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], float(margin))


def parse_labelled_replies(row: dict, where: tuple[str, int | None]) -> list[LabelledReply]:
    """A KTO record ``{prompt, completion, label}`` (TRL's unpaired layout: ``label`` true for desirable; the
    completion a string or a one-message assistant list), or any preference record, which gives two: its chosen
    reply desirable and its rejected one undesirable (TRL's conversion of paired data)."""
    if "completion" not in row and "label" not in row:
        pref = parse_preference(row, where)
        return [LabelledReply(pref.prompt, pref.chosen, True), LabelledReply(pref.prompt, pref.rejected, False)]
    label = _field(row, "label", where, bool)
    completion = _field(row, "completion", where, (str, list))
    if isinstance(completion, list):
        turns = _messages(completion, where, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(where[0], where[1], "completion", "expected one assistant message")
        completion = turns[0]["content"]
    if not completion.strip():
        raise DataError(where[0], where[1], "completion", "is empty")
    return [LabelledReply(parse_prompt(row, where), completion, label)]


# --------------------------------------------------------------------------------------------------------------------
# Loaders: whole files of one kind


def _load(source: str | Path, parse) -> list:
    out = []
    for name, line, row in iter_rows(source):
        out.append(parse(row, (name, line)))
    return out


def load_texts(source: str | Path) -> list[str]:
    return _load(source, parse_text)


def load_documents(source: str | Path) -> list[str | list[Message]]:
    return _load(source, parse_document)


def load_conversations(source: str | Path) -> list[list[Message]]:
    return _load(source, parse_conversation)


def load_preferences(source: str | Path) -> list[Preference]:
    return _load(source, parse_preference)


def preference_record(pref: Preference) -> dict:
    """A pair as the canonical ``{prompt, chosen, rejected, margin}`` record that :func:`load_preferences` reads."""
    return {"prompt": pref.prompt, "chosen": pref.chosen, "rejected": pref.rejected, "margin": pref.margin}


def load_labelled_records(source: str | Path) -> list[list[LabelledReply]]:
    """KTO data, one list per record (a preference record gives two replies): split held-out data by record, so the
    two halves of a pair land on the same side."""
    return _load(source, parse_labelled_replies)


def load_prompts(source: str | Path) -> list[list[Message]]:
    return _load(source, parse_prompt)


def parse_prompt_record(row: dict, where: tuple[str, int | None]) -> PromptRecord:
    return PromptRecord(parse_prompt(row, where), {k: v for k, v in row.items() if k not in ("prompt", "messages")})


def load_prompt_records(source: str | Path) -> list[PromptRecord]:
    """Prompts with their records' extra fields (what RL's reward functions receive)."""
    return _load(source, parse_prompt_record)


@dataclass
class SampleGroup:
    """Unlabelled replies sampled for one prompt: MetaRM's meta set, the shifted policy's replies."""

    prompt: list[Message]
    responses: list[str]


def load_sample_groups(source: str | Path) -> list[SampleGroup]:
    """``{prompt | messages, response}`` rows (what ``moss-rlhf generate --num-samples K --out FILE`` writes),
    grouped by prompt in first-seen order; every prompt needs at least two replies."""
    groups: dict[str, SampleGroup] = {}
    first_line: dict[str, int | None] = {}
    for name, line, row in iter_rows(source):
        prompt = parse_prompt(row, (name, line)) if isinstance(row, dict) else None
        if prompt is None:
            raise DataError(name, line, None, "expected a JSON object {prompt, response}")
        if not isinstance(row.get("response"), str):
            raise DataError(name, line, "response", f"expected the sampled reply as a string, got "
                                                    f"{type(row.get('response')).__name__}")
        key = json.dumps(prompt, ensure_ascii=False)
        groups.setdefault(key, SampleGroup(prompt, [])).responses.append(row["response"])
        first_line.setdefault(key, line)
    if not groups:
        raise DataError(str(source), None, None, "no rows: expected {prompt, response} rows, several per prompt")
    single = [key for key, group in groups.items() if len(group.responses) < 2]
    if single:
        raise DataError(str(source), first_line[single[0]], "response",
                        f"{len(single)} of {len(groups)} prompts have a single reply; replies are compared within a "
                        f"prompt: sample at least 2 per prompt (`moss-rlhf generate --num-samples K`)")
    return list(groups.values())


def load_records(source: str | Path) -> list[dict]:
    """Raw rows (for extra fields such as a demo task name), still with file/line errors for bad JSON."""
    return [row for _, _, row in iter_rows(source)]
