"""Rendering conversations with a chat template, as ``apply_chat_template(..., tokenize=False)``
does, and with HF's ``{% generation %}`` spans for templates that mark them.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bridge_sft.data.formats import Conversation, DataError, RecordError
from bridge_sft.data.tool_calls import ARGUMENT_FORMS, PROBE_TOOLS, tool_call_as, tool_probe

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
REASONING_FIELDS = ("reasoning_content", "thinking")


def load_chat_template(value: str | None) -> str | None:
    """A chat template given as a path to a Jinja file, or as the template text itself."""
    if value is None:
        return None
    if "{" not in value and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text(encoding="utf-8")
    if "{" not in value:
        raise DataError(f"chat_template {value!r}: no such file, and not a Jinja template either")
    return value


def load_tools(value: Any) -> list[dict[str, Any]] | None:
    """Tool schemas given as a list of JSON objects, or as the path of a JSON file holding one."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"tools {value!r}: no such file (give a JSON file with a list of tool schemas)")
        try:
            value = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"tools {value!r}: not a JSON file ({exc})") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise DataError("tools must be a list of JSON objects (function schemas), or a JSON file with one")
    return [dict(t) for t in value]


def variants(text: str):
    """How templates commonly insert a text: verbatim, stripped, or JSON-escaped."""
    seen = {text}
    yield text
    for v in (text.strip(), text.strip("\n"), text.lstrip(), text.rstrip(), text.lstrip("\n"), text.rstrip("\n"),
              json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]):
        if v not in seen:
            seen.add(v)
            yield v


class Renderer:
    """One tokenizer's chat templates, rendered with HF's Jinja machinery.

    ``templates``: name -> template text (``"default"``, and ``"tool_use"`` where the
    tokenizer has one for conversations with tools); the dict may be changed in place
    (a template replaced by its training variant). ``template_kwargs``: extra template
    variables. ``name``: the tokenizer's name, for messages.
    """

    def __init__(self, templates: dict[str, str], template_kwargs: dict[str, Any], name: str):
        self.templates = templates
        self.template_kwargs = template_kwargs
        self.name = name
        self.arguments: dict[str, str] = {}  # template -> tool-call argument form it renders ("" if none)

    def template(self, tools: Any) -> str:
        """The template text used for a conversation with these ``tools``."""
        if tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise DataError(f"tokenizer {self.name}: no 'default' chat template among {', '.join(self.templates)}")

    def has_generation_marks(self, tools: Any = None) -> bool:
        return GENERATION_RE.search(self.template(tools)) is not None

    def render(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        """The template's text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, _ = render_jinja_template(
                conversations=[self.for_template(messages, tools)],
                tools=tools,
                chat_template=self.template(tools),
                add_generation_prompt=add_generation_prompt,
                **self.template_kwargs,
            )
        except Exception as exc:  # jinja2.TemplateError, raise_exception(), TypeError in filters ...
            raise RecordError("template_error", f"the chat template failed on this conversation: {exc}") from None
        return texts[0]

    def render_marked(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Text and the ``{% generation %}`` spans of the trainable assistant turns, rendered
        by HF's own machinery. The text is ``render(conv.messages, conv.tools)``'s (proven for
        every marked template by tests/test_data_encoding_fastpath.py)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[self.for_template(conv.messages, conv.tools)],
                tools=conv.tools,
                chat_template=self.template(conv.tools),
                return_assistant_tokens_mask=True,
                **self.template_kwargs,
            )
        except Exception as exc:
            raise RecordError("template_error", f"the chat template failed on this conversation: {exc}") from None
        spans = [(int(a), int(b)) for a, b in indices[0] if b > a]
        assistants = [t for m, t in zip(conv.messages, conv.trainable) if m["role"] == "assistant"]
        if not all(assistants):
            if len(spans) != len(assistants):
                raise RecordError(
                    "untrainable_turns",
                    f"the template marks {len(spans)} generation spans for {len(assistants)} assistant turns, "
                    "so turns with weight 0 (or the prompt side of prompt/completion) cannot be told apart",
                )
            spans = [s for s, t in zip(spans, assistants) if t]
        return texts[0], spans

    def for_template(self, messages: list[dict], tools: Any) -> list[dict]:
        """Messages as the template expects them: reasoning under both names, tool-call
        arguments as objects or JSON strings (whichever form the template renders)."""
        if self.template(tools) not in self.arguments:
            self.probe_arguments(tools)
        form = self.arguments.get(self.template(tools))
        out = []
        for message in messages:
            if message["role"] == "assistant":
                reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f)), None)
                if reasoning is not None and not all(message.get(f) == reasoning for f in REASONING_FIELDS):
                    message = {**message, **{f: reasoning for f in REASONING_FIELDS}}
                if form and message.get("tool_calls"):
                    message = {**message, "tool_calls": [tool_call_as(call, form) for call in message["tool_calls"]]}
            out.append(message)
        return out

    def probe_arguments(self, tools: Any) -> None:
        """Whether the template renders tool-call arguments given as objects (HF's convention)
        or only as JSON strings (DeepSeek-V3 concatenates them); records the form it takes."""
        key = self.template(tools)
        if key in self.arguments:
            return
        # Recorded before each try: rendering the probe passes through for_template, which reads it.
        self.arguments[key] = ""
        for form in ARGUMENT_FORMS:
            self.arguments[key] = form
            try:
                self.render(tool_probe(form)[0], tools or PROBE_TOOLS)
                return
            except RecordError:
                continue
        self.arguments[key] = ""
