"""Format parsers (property-based) and data sources."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_sft.data.formats import (
    ROLES,
    DataError,
    RecordError,
    detect_format,
    iter_source,
    parse_raw,
    resolve_sources,
    to_conversation,
)

TEXT = st.text(min_size=0, max_size=40)
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
SHAREGPT_NAME = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


@st.composite
def conversations(draw):
    """Valid OpenAI messages with at least one assistant turn."""
    messages = draw(st.lists(st.fixed_dictionaries({"role": ROLE, "content": TEXT}), min_size=1, max_size=8))
    if not any(m["role"] == "assistant" for m in messages):
        messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages


def _roles_contents(conv):
    return [(m["role"], m["content"]) for m in conv.messages]


@given(conversations())
def test_openai_and_sharegpt_parse_to_the_same_messages(messages):
    openai = to_conversation({"messages": messages}, "messages")
    sharegpt = to_conversation(
        {"conversations": [{"from": SHAREGPT_NAME[m["role"]], "value": m["content"]} for m in messages]}, "sharegpt"
    )
    want = [(m["role"], m["content"]) for m in messages]
    assert _roles_contents(openai) == want
    assert _roles_contents(sharegpt) == want
    assert openai.trainable == [m["role"] == "assistant" for m in messages]
    # auto-detection picks the same parser
    assert _roles_contents(to_conversation({"messages": messages}, "auto")) == want
    assert _roles_contents(to_conversation({"conversations": [
        {"from": SHAREGPT_NAME[m["role"]], "value": m["content"]} for m in messages]}, "auto")) == want


@given(conversations(), st.text(alphabet="abcdefghij_", min_size=1, max_size=10), st.dictionaries(
    st.text(alphabet="klmnopq", min_size=1, max_size=5), st.integers(), max_size=3))
def test_column_mapping_is_a_rename(messages, column, extra):
    record = {column: messages, **extra}
    got = to_conversation(record, "auto", {"messages": column})
    assert _roles_contents(got) == [(m["role"], m["content"]) for m in messages]


@given(conversations())
def test_text_parts_join_to_the_string_content(messages):
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:3]},
                                               {"type": "text", "text": m["content"][3:]}]} for m in messages]
    assert _roles_contents(to_conversation({"messages": parts}, "messages")) == \
        _roles_contents(to_conversation({"messages": messages}, "messages"))


@given(TEXT, TEXT, TEXT, st.one_of(st.none(), TEXT))
def test_alpaca(instruction, extra, output, system):
    record = {"instruction": instruction, "input": extra, "output": output}
    if system is not None:
        record["system"] = system
    got = to_conversation(record, "auto")
    want = ([("system", system)] if system else []) + [
        ("user", instruction + ("\n\n" + extra if extra else "")), ("assistant", output)]
    assert _roles_contents(got) == want


@given(TEXT, TEXT, conversations(), conversations())
def test_prompt_completion_trains_only_the_completion(prompt, completion, before, after):
    got = to_conversation({"prompt": prompt, "completion": completion}, "auto")
    assert _roles_contents(got) == [("user", prompt), ("assistant", completion)]
    assert got.trainable == [False, True]
    got = to_conversation({"prompt": before, "completion": after}, "prompt_completion")
    assert len(got.messages) == len(before) + len(after)
    assert got.trainable == [False] * len(before) + [m["role"] == "assistant" for m in after]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "conversations", "from", "value", "instruction", "output",
                         "prompt", "completion", "input", "tools", "tool_calls", "weight", "system", "x"]),
        children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON, st.sampled_from(["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]))
def test_any_json_is_parsed_or_rejected_with_a_record_error(record, fmt):
    try:
        conv = to_conversation(record, fmt)
    except RecordError as exc:
        assert exc.reason and exc.detail
        return
    assert conv.messages and len(conv.trainable) == len(conv.messages)
    assert any(conv.trainable)
    for m in conv.messages:
        assert m["role"] in ROLES and isinstance(m["content"], str)


@given(conversations(), st.text(min_size=1, max_size=8).filter(lambda r: r not in ROLES))
def test_unknown_roles_are_rejected(messages, role):
    bad = messages + [{"role": role, "content": "x"}]
    with pytest.raises(RecordError) as info:
        to_conversation({"messages": bad}, "messages")
    assert info.value.reason == "unknown_role"


def test_detect_format():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) is None
    assert detect_format([1]) is None


# --------------------------------------------------------------------------- sources

RECORDS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "é ✓ 中文"}, {"role": "assistant", "content": "ok"}]},
]


def _read_all(path):
    out = []
    for source in resolve_sources(str(path)):
        for index, raw in iter_source(source):
            out.append(_roles_contents(to_conversation(parse_raw(raw, source, index), "auto")))
    return out


def test_jsonl_json_parquet_and_saved_datasets_read_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [_roles_contents(to_conversation(r, "auto")) for r in RECORDS]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in RECORDS), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"data": RECORDS}), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "e.parquet")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "b.json", "c.json", "d.json", "e.parquet", "saved"):
        assert _read_all(tmp_path / name) == want, name
    # a directory of data files reads them all, sorted by name
    files = tmp_path / "files"
    files.mkdir()
    (files / "1.jsonl").write_text(json.dumps(RECORDS[0]), encoding="utf-8")
    (files / "2.parquet").write_bytes((tmp_path / "e.parquet").read_bytes())
    assert _read_all(files) == want[:1] + want


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    (source,) = resolve_sources(str(path))
    assert [i for i, _ in iter_source(source)] == [2, 4]


def test_missing_paths_and_unreachable_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        resolve_sources(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b")
        resolve_sources(str(tmp_path / "x.csv"))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (source,) = resolve_sources("someorg/somedata:validation")
    assert (source.kind, source.path, source.split) == ("hf_hub", "someorg/somedata", "validation")
    with pytest.raises(DataError, match="hub dataset.*offline"):
        list(iter_source(source))
