"""Reasoning policies: where the reasoning block of an assistant turn lies in a rendering
(``train_reasoning``), and the samples ``reasoning_history="split"`` makes of a conversation
whose template drops earlier turns' reasoning (see ``bridge_sft.data.encoding``).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from bridge_sft.data.formats import Conversation, DataError, RecordError
from bridge_sft.data.probing import TemplateProbe
from bridge_sft.data.rendering import REASONING_FIELDS, Renderer, variants

if TYPE_CHECKING:
    from bridge_sft.data.encoding import ChatEncoder

EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*")

Span = tuple[int, int]


def reasoning_text(message: dict) -> str | None:
    """The message's reasoning (under either name), None if it has none."""
    for f in REASONING_FIELDS:
        v = message.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


class ReasoningBlocks:
    """Finds reasoning blocks in assistant bodies. ``empty_think``: the encoder's policy for
    empty ``<think></think>`` blocks (``"mask"`` leaves them out of the closing text)."""

    def __init__(self, renderer: Renderer, probe: TemplateProbe, empty_think: str):
        self.renderer = renderer
        self.probe = probe
        self.empty_think = empty_think
        self.glues: dict[str, str | None] = {}

    def find(self, text: str, start: int, end: int, message: dict | None, tools: Any):
        """The reasoning block ``(start, end)`` of an assistant body ``text[start:end]``; None if
        the message has no reasoning, ``"dropped"`` if the template did not render it here."""
        reasoning = reasoning_text(message) if message is not None else None
        if not reasoning:
            return None
        for v in variants(reasoning):
            if v.strip():
                at = text.find(v, start, end)
                if at >= 0:
                    break
        else:
            return "dropped"
        stop = at + len(v)
        glue = self.glue(tools)
        if glue and text.startswith(glue, stop) and stop + len(glue) <= end:
            stop += len(glue)
        return start, stop

    def glue(self, tools: Any) -> str | None:
        """Template text that closes a reasoning block (between the reasoning and the part a
        turn without reasoning also has before its content); None if reasoning is not rendered."""
        renderer = self.renderer
        key = renderer.template(tools)
        if key in self.glues:
            return self.glues[key]
        r, a = "@@BSFTprobeR@@", "@@BSFTprobeA@@"
        glue = None
        try:
            user = {"role": "user", "content": "@@BSFTprobeU@@"}
            with_r = renderer.render([user, {"role": "assistant", "content": a, "reasoning_content": r}], tools)
            without = renderer.render([user, {"role": "assistant", "content": a}], tools)
            header, _ = self.probe.markers(tools) if not renderer.has_generation_marks(tools) else ("", ())
        except (RecordError, DataError):
            with_r = without = header = ""
        if r in with_r and a in with_r and with_r.index(r) < with_r.index(a) and a in without:
            glue = with_r[with_r.index(r) + len(r): with_r.index(a)]
            before = without[: without.index(a)]
            h = before.rfind(header) + len(header) if header and header in before else len(before)
            plain = before[h:]
            if self.empty_think == "mask":
                m = EMPTY_THINK_RE.match(plain)
                plain = plain[m.end():] if m else plain
            if plain and glue.endswith(plain):
                glue = glue[: -len(plain)]
        self.glues[key] = glue
        return glue


def subtract(spans: list[Span], holes: list[Span]) -> list[Span]:
    """``spans`` minus ``holes`` (both lists of ``[start, end)``)."""
    out = []
    for a, b in spans:
        pieces = [(a, b)]
        for h0, h1 in holes:
            nxt = []
            for p0, p1 in pieces:
                if h1 <= p0 or h0 >= p1:
                    nxt.append((p0, p1))
                    continue
                if p0 < h0:
                    nxt.append((p0, h0))
                if h1 < p1:
                    nxt.append((h1, p1))
            pieces = nxt
        out += pieces
    return out


def history_pieces(encoder: "ChatEncoder", conv: Conversation, split: bool) -> list[Conversation]:
    """The samples ``reasoning_history="split"`` makes of a conversation (``bridge_sft.data.encoding``);
    one piece, the conversation itself, when no trainable turn's reasoning is dropped (or not ``split``)."""
    conv = encoder.train_on_last(conv)
    if not split or encoder.train_on == "all" or not any(reasoning_text(m) for m in conv.messages):
        return [conv]
    if encoder.renderer.has_generation_marks(conv.tools):
        # One rendering gives the text and its marked spans (the same text as render()'s).
        text, marked = encoder.renderer.render_marked(conv)
        spans = dict(zip([i for i, (m, t) in enumerate(zip(conv.messages, conv.trainable))
                          if m["role"] == "assistant" and t], marked))
    else:
        text = encoder.renderer.render(conv.messages, conv.tools)
        spans = dict(enumerate(encoder._assistant_turns(conv, text)))
    cuts = []
    for j, (message, trainable) in enumerate(zip(conv.messages, conv.trainable)):
        if not trainable or message["role"] != "assistant" or not reasoning_text(message):
            continue
        span = spans.get(j)
        if span is not None and encoder.reasoning.find(text, span[0], span[1], message, conv.tools) != "dropped":
            continue
        prefix = Conversation(conv.messages[: j + 1], conv.tools, [False] * j + [True])
        try:
            _, _, prefix_reasoning = encoder.render_sample(prefix)
        except RecordError:
            continue
        if prefix_reasoning:  # the template renders this turn's reasoning when the turn is the last one
            cuts.append(j)
    if not cuts:
        return [conv]
    pieces, start = [], 0
    for j in cuts + [len(conv.messages) - 1]:
        flags = [t and start <= i <= j for i, t in enumerate(conv.trainable[: j + 1])]
        if any(flags):
            pieces.append(Conversation(conv.messages[: j + 1], conv.tools, flags))
        start = j + 1
    return pieces
