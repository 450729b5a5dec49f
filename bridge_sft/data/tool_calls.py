"""Tool calls in chat templates: the form a template takes a call's arguments in, and where
a tool-call turn ends when the usual end-of-turn text does not end it.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
from typing import Any

from bridge_sft.data.formats import RecordError

PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_fn", "description": "probe", "parameters": {
        "type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}]
ARGUMENT_FORMS = ("object", "string")


def tool_call_as(call: Any, form: str) -> Any:
    """A tool call with its ``arguments`` as an object or as a JSON string (``form``)."""
    if not isinstance(call, dict):
        return call
    inner = call.get("function") if isinstance(call.get("function"), dict) else call
    args = inner.get("arguments")
    if form == "object" and isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            return call
        if not isinstance(parsed, dict):
            return call
        new = parsed
    elif form == "string" and isinstance(args, (dict, list)):
        new = json.dumps(args, ensure_ascii=False)
    else:
        return call
    inner = {**inner, "arguments": new}
    return {**call, "function": inner} if inner is not call and "function" in call else inner


def tool_probe(form: str) -> tuple[list[dict], str, str]:
    """A tool-call conversation (arguments as ``form``), its argument text and its tool result text."""
    arg, result = "@@BSFTprobeArg@@", "@@BSFTprobeResult@@"
    args: Any = {"probe_arg": arg}
    if form == "string":
        args = json.dumps(args)
    call = {"id": "call00001", "type": "function", "function": {"name": "probe_fn", "arguments": args}}
    messages = [
        {"role": "user", "content": "@@BSFTprobeU@@"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "name": "probe_fn", "content": result},
        {"role": "assistant", "content": "@@BSFTprobeA@@"},
    ]
    return messages, arg, result


def tool_call_end(renderer, probe, tools: Any, eots: tuple[str, ...]) -> tuple[str, ...]:
    """The end of a tool-call turn where none of ``eots`` ends it (gpt-oss: ``<|call|>``);
    ``()`` where the template renders no tool calls or ``eots`` already end them.

    ``renderer``: a ``rendering.Renderer``; ``probe``: a ``probing.TemplateProbe`` (its tokenizer).
    """
    form = renderer.arguments.get(renderer.template(tools))
    if not form:
        return ()
    messages, arg, result = tool_probe(form)
    try:
        text = renderer.render(messages, tools or PROBE_TOOLS)
    except RecordError:
        return ()
    if arg not in text or result not in text:
        return ()
    between = text[text.index(arg) + len(arg): text.index(result)]
    if any(e in between for e in eots):
        return ()
    ends = probe.special_ends(between)
    if not ends:
        return ()
    first = between[: ends[0]]
    enc = probe.backend.encode(first, add_special_tokens=False)
    start = enc.offsets[-1][0]
    return (first[start:],)
