"""One record's JSON text read safely: every failure is that record's ``RecordError``.

``_loads`` parses the text; ``check_value`` rejects a parsed value nested
deeper than ``MAX_DEPTH`` or holding a string that is not valid Unicode (an unpaired
``\\uD800``-style surrogate escape), and skips the walk when the text cannot hold either
problem (the common case, decided at C speed). Reasons: ``invalid_json``, ``too_deep``,
``invalid_unicode``; no input ends in a traceback.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bridge_sft.data.errors import RecordError

MAX_DEPTH = 100  # JSON nesting deeper than this is rejected (chat records need < 10 levels)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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
