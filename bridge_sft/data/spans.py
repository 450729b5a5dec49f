"""Locating assistant turn bodies in a rendering by a template without ``{% generation %}``
marks: through the conversation's skeleton (its shape rendered with sentinels instead of
texts, aligned with the real rendering), or, where that fails, by rendering prefixes.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

from bridge_sft.data.formats import Conversation, RecordError
from bridge_sft.data.probing import TemplateProbe
from bridge_sft.data.rendering import Renderer, variants

TEXT_FIELDS = ("content", "reasoning_content", "thinking")
_SENTINEL_RE = re.compile(r"@@BSFT(\d+)@@")
_SKELETON_CACHE_SIZE = 4096

Span = tuple[int, int]


def shape_key(conv: Conversation) -> str:
    """Everything about a conversation that a template may branch on, except its texts."""
    shape = []
    for message in conv.messages:
        item = {k: v for k, v in message.items() if k not in TEXT_FIELDS}
        for f in TEXT_FIELDS:
            v = message.get(f)
            item[f] = None if v is None else ("s" if isinstance(v, str) and v else repr(v))
        shape.append(item)
    return json.dumps([shape, conv.tools], sort_keys=True, ensure_ascii=False, default=repr)


class Skeleton:
    """A conversation shape rendered with sentinels instead of texts, and its assistant bodies.

    ``pieces``: template text between sentinels; ``order``: which ``(message, field)``
    each sentinel stands for; ``bodies[j]``: for assistant message j, its body as
    ``((piece, offset), (piece, offset))`` (start, end), or None.
    """

    def __init__(self, pieces, order, bodies):
        self.pieces = pieces
        self.order = order
        self.bodies = bodies

    @classmethod
    def build(cls, renderer: Renderer, probe: TemplateProbe, conv: Conversation, header: str,
              eots) -> "Skeleton | None":
        """The skeleton of ``conv``'s shape, or None where the template's rendering of it
        cannot be aligned (a text rendered twice, a turn whose header or end is missing)."""
        eots = (eots,) if isinstance(eots, str) else tuple(eots)
        fields: list[tuple[int, str]] = []
        messages = []
        for j, message in enumerate(renderer.for_template(conv.messages, conv.tools)):
            m = dict(message)
            for f in ("content", "reasoning_content"):
                v = m.get(f)
                if isinstance(v, str) and v:
                    m[f] = f"@@BSFT{len(fields)}@@"
                    fields.append((j, f))
            if "thinking" in m and "reasoning_content" in m:
                m["thinking"] = m["reasoning_content"]  # the same text under both names: one sentinel
            messages.append(m)
        try:
            s = renderer.render(messages, conv.tools)
        except RecordError:
            return None
        pieces, order, sentinel_pos, piece_starts, last = [], [], {}, [0], 0
        for match in _SENTINEL_RE.finditer(s):
            k = int(match.group(1))
            if k >= len(fields) or k in sentinel_pos:
                return None  # a text rendered twice: cannot align
            pieces.append(s[last: match.start()])
            order.append(fields[k])
            sentinel_pos[k] = (match.start(), match.end())
            last = match.end()
            piece_starts.append(last)
        pieces.append(s[last:])

        by_message: dict[int, list[tuple[int, int]]] = {}
        for k, (j, _) in enumerate(fields):
            if k in sentinel_pos:
                by_message.setdefault(j, []).append(sentinel_pos[k])
        bodies: list[tuple[tuple[int, int], tuple[int, int]] | None] = []
        cursor = 0
        n = len(conv.messages)
        for j, message in enumerate(conv.messages):
            own = by_message.get(j, [])
            later = [p[0] for i in range(j + 1, n) for p in by_message.get(i, [])]
            next_anchor = min(later) if later else len(s)
            if message["role"] != "assistant":
                # (A text the template moves after later messages, as Mistral v3 does with the
                # system prompt, says nothing about where this point of the conversation is.)
                if own and max(e for _, e in own) <= next_anchor:
                    cursor = max(cursor, max(e for _, e in own))
                bodies.append(None)
                continue
            header_limit = min(b for b, _ in own) if own else next_anchor
            g = s.find(header, cursor, header_limit)
            if g >= 0:
                start = g + len(header)
            elif j and conv.messages[j - 1]["role"] == "tool":
                # No header after a tool result (Mistral, DeepSeek-V3): the body starts after the
                # special tokens that close the result ("[/TOOL_RESULTS]").
                start = probe.after_special_run(s, cursor, header_limit)
                if start < 0:
                    return None
            else:
                return None
            content_end = max([start] + [e for _, e in own])
            end = _find_end(s, eots, content_end, next_anchor)
            if end < 0:
                return None
            # A turn of several messages (gpt-oss: analysis, then a tool call): the body goes on
            # while the assistant header follows at once and another end of turn comes before the
            # next message's text.
            while s.startswith(header, end):
                more = _find_end(s, eots, end + len(header), next_anchor)
                if more < 0:
                    break
                end = more
            cursor = end
            bodies.append((_locate(piece_starts, pieces, start), _locate(piece_starts, pieces, end)))
        return cls(pieces, order, bodies)

    def align(self, messages: list[dict], text: str) -> list[Span | None] | None:
        """Body spans in the real rendering ``text``, or None if it does not match this skeleton."""
        pieces = self.pieces
        if not text.startswith(pieces[0]):
            return None
        offsets = [0]
        pos = len(pieces[0])
        last = len(self.order) - 1
        for i, (j, f) in enumerate(self.order):
            nxt = pieces[i + 1]
            for v in variants(messages[j][f]):
                if text.startswith(v, pos) and text.startswith(nxt, pos + len(v)):
                    if i < last or pos + len(v) + len(nxt) == len(text):
                        break
            else:
                return None
            pos += len(v)
            offsets.append(pos)
            pos += len(nxt)
        if pos != len(text):
            return None
        return [
            None if body is None else (offsets[body[0][0]] + body[0][1], offsets[body[1][0]] + body[1][1])
            for body in self.bodies
        ]


class Skeletons:
    """Skeletons by conversation shape (least recently used ones dropped)."""

    def __init__(self, renderer: Renderer, probe: TemplateProbe, size: int = _SKELETON_CACHE_SIZE):
        self.renderer = renderer
        self.probe = probe
        self.size = size
        self.cache: OrderedDict[str, Skeleton | None] = OrderedDict()

    def get(self, conv: Conversation, header: str, eots: tuple[str, ...]) -> Skeleton | None:
        key = shape_key(conv)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        skeleton = Skeleton.build(self.renderer, self.probe, conv, header, eots)
        self.cache[key] = skeleton
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return skeleton


def spans_by_prefixes(renderer: Renderer, probe: TemplateProbe, conv: Conversation, text: str,
                      eots) -> list[Span | None]:
    """Fallback: each assistant turn starts where the rendered prompt before it (with the
    generation prompt) ends, and ends at its end-of-turn token."""
    eots = (eots,) if isinstance(eots, str) else tuple(eots)
    spans: list[Span | None] = []
    header, _ = probe.markers(conv.tools)
    for j, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            spans.append(None)
            continue
        before = renderer.render(conv.messages[:j], conv.tools) if j else ""
        prompt = renderer.render(conv.messages[:j], conv.tools, add_generation_prompt=True) if j else None
        if prompt is not None and text.startswith(prompt):
            # The generation prompt is what the model is given; DeepSeek-V3's turn after tool
            # outputs has no assistant header, and its prompt none either.
            start = len(prompt)
        elif text.startswith(before) and text.find(header, len(before)) >= 0:
            start = text.find(header, len(before)) + len(header)
        elif not text.startswith(before):
            raise probe.unsupported(
                f"the conversation up to message {j} renders differently on its own than inside the whole "
                "conversation"
            )
        else:  # no header at all (DeepSeek-V3's second tool-call turn): the body starts right there
            start = len(before)
        through = renderer.render(conv.messages[: j + 1], conv.tools)
        end = -1
        if text.startswith(through):
            end = max((p + len(e) for e in eots for p in [text.rfind(e, start, len(through))] if p >= 0),
                      default=-1)
        if end < 0:  # the template renders this turn differently when it is the last one
            end = min((p + len(e) for e in eots for p in [text.find(e, start)] if p >= 0), default=-1)
        if end < 0:
            raise probe.unsupported(f"the end of assistant message {j} was not found")
        spans.append((start, end))
    return spans


def _find_end(s: str, eots: tuple[str, ...], start: int, stop: int) -> int:
    """End of the first end-of-turn text in ``s[start:stop]`` (-1 if none)."""
    found = [(p, p + len(e)) for e in eots for p in [s.find(e, start, stop)] if p >= 0]
    return min(found)[1] if found else -1


def _locate(piece_starts: list[int], pieces: list[str], pos: int) -> tuple[int, int]:
    """``(piece, offset)`` of a skeleton position that lies in template text (not in a sentinel)."""
    for i in range(len(pieces) - 1, -1, -1):
        if piece_starts[i] <= pos:
            if pos - piece_starts[i] > len(pieces[i]):
                raise AssertionError("skeleton position inside a sentinel")
            return i, pos - piece_starts[i]
    raise AssertionError("skeleton position before the first piece")
