"""Chat data formats and sources: records in, validated OpenAI-style messages out.

Sources (``open_sources``): local ``.jsonl``, ``.json`` (a list of records, or
JSON lines), ``.parquet`` files, directories written by ``datasets``'
``save_to_disk`` (``load_from_disk``), directories of such files, and Hugging
Face hub dataset ids (``org/name`` or ``org/name:split``) when the machine is
online. Every record keeps its location (``file:line`` for JSON lines,
``file:record N`` otherwise) so errors can name it.

Reading never ends in a traceback: text files are UTF-8, with or without a
byte-order mark; a file in UTF-16/32 is a ``DataError`` saying how to convert
it; a JSON line that is not UTF-8 (Latin-1, cp1252 ...), not JSON, nested
deeper than ``MAX_DEPTH``, or holding an unpaired ``\\uD800``-style surrogate
escape (not a Unicode character) is a ``RecordError`` of that record (skipped
and counted with ``on_bad_record="skip"``); unreadable files are ``DataError``.

Formats (``to_conversation``), auto-detected from the first record of each
source unless named:

- ``messages`` (OpenAI): ``{"messages": [{"role", "content", ...}], "tools": [...]}``;
  ``tool_calls``, ``tool_call_id``, ``name`` and ``reasoning_content`` are kept;
  an assistant message with ``"weight": 0`` (OpenAI fine-tuning format) is not trained.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|..., "value": ...}], "system": ...}``.
- ``alpaca``: ``{"instruction", "input" (optional), "output", "system" (optional)}``.
- ``prompt_completion``: ``{"prompt", "completion"}``, both strings (one user and
  one assistant turn) or both message lists (only the completion's assistant
  turns are trained).

``columns`` renames source columns to these names, e.g. ``{"messages": "dialog"}``
or ``{"instruction": "question", "output": "answer"}``.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
# ShareGPT speaker names -> OpenAI roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
# Message keys passed to the chat template besides role and content.
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")
# Expected types of the optional message keys (a wrong type is a record error, not a template crash).
MESSAGE_KEY_TYPES = {"tool_calls": list, "tool_call_id": str, "name": str, "reasoning_content": str, "thinking": str}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_DEPTH = 100  # JSON nesting deeper than this is rejected (chat records need < 10 levels)
_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
              b"\xfe\xff": "UTF-16"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class DataError(ValueError):
    """Bad input data or settings; the message names the file/record and the fix."""


class RecordError(DataError):
    """One bad record. ``reason`` is a short category used to count skipped records."""

    def __init__(self, reason: str, message: str, location: str | None = None):
        self.reason = reason
        self.detail = message
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)

    def at(self, location: str) -> "RecordError":
        return RecordError(self.reason, self.detail, location)


@dataclass
class Conversation:
    """A validated conversation, ready for a chat template.

    ``messages``: dicts with ``role`` and ``content`` (a string; ``""`` for an
    assistant turn that only has ``tool_calls``) and the ``MESSAGE_KEYS`` present.
    ``trainable``: one bool per message; False for assistant turns that must not
    be trained (``weight: 0``, the prompt side of prompt/completion records).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    trainable: list[bool] = field(default_factory=list)


# --------------------------------------------------------------------------- records -> conversations


