"""Every data format parses; every malformed input gives one clear error naming the file and the line."""

from __future__ import annotations

import gzip
import json

import pytest

from moss_rlhf.data.formats import (DataError, LabelledReply, load_conversations, load_labelled_records,
                                    load_documents, load_preferences, load_prompts, load_texts, split_hh_transcript)
from tests.conftest import HH_FILE, write_jsonl


def test_text_jsonl_gz_txt_json_and_parquet(tmp_path):
    rows = [{"text": "one"}, {"text": "二"}]
    assert load_texts(write_jsonl(tmp_path / "a.jsonl", rows)) == ["one", "二"]
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    assert load_texts(gz) == ["one", "二"]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    assert load_texts(tmp_path / "a.json") == ["one", "二"]
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n", encoding="utf-8")
    assert load_texts(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_texts(tmp_path / "a.parquet") == ["one", "二"]


def test_datasets_directory_goes_through_the_same_validation(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "hi", "completion": "hello"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_conversations(tmp_path / "ds") == [[{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]]
    datasets.Dataset.from_list([{"prompt": 3, "completion": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad:1: prompt: expected str"):
        load_conversations(tmp_path / "bad")


def test_conversation_formats(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"prompt": "2+2?", "completion": "4"},
    ])
    convs = load_conversations(path)
    assert convs[0][0] == {"role": "system", "content": "be kind"}
    assert convs[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_prompt_formats_drop_a_trailing_answer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hello"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    assert load_prompts(path) == [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "q"}]]


def test_preference_formats(tmp_path):
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1}])
    (pref,) = load_preferences(plain)
    assert (pref.prompt, pref.chosen, pref.rejected, pref.margin) == ([{"role": "user", "content": "q"}], "good",
                                                                      "bad", 1.0)
    hh = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: sure, gladly",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: no"}])
    (pref,) = load_preferences(hh)
    assert [m["role"] for m in pref.prompt] == ["user", "assistant", "user"]
    assert pref.prompt[-1]["content"] == "help me"
    assert (pref.chosen, pref.rejected) == ("sure, gladly", "no")
    moss = tmp_path / "moss.json"
    moss.write_text(json.dumps([{"chosen": ["hi", "hello", "tell a joke", "a funny one"],
                                 "rejected": ["hi", "hello", "tell a joke", "no."]}]), encoding="utf-8")
    (pref,) = load_preferences(moss)
    assert pref.prompt[-1] == {"role": "user", "content": "tell a joke"} and pref.chosen == "a funny one"


@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data/hh-rlhf is not present (it is in CI)")
def test_labelled_reply_formats(tmp_path):
    """KTO's records: TRL's unpaired layout (plain or conversational), and a preference record as two replies."""
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "q1", "completion": "good", "label": True},
        {"prompt": [{"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "bad"}],
         "label": False},
        {"prompt": "q3", "chosen": "c", "rejected": "r"}])
    records = load_labelled_records(path)
    user = [{"role": "user", "content": "q1"}]
    assert records[0] == [LabelledReply(user, "good", True)]
    assert records[1] == [LabelledReply([{"role": "user", "content": "q2"}], "bad", False)]
    q3 = [{"role": "user", "content": "q3"}]
    assert records[2] == [LabelledReply(q3, "c", True), LabelledReply(q3, "r", False)]


def test_the_real_hh_rlhf_file_parses():
    prefs = load_preferences(HH_FILE)
    assert len(prefs) == 2312
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in prefs)
    assert sum(p.chosen != p.rejected for p in prefs) > 2200
    assert split_hh_transcript("\n\nHuman: a\n\nAssistant: b", ("x", 1), "chosen")[1]["content"] == "b"


@pytest.mark.parametrize("content, loader, expected", [
    (b'{"text": "ok"}\n{"text": oops}\n', load_texts, r"bad\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n{"txt": "x"}\n', load_texts, r"bad\.jsonl:2: text: missing"),
    (b'{"text": 5}\n', load_texts, r"bad\.jsonl:1: text: expected str, got int"),
    (b"", load_texts, r"bad\.jsonl: the file holds no records"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', load_texts, r"bad\.jsonl:2: not UTF-8"),
    (b'[1, 2]\n', load_texts, r"bad\.jsonl:1: expected a JSON object"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}\n', load_conversations,
     r"bad\.jsonl:1: messages\[0\]\.role: expected one of system, user, assistant"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n', load_conversations,
     r"bad\.jsonl:1: messages: needs at least one assistant turn"),
    (b'{"prompt": "q", "chosen": "a"}\n', load_preferences, r"bad\.jsonl:1: rejected: missing"),
    (b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}\n', load_preferences,
     r"bad\.jsonl:1: margin: expected a number"),
    (b'{"chosen": "no turns here", "rejected": "x"}\n', load_preferences, r"bad\.jsonl:1: chosen: expected a transcript"),
    (b'{"task": "x"}\n', load_prompts, r"bad\.jsonl:1: prompt: missing"),
    (b'{"text": "ok"}\n{"body": "x"}\n', load_documents, r"bad\.jsonl:2: text: missing: expected \{\"text\"\} or a conv"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n', load_documents,
     r"bad\.jsonl:1: messages: needs at least one assistant turn"),
    (b'{"prompt": "q", "completion": "a", "label": "yes"}\n', load_labelled_records,
     r"bad\.jsonl:1: label: expected bool, got str"),
    (b'{"prompt": "q", "completion": "a"}\n', load_labelled_records, r"bad\.jsonl:1: label: missing"),
    (b'{"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": true}\n', load_labelled_records,
     r"bad\.jsonl:1: completion: expected one assistant message"),
    (b'{"prompt": "q", "completion": " ", "label": false}\n', load_labelled_records,
     r"bad\.jsonl:1: completion: is empty"),
])
def test_malformed_inputs_name_file_line_and_field(tmp_path, content, loader, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as info:
        loader(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_texts(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_texts(tmp_path / "x.csv")


def test_cli_reports_a_bad_file_in_one_line_without_traceback(tmp_path, capsys):
    from moss_rlhf.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": \n')
    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2" in err and "Traceback" not in err
