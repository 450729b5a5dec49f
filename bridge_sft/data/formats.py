"""Chat data formats: one record of any supported format in, a validated ``Conversation`` out.

``to_conversation(record, fmt, columns)`` turns one raw record (a JSON object read from a
source, see ``sources``) into OpenAI-style messages, or raises that record's ``RecordError``
(a short ``reason`` counted when bad records are skipped). Formats, auto-detected from the
first record of each source (``detect_format``) unless named:

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

Where the records come from (paths, files, hub ids; locations; safe JSON) is
``bridge_sft.data.sources`` and ``bridge_sft.data.json_text``; the errors are
``bridge_sft.data.errors``. Their names stay importable from here.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any

from bridge_sft.data.errors import DataError, RecordError
from bridge_sft.data.json_text import (  # noqa: F401  (MAX_DEPTH, check_value ...: re-exported)
    _SURROGATE_ESCAPE,
    MAX_DEPTH,
    _check_unicode,
    _clip,
    _loads,
    check_value,
)
from bridge_sft.data.sources import (  # noqa: F401  (re-exported: the sources' names stay importable from here)
    _UTF8_BOM,
    _WIDE_BOMS,
    DATA_SUFFIXES,
    BadLine,
    Source,
    _check_text_encoding,
    _is_hf_disk_dir,
    _iter_json,
    _iter_jsonl,
    _iter_parquet,
    _kind,
    _load_from_disk,
    _load_hub,
    _looks_like_hub_id,
    _not_utf8,
    iter_source,
    location,
    parse_raw,
    resolve_sources,
    source_fingerprint_parts,
)

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