def detect_format(record: Any) -> str | None:
    """The format of one (column-mapped) record, or None if it matches none."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def apply_columns(record: dict, columns: dict[str, str] | None) -> dict:
    """Rename source columns (``{canonical: source}``) to the canonical names."""
    if not columns:
        return record
    record = dict(record)
    for canonical, source in columns.items():
        if source in record:
            record[canonical] = record.pop(source)
    return record


def to_conversation(
    record: Any,
    fmt: str,
    columns: dict[str, str] | None = None,
    *,
    require_assistant: bool = True,
    system_prompt: str | None = None,
) -> Conversation:
    """Turn one raw record into a validated ``Conversation``; raise ``RecordError`` if it is bad.

    ``system_prompt``: a system message put first in conversations that have none of their own
    (a record's own system message wins)."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"the record is a {type(record).__name__}, not a JSON object")
    record = apply_columns(record, columns)
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise RecordError("unknown_format", _unknown_format_message(record))
    if fmt == "messages":
        conv = _from_messages(record)
    elif fmt == "sharegpt":
        conv = _from_sharegpt(record)
    elif fmt == "alpaca":
        conv = _from_alpaca(record)
    elif fmt == "prompt_completion":
        conv = _from_prompt_completion(record)
    else:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if system_prompt and not (conv.messages and conv.messages[0]["role"] in ("system", "developer")):
        conv.messages.insert(0, {"role": "system", "content": system_prompt})
        conv.trainable.insert(0, False)
    if require_assistant and not any(
        m["role"] == "assistant" and t for m, t in zip(conv.messages, conv.trainable)
    ):
        if any(m["role"] == "assistant" for m in conv.messages):
            raise RecordError("no_trainable_turn", "every assistant turn has weight 0: nothing to train on")
        raise RecordError(
            "no_assistant_turn",
            "the conversation has no assistant turn, so there is nothing to train on "
            "(add an assistant reply, or train on every token with train_on='all')",
        )
    return conv


def _unknown_format_message(record: dict) -> str:
    keys = ", ".join(_clip(key, 40) for key in sorted(map(str, record))[:12]) or "none"
    return (
        f"cannot tell the data format from the record's keys ({keys}); expected 'messages' (OpenAI), "
        "'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'prompt'+'completion'. "
        "Name the format (format=...) and map your columns (columns={'messages': 'your_column'})"
    )


def _tools(record: dict) -> list[dict] | None:
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = _loads(tools)
        except RecordError as exc:
            raise RecordError("bad_tools", f"'tools' is a string but not valid JSON: {exc.detail}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("bad_tools", "'tools' must be a list of JSON objects (function schemas)")
    return tools


def _text(value: Any, where: str) -> str:
    """Message content as a string: strings pass, lists of text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RecordError(
                    "non_string_content",
                    f"{where} has a content part of type {_short(part.get('type'))}; only text parts "
                    "({'type': 'text', 'text': ...}) are supported",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(
        "non_string_content",
        f"{where} has content of type {type(value).__name__} ({_short(value)}); content must be a string",
    )


def _short(value: Any, n: int = 40) -> str:
    """A short ``repr`` of any value (bounded in length and depth: never recurses far)."""
    return _clip(_REPR.repr(value), n)


_REPR = reprlib.Repr(maxlevel=3, maxstring=60, maxother=60)


def normalize_messages(messages: Any, *, trainable: list[bool] | None = None) -> tuple[list[dict], list[bool]]:
    """Validate OpenAI-style messages; return clean copies and the per-message trainable flags."""
    if not isinstance(messages, list):
        raise RecordError("bad_messages", f"'messages' must be a list of messages, not {type(messages).__name__}")
    if not messages:
        raise RecordError("empty_conversation", "the conversation has no messages")
    out, flags = [], []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise RecordError("bad_message", f"{where} is a {type(message).__name__}, not a JSON object")
        role = message.get("role")
        if role not in ROLES:
            if role is None:
                raise RecordError("missing_role", f"{where} has no 'role'; expected one of {', '.join(ROLES)}")
            raise RecordError(
                "unknown_role", f"{where} has the unknown role {_short(role)}; expected one of {', '.join(ROLES)}"
            )
        clean: dict[str, Any] = {"role": role}
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                content = ""
            elif "content" not in message:
                raise RecordError("missing_content", f"{where} ({role}) has no 'content'")
            else:
                raise RecordError("missing_content", f"{where} ({role}) has content null")
        clean["content"] = _text(content, f"{where} ({role})")
        for key in MESSAGE_KEYS:
            value = message.get(key)
            if value is not None and value != "" and value != []:
                expected = MESSAGE_KEY_TYPES[key]
                if not isinstance(value, expected) or (key == "tool_calls" and not all(
                        isinstance(call, dict) for call in value)):
                    want = "a list of objects" if key == "tool_calls" else "a string"
                    raise RecordError("bad_field", f"{where} ({role}) has {key!r} of type {type(value).__name__} "
                                                   f"({_short(value)}); it must be {want}")
                clean[key] = value
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            raise RecordError("bad_weight", f"{where} has weight {_short(weight)}; weight must be 0 or 1")
        flag = bool(weight) and role == "assistant"
        if trainable is not None:
            flag = flag and trainable[i]
        out.append(clean)
        flags.append(flag)
    return out, flags


def _from_messages(record: dict) -> Conversation:
    if "messages" not in record:
        raise RecordError("unknown_format", "the record has no 'messages' (the format of this file is 'messages')")
    messages, flags = normalize_messages(record["messages"])
    return Conversation(messages, _tools(record), flags)


def _from_sharegpt(record: dict) -> Conversation:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise RecordError("bad_messages", "'conversations' must be a list of {'from': ..., 'value': ...} turns")
    messages = []
    system = record.get("system")
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("bad_message", f"turn {i} is a {type(turn).__name__}, not a JSON object")
        speaker = turn.get("from", turn.get("role"))
        if speaker is None:
            raise RecordError("missing_role", f"turn {i} has no 'from'")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RecordError(
                "unknown_role",
                f"turn {i} is from the unknown speaker {_short(speaker)}; expected one of {', '.join(SHAREGPT_ROLES)}",
            )
        message = {"role": role}
        if "value" in turn:
            message["content"] = turn["value"]
        elif "content" in turn:
            message["content"] = turn["content"]
        messages.append(message)
    normalized, flags = normalize_messages(messages)
    return Conversation(normalized, _tools(record), flags)


def _from_alpaca(record: dict) -> Conversation:
    for key in ("instruction", "output"):
        if key not in record:
            raise RecordError("missing_content", f"the Alpaca record has no {key!r}")
        if not isinstance(record[key], str):
            raise RecordError("non_string_content", f"{key!r} must be a string, not {type(record[key]).__name__}")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("non_string_content", f"'input' must be a string, not {type(extra).__name__}")
    prompt = record["instruction"] + ("\n\n" + extra if extra else "")
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    normalized, flags = normalize_messages(messages)
    return Conversation(normalized, None, flags)


def _from_prompt_completion(record: dict) -> Conversation:
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is None or completion is None:
        raise RecordError("missing_content", "the record needs both 'prompt' and 'completion'")
    if isinstance(prompt, str) and isinstance(completion, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        normalized, flags = normalize_messages(messages)
        return Conversation(normalized, _tools(record), flags)
    if isinstance(prompt, list) and isinstance(completion, list):
        trainable = [False] * len(prompt) + [True] * len(completion)
        normalized, flags = normalize_messages(prompt + completion, trainable=trainable)
        return Conversation(normalized, _tools(record), flags)
    raise RecordError(
        "non_string_content",
        f"'prompt' and 'completion' must both be strings or both be message lists, not "
        f"{type(prompt).__name__} and {type(completion).__name__}",
    )


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One data source. ``kind``: ``jsonl``, ``json``, ``parquet``, ``hf_disk`` or ``hf_hub``."""

    path: str
    kind: str
    split: str | None = None

    @property
    def name(self) -> str:
        return self.path if self.split is None else f"{self.path}:{self.split}"


def resolve_sources(paths: str | list[str]) -> list[Source]:
    """Expand user-given paths into sources; raise ``DataError`` for paths that cannot be read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    sources: list[Source] = []
    for raw in paths:
        path = os.path.expanduser(str(raw))
        if os.path.isdir(path):
            if _is_hf_disk_dir(path):
                sources.append(Source(path, "hf_disk"))
                continue
            files = sorted(
                str(p) for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
            )
            if not files:
                raise DataError(
                    f"{path}: the directory has no .jsonl/.json/.parquet files and is not a dataset saved with "
                    "datasets' save_to_disk()"
                )
            sources += [Source(f, _kind(f)) for f in files]
        elif os.path.isfile(path):
            sources.append(Source(path, _kind(path)))
        else:
            repo, _, split = path.partition(":")
            if _looks_like_hub_id(repo):
                sources.append(Source(repo, "hf_hub", split or "train"))
            else:
                raise DataError(f"{path}: no such file or directory")
    return sources


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .parquet")


def _is_hf_disk_dir(path: str) -> bool:
    p = Path(path)
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


@dataclass(frozen=True)
class BadLine:
    """A raw record that could not even be read as text (``iter_source`` yields it in place of the
    text; ``parse_raw`` raises it as that record's ``RecordError``)."""

    reason: str
    message: str


def iter_source(source: Source) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, raw)`` for each record: raw JSON text lines for ``.jsonl``
    (index = 1-based line number; blank lines are skipped; a line that is not UTF-8
    is a ``BadLine``), dicts otherwise (0-based). Unreadable files raise ``DataError``."""
    try:
        if source.kind == "jsonl":
            yield from _iter_jsonl(source.path)
        elif source.kind == "json":
            yield from _iter_json(source.path)
        elif source.kind == "parquet":
            yield from _iter_parquet(source.path)
        elif source.kind == "hf_disk":
            yield from enumerate(_load_from_disk(source.path))
        elif source.kind == "hf_hub":
            yield from enumerate(_load_hub(source))
        else:  # pragma: no cover - resolve_sources only makes the kinds above
            raise DataError(f"{source.path}: unknown source kind {source.kind}")
    except OSError as exc:
        raise DataError(f"{source.path}: cannot read the file ({exc.strerror or exc})") from None


def _check_text_encoding(path: str, head: bytes) -> None:
    """Reject UTF-16/32 files (by byte-order mark, or by the NUL bytes of ASCII text in them)."""
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {name} (it starts with a {name} byte-order mark); bridge-sft "
                            f"reads UTF-8 (with or without a byte-order mark). Convert it, e.g. "
                            f"iconv -f {name} -t UTF-8 {path} > converted{Path(path).suffix}")
    if head.count(b"\x00") > len(head) // 4:
        raise DataError(f"{path}: the file looks like UTF-16 or UTF-32 text without a byte-order mark (a quarter "
                        f"of its first bytes are NUL); bridge-sft reads UTF-8. Convert it, e.g. "
                        f"iconv -f UTF-16LE -t UTF-8 {path} > converted{Path(path).suffix}")


def _not_utf8(path: str, data: bytes, exc: UnicodeDecodeError) -> str:
    column = len(data[: exc.start].decode("utf-8", errors="replace")) + 1
    return (f"the text is not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); the file is probably "
            "in another encoding (Latin-1, Windows-1252 ...): convert it to UTF-8, e.g. iconv -f WINDOWS-1252 "
            f"-t UTF-8 {path} > converted{Path(path).suffix}")


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096)
        _check_text_encoding(path, head)
        f.seek(len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0)
        for lineno, data in enumerate(f, 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, BadLine("not_utf8", _not_utf8(path, data, exc))
                continue
            if line.strip():
                yield lineno, line


def location(source: Source, index: int) -> str:
    """Human-readable place of a record, for error messages."""
    if source.kind == "jsonl":
        return f"{source.name}:{index}"
    return f"{source.name}: record {index}"


def parse_raw(raw: Any, source: Source, index: int) -> Any:
    """A raw JSON-lines text becomes an object (``RecordError`` if it is not JSON, nested deeper
    than ``MAX_DEPTH`` or holds unpaired surrogate escapes); a ``BadLine`` raises its error."""
    if isinstance(raw, BadLine):
        raise RecordError(raw.reason, raw.message, location(source, index))
    if not isinstance(raw, str):
        return raw
    try:
        value = _loads(raw)
    except RecordError as exc:
        raise exc.at(location(source, index)) from None
    return value


def _loads(text: str) -> Any:
    """``json.loads`` of one record's text, with every failure as a ``RecordError``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            "invalid_json",
            f"invalid JSON ({exc.msg} at column {exc.colno}); each line of a .jsonl file must be one JSON object",
        ) from None
    except RecursionError:
        raise RecordError("too_deep", f"the JSON is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RecordError("invalid_json", f"the JSON cannot be read: {_clip(str(exc))}") from None
    check_value(value, text)
    return value


def check_value(value: Any, text: str | None = None) -> None:
    """Raise ``RecordError`` if ``value`` (a parsed record) nests deeper than ``MAX_DEPTH`` or holds a
    string that is not valid Unicode (an unpaired surrogate). ``text``: the JSON it was parsed from;
    the walk is skipped when the text cannot hold either problem (the common case, at C speed)."""
    if text is not None and not _SURROGATE_ESCAPE.search(text) and text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RecordError("too_deep", f"the record is nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, str):
            _check_unicode(node)
        elif isinstance(node, dict):
            for key, child in node.items():
                if isinstance(key, str):
                    _check_unicode(key)
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            "invalid_unicode",
            f"a string holds U+{ord(text[exc.start]):04X}, an unpaired surrogate (a \\u{ord(text[exc.start]):04x} "
            "escape without its partner): not a Unicode character. Fix or remove it (a character outside the "
            "basic plane is written as a pair, e.g. \\ud83d\\ude00)",
        ) from None


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _iter_json(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        raw = f.read()
    _check_text_encoding(path, raw[:4096])
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        lineno = raw.count(b"\n", 0, exc.start) + 1
        line = raw[line_start: raw.find(b"\n", exc.start) if b"\n" in raw[exc.start:] else len(raw)]
        shifted = UnicodeDecodeError(exc.encoding, line, exc.start - line_start, exc.end - line_start, exc.reason)
        raise DataError(f"{path}:{lineno}: {_not_utf8(path, line, shifted)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file holding JSON lines is common: read it as such if every line parses.
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                data = [_loads(line) for line in lines]
            except RecordError:
                data = None
            if data is not None:
                yield from enumerate(data)
                return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested deeper than Python can read; records need < {MAX_DEPTH} "
                        "levels") from None
    except ValueError as exc:
        raise DataError(f"{path}: the JSON cannot be read: {_clip(str(exc))}") from None
    if isinstance(data, dict):
        for key in ("data", "train", "records", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
    check_text = _SURROGATE_ESCAPE.search(text) is not None or text.count("[") + text.count("{") > MAX_DEPTH
    for index, record in enumerate(data):
        if check_text:
            try:
                check_value(record)
            except RecordError as exc:
                yield index, BadLine(exc.reason, exc.detail)
                continue
        yield index, record


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read the Parquet file ({_clip(str(exc))})") from None
    index = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except Exception as exc:  # a corrupt row group, an unsupported type ...
        raise DataError(f"{path}: cannot read the Parquet file after record {index} "
                        f"({type(exc).__name__}: {_clip(str(exc))})") from None


def _load_from_disk(path: str):
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:  # missing/corrupt arrow files, incompatible versions ...
        raise DataError(f"{path}: cannot load the saved dataset ({type(exc).__name__}: {_clip(str(exc))})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(
                f"{path}: the saved DatasetDict has no 'train' split (splits: {', '.join(data)}); "
                "point at the split's own directory"
            )
        data = data["train"]
    return data


def _load_hub(source: Source):
    import datasets

    try:
        return datasets.load_dataset(source.path, split=source.split)
    except Exception as exc:  # offline, missing dataset, missing split ...
        raise DataError(
            f"{source.path}: not a local file or directory, and loading it as a Hugging Face hub dataset "
            f"(split {source.split!r}) failed: {type(exc).__name__}: {exc}"
        ) from None


def source_fingerprint_parts(source: Source) -> list[str]:
    """Files whose contents identify a source (for the cache key); hub sources use their id."""
    if source.kind == "hf_hub":
        return []
    if source.kind == "hf_disk":
        return sorted(str(p) for p in Path(source.path).rglob("*") if p.is_file())
    return [source.path]
