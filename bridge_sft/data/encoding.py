"""Conversations to ``input_ids`` and an exact per-token ``loss_mask``, for any HF chat template.

``input_ids`` are always the tokens of the WHOLE conversation rendered at once,
i.e. exactly ``tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]``
(render to text, tokenize without adding special tokens). The mask is computed
in characters of that same rendered text and mapped to tokens through the fast
tokenizer's offsets: a token is supervised when any of its characters is (the
rule of HF's ``return_assistant_tokens_mask``).

Which characters are supervised (``train_on="assistant"``):

- Template WITH ``{% generation %}`` marks: exactly the marked text (HF's own
  rendering with ``return_assistant_tokens_mask``); the template is the authority.
- Template WITHOUT marks (official Llama 3, Qwen2.5, Qwen3 ...): each assistant
  turn's *body*, from the end of its assistant header up to and including its
  end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``</s>`` ...): the content,
  reasoning and tool calls the model must generate, and the token that makes it
  stop. Not supervised: system, user and tool turns, role headers, the newline
  a template writes after the end-of-turn token. The header ``G`` and the
  end-of-turn text ``EOT`` are found once per template by rendering probe
  conversations (``G`` = the common part of the generation prompt and a rendered
  assistant header; ``EOT`` = the text after an assistant's content up to its
  first special token).

  Turns are located in the whole rendering, never by tokenizing prefixes
  (prefix tokenization can differ at boundaries, and templates such as Qwen3
  render earlier turns differently once a later user turn exists). The text of
  each message is replaced by a sentinel and the conversation rendered once
  (a "skeleton", cached by conversation shape); ``G``/``EOT`` are searched in the
  skeleton, where no user text can fake them, and the skeleton is aligned
  character by character with the real rendering (contents verbatim or stripped,
  as templates do). If the alignment fails (a template branches on content),
  turns are located by rendering conversation prefixes as text instead, checking
  that each prefix is a prefix of the whole rendering.

Empty reasoning blocks (policy, ``empty_think="mask"`` by default): when a
template without marks injects an empty ``<think>\\n\\n</think>\\n\\n`` at the start
of an assistant body (Qwen3 does for the final turn when there is no
reasoning), those tokens are NOT supervised. They are template boilerplate, the
same text the template itself puts in the *prompt* for ``enable_thinking=False``;
training on them teaches the model to skip reasoning (NVIDIA-NeMo/Automodel
issue 3739). A non-empty ``<think>...</think>`` (``reasoning_content`` or inline)
is supervised. ``empty_think="train"`` supervises the empty block too.

``train_on="last_assistant"`` keeps only the last trainable assistant turn;
``train_on="all"`` supervises every token.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bridge_sft.data.formats import Conversation, DataError, RecordError, normalize_messages

TRAIN_ON = ("assistant", "last_assistant", "all")
EMPTY_THINK = ("mask", "train")
GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*")
TEXT_FIELDS = ("content", "reasoning_content")
_SENTINEL_RE = re.compile(r"@@BSFT(\d+)@@")
_SKELETON_CACHE_SIZE = 4096


@dataclass(frozen=True)
class EncodedConversation:
    """``input_ids`` and ``loss_mask`` (0/1), two equal-length lists of ints, unshifted."""

    input_ids: list[int]
    loss_mask: list[int]


def load_chat_template(value: str | None) -> str | None:
    """A chat template given as a path to a Jinja file, or as the template text itself."""
    if value is None:
        return None
    if "{" not in value and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text(encoding="utf-8")
    if "{" not in value:
        raise DataError(f"chat_template {value!r}: no such file, and not a Jinja template either")
    return value


@dataclass(frozen=True)
class TokenizerSpec:
    """What encoding needs from an HF tokenizer, as plain picklable values (for worker
    processes, which then need neither ``AutoTokenizer`` nor torch)."""

    name: str
    backend_json: str
    chat_template: str | dict[str, str] | None
    special_tokens_map: dict[str, Any]
    special_ids: frozenset[int]
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str | None = None) -> "TokenizerSpec":
        """The spec of an HF tokenizer (cached per tokenizer object while its template,
        added tokens and special tokens stay the same)."""
        fingerprint = _fingerprint(tokenizer)
        try:
            cached = _SPECS.get(tokenizer)
        except TypeError:  # not weak-referenceable
            cached = None
        if cached is not None and cached[0] == fingerprint and (name is None or cached[1].name == name):
            return cached[1]
        spec = cls._from_tokenizer(tokenizer, name)
        try:
            _SPECS[tokenizer] = (fingerprint, spec)
        except TypeError:
            pass
        return spec

    @classmethod
    def _from_tokenizer(cls, tokenizer, name: str | None) -> "TokenizerSpec":
        name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise DataError(
                f"tokenizer {name}: a fast (Rust 'tokenizers') tokenizer with a tokenizer.json is needed to map "
                "the loss mask to tokens; this one is a slow Python tokenizer"
            )
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)
        }
        pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
        return cls(
            name=str(name),
            backend_json=backend.to_str(),
            chat_template=getattr(tokenizer, "chat_template", None),
            special_tokens_map=dict(tokenizer.special_tokens_map),
            special_ids=frozenset(special),
            pad_id=int(pad),
        )


_SPECS: "weakref.WeakKeyDictionary[Any, tuple[tuple, TokenizerSpec]]" = weakref.WeakKeyDictionary()


def _fingerprint(tokenizer) -> tuple:
    """What may change on a live tokenizer object and changes the encoding (about 10 us)."""
    template = getattr(tokenizer, "chat_template", None)
    return (
        template if not isinstance(template, dict) else tuple(sorted(template.items())),
        len(getattr(tokenizer, "added_tokens_decoder", ())),
        repr(sorted(getattr(tokenizer, "special_tokens_map", {}).items())),
    )
_BACKENDS: OrderedDict[int, tuple[TokenizerSpec, Any]] = OrderedDict()


def _backend(spec: TokenizerSpec):
    """The Rust tokenizer of a spec: a private copy that never inherits padding/truncation
    settings from tokenizer.json (HF resets them on every call; the raw backend would not)."""
    hit = _BACKENDS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec.backend_json)
    backend.no_truncation()
    backend.no_padding()
    _BACKENDS[id(spec)] = (spec, backend)
    while len(_BACKENDS) > 4:
        _BACKENDS.popitem(last=False)
    return backend


class ChatEncoder:
    """Encodes conversations with one tokenizer and chat template (see the module docstring).

    ``tokenizer``: a fast (Rust-backed) HF tokenizer, or its ``TokenizerSpec``.
    ``chat_template``: overrides the tokenizer's (a template string).
    ``template_kwargs``: extra variables for the template (``enable_thinking``,
    ``date_string``, ...).
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        train_on: str = "assistant",
        empty_think: str = "mask",
        name: str | None = None,
    ):
        if train_on not in TRAIN_ON:
            raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        if empty_think not in EMPTY_THINK:
            raise DataError(f"empty_think must be one of {', '.join(EMPTY_THINK)}, not {empty_think!r}")
        spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec.from_tokenizer(tokenizer, name)
        self.spec = spec
        self.train_on = train_on
        self.empty_think = empty_think
        self.name = name or spec.name
        self._backend = _backend(spec)

        template = chat_template if chat_template is not None else spec.chat_template
        if not template:
            raise DataError(
                f"tokenizer {self.name} has no chat template; give one with chat_template=PATH.jinja "
                "(CLI: --chat-template), or use a tokenizer directory whose tokenizer_config.json or "
                "chat_template.jinja has one"
            )
        self._templates = template if isinstance(template, dict) else {"default": template}
        self.template_kwargs = {**spec.special_tokens_map, **(template_kwargs or {})}
        self._special_ids = spec.special_ids
        self._skeletons: OrderedDict[str, _Skeleton | None] = OrderedDict()
        self._probes: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ public

    def has_generation_marks(self, tools: Any = None) -> bool:
        return GENERATION_RE.search(self._template(tools)) is not None

    def encode(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int64 [n], loss_mask uint8 [n])`` of one validated conversation."""
        text, spans = self.render_with_spans(conv)
        enc = self._backend.encode(text, add_special_tokens=False)
        return self._to_arrays(enc, spans)

    def encode_many(self, convs: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray] | RecordError]:
        """``encode`` for many conversations, tokenising in one batch; a bad one yields its ``RecordError``."""
        rendered: list[tuple[str, list[tuple[int, int]]] | RecordError] = []
        for conv in convs:
            try:
                rendered.append(self.render_with_spans(conv))
            except RecordError as exc:
                rendered.append(exc)
        texts = [r[0] for r in rendered if not isinstance(r, RecordError)]
        encodings = iter(self._backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        return [r if isinstance(r, RecordError) else self._to_arrays(next(encodings), r[1]) for r in rendered]

    def render_with_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and its supervised character spans ``[start, end)``."""
        if self.train_on != "all" and self.has_generation_marks(conv.tools):
            text, spans = self._render_marked(conv)
        else:
            text = self.render(conv.messages, conv.tools)
            if self.train_on == "all":
                return text, [(0, len(text))]
            spans = [span for span in self._assistant_turns(conv, text) if span is not None]
        if not spans:
            raise RecordError("no_supervised_tokens", "no assistant turn to train on is left in the rendered text")
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        return text, spans

    def render(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        """The template's text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, _ = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=self._template(tools),
                add_generation_prompt=add_generation_prompt,
                **self.template_kwargs,
            )
        except Exception as exc:  # jinja2.TemplateError, raise_exception(), TypeError in filters ...
            raise RecordError("template_error", f"the chat template failed on this conversation: {exc}") from None
        return texts[0]

    # ------------------------------------------------------------------ helpers

    def _template(self, tools: Any) -> str:
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise DataError(f"tokenizer {self.name}: no 'default' chat template among {', '.join(self._templates)}")

    def _to_arrays(self, enc, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(enc.ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        if len(ids) == 0:
            return ids, mask
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        if np.all(starts[1:] >= starts[:-1]) and np.all(ends[1:] >= ends[:-1]):
            for a, b in spans:
                lo = np.searchsorted(ends, a, side="right")  # first token ending after a
                hi = np.searchsorted(starts, b, side="left")  # first token starting at/after b
                mask[lo:hi] = 1
        else:  # offsets out of order (unusual normalisers): overlap test per token
            for a, b in spans:
                mask[(starts < b) & (ends > a)] = 1
        return ids, mask

    def _render_marked(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Text and ``{% generation %}`` spans, rendered by HF's own machinery."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[conv.messages],
                tools=conv.tools,
                chat_template=self._template(conv.tools),
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

    # ---- templates without generation marks

    def _probe(self, tools: Any) -> tuple[str, str]:
        """``(G, EOT)``: the assistant header text and the end-of-turn text (see module docstring)."""
        key = self._template(tools)
        if key in self._probes:
            return self._probes[key]
        u, a, u2 = "@@BSFTprobeU@@", "@@BSFTprobeA@@", "@@BSFTprobeV@@"
        user = {"role": "user", "content": u}
        asst = {"role": "assistant", "content": a}
        try:
            base = self.render([user], tools)
            gen = self.render([user], tools, add_generation_prompt=True)
            final = self.render([user, asst], tools)
            mid = self.render([user, asst, {"role": "user", "content": u2}], tools)
        except RecordError as exc:
            raise self._unsupported(f"rendering a probe conversation failed ({exc.detail})") from None
        # Everything is located relative to the probe texts, never by prefix (templates such as
        # Phi-3 end a conversation with an EOS that a longer conversation does not have there).
        if any(u not in t for t in (base, gen, final, mid)) or a not in final or a not in mid or u2 not in mid:
            raise self._unsupported("the probe messages' contents do not appear in the rendered text")
        after_user = [t[t.index(u) + len(u):] for t in (base, gen, final, mid)]
        user_end = after_user[0]
        header = _common_prefix(after_user[1], after_user[2][: after_user[2].index(a)],
                                after_user[3][: after_user[3].index(a)])
        header = header[len(_common_prefix(header, user_end)):]  # drop the user turn's own ending
        if not header.strip():
            raise self._unsupported("no assistant header is shared by the generation prompt and rendered turns")
        final_turn, mid_turn = final[final.index(a):], mid[mid.index(a): mid.index(u2)]
        tail_final, tail_mid = final_turn[len(a):], mid_turn[len(a):]
        # The turn ends with the last special token the final and a middle assistant turn share
        # after the content ("<|im_end|>" of "<|im_end|>\n", both of "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>").
        shared = _common_prefix(tail_final, tail_mid)
        enc = self._backend.encode(shared, add_special_tokens=False)
        ends = [end for token_id, (_, end) in zip(enc.ids, enc.offsets) if token_id in self._special_ids]
        if not ends:
            raise self._unsupported(
                f"no end-of-turn special token follows an assistant turn (after the content: {tail_final!r})"
            )
        eot = shared[: ends[-1]]
        self._probes[key] = (header, eot)
        return header, eot

    def _unsupported(self, why: str) -> DataError:
        return DataError(
            f"cannot locate assistant turns in the chat template of {self.name}: {why}. Add {{% generation %}} / "
            "{% endgeneration %} marks around the assistant output in the template (chat_template=...), "
            "or train on every token (train_on='all')"
        )

    def _assistant_turns(self, conv: Conversation, text: str) -> list[tuple[int, int] | None]:
        """Supervised span of each trainable assistant message (None for the others), in ``text``."""
        header, eot = self._probe(conv.tools)
        spans = None
        skeleton = self._skeleton(conv, header, eot)
        if skeleton is not None:
            spans = skeleton.align(conv.messages, text)
        if spans is None:
            spans = self._spans_by_prefixes(conv, text, eot)
        out: list[tuple[int, int] | None] = []
        for message, trainable, span in zip(conv.messages, conv.trainable, spans):
            if message["role"] != "assistant" or not trainable or span is None:
                out.append(None)
                continue
            start, end = span
            if self.empty_think == "mask":
                m = EMPTY_THINK_RE.match(text, start, end)
                if m:
                    start = m.end()
            out.append((start, end))
        return out

    def _skeleton(self, conv: Conversation, header: str, eot: str) -> "_Skeleton | None":
        key = _shape_key(conv)
        if key in self._skeletons:
            self._skeletons.move_to_end(key)
            return self._skeletons[key]
        skeleton = _Skeleton.build(self, conv, header, eot)
        self._skeletons[key] = skeleton
        if len(self._skeletons) > _SKELETON_CACHE_SIZE:
            self._skeletons.popitem(last=False)
        return skeleton

    def _spans_by_prefixes(self, conv: Conversation, text: str, eot: str) -> list[tuple[int, int] | None]:
        """Fallback: each assistant turn starts where the rendered prompt before it (with the
        generation prompt) ends, and ends at its end-of-turn token."""
        spans: list[tuple[int, int] | None] = []
        header, _ = self._probe(conv.tools)
        for j, message in enumerate(conv.messages):
            if message["role"] != "assistant":
                spans.append(None)
                continue
            before = self.render(conv.messages[:j], conv.tools) if j else ""
            prompt = self.render(conv.messages[:j], conv.tools, add_generation_prompt=True) if j else None
            if prompt is not None and text.startswith(prompt) and prompt.endswith(header):
                start = len(prompt)
            elif text.startswith(before):
                start = text.find(header, len(before))
                if start < 0:
                    raise self._unsupported(f"the header of assistant message {j} was not found")
                start += len(header)
            else:
                raise self._unsupported(
                    f"the conversation up to message {j} renders differently on its own than inside the whole "
                    "conversation"
                )
            through = self.render(conv.messages[: j + 1], conv.tools)
            end = -1
            if text.startswith(through):
                end = text.rfind(eot, start, len(through))
            if end < 0:  # the template renders this turn differently when it is the last one
                end = text.find(eot, start)
            if end < 0:
                raise self._unsupported(f"the end of assistant message {j} was not found")
            spans.append((start, end + len(eot)))
        return spans


def _common_prefix(*texts: str) -> str:
    n = min(len(t) for t in texts)
    i = 0
    while i < n and all(t[i] == texts[0][i] for t in texts):
        i += 1
    return texts[0][:i]


def _shape_key(conv: Conversation) -> str:
    """Everything about a conversation that a template may branch on, except its texts."""
    shape = []
    for message in conv.messages:
        item = {k: v for k, v in message.items() if k not in TEXT_FIELDS}
        for f in TEXT_FIELDS:
            v = message.get(f)
            item[f] = None if v is None else ("s" if isinstance(v, str) and v else repr(v))
        shape.append(item)
    return json.dumps([shape, conv.tools], sort_keys=True, ensure_ascii=False, default=repr)


def _variants(text: str):
    """How templates commonly insert a text: verbatim, stripped, or JSON-escaped."""
    seen = {text}
    yield text
    for v in (text.strip(), text.strip("\n"), text.lstrip(), text.rstrip(), text.lstrip("\n"), text.rstrip("\n"),
              json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]):
        if v not in seen:
            seen.add(v)
            yield v


class _Skeleton:
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
    def build(cls, encoder: ChatEncoder, conv: Conversation, header: str, eot: str) -> "_Skeleton | None":
        fields: list[tuple[int, str]] = []
        messages = []
        for j, message in enumerate(conv.messages):
            m = dict(message)
            for f in TEXT_FIELDS:
                v = m.get(f)
                if isinstance(v, str) and v:
                    m[f] = f"@@BSFT{len(fields)}@@"
                    fields.append((j, f))
            messages.append(m)
        try:
            s = encoder.render(messages, conv.tools)
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
                if own:
                    cursor = max(cursor, max(e for _, e in own))
                bodies.append(None)
                continue
            header_limit = min(b for b, _ in own) if own else next_anchor
            g = s.find(header, cursor, header_limit)
            if g < 0:
                return None
            start = g + len(header)
            content_end = max([start] + [e for _, e in own])
            e = s.find(eot, content_end, next_anchor)
            if e < 0:
                return None
            end = e + len(eot)
            cursor = end
            bodies.append((_locate(piece_starts, pieces, start), _locate(piece_starts, pieces, end)))
        return cls(pieces, order, bodies)

    def align(self, messages: list[dict], text: str) -> list[tuple[int, int] | None] | None:
        """Body spans in the real rendering ``text``, or None if it does not match this skeleton."""
        pieces = self.pieces
        if not text.startswith(pieces[0]):
            return None
        offsets = [0]
        pos = len(pieces[0])
        last = len(self.order) - 1
        for i, (j, f) in enumerate(self.order):
            nxt = pieces[i + 1]
            for v in _variants(messages[j][f]):
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


def _locate(piece_starts: list[int], pieces: list[str], pos: int) -> tuple[int, int]:
    """``(piece, offset)`` of a skeleton position that lies in template text (not in a sentinel)."""
    for i in range(len(pieces) - 1, -1, -1):
        if piece_starts[i] <= pos:
            if pos - piece_starts[i] > len(pieces[i]):
                raise AssertionError("skeleton position inside a sentinel")
            return i, pos - piece_starts[i]
    raise AssertionError("skeleton position before the first piece")


# --------------------------------------------------------------------------- public API

_ENCODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def get_encoder(tokenizer, *, train_on: str = "assistant", **kwargs) -> ChatEncoder:
    """A cached ``ChatEncoder`` for this tokenizer object and settings."""
    key = (train_on, json.dumps(kwargs, sort_keys=True, default=repr), _fingerprint(tokenizer))
    try:
        per_tokenizer = _ENCODERS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return ChatEncoder(tokenizer, train_on=train_on, **kwargs)
    if key not in per_tokenizer:
        per_tokenizer[key] = ChatEncoder(tokenizer, train_on=train_on, **kwargs)
    return per_tokenizer[key]


def encode_conversation(
    messages: list[dict[str, Any]],
    tokenizer,
    *,
    tools: list[dict[str, Any]] | None = None,
    train_on: str = "assistant",
) -> EncodedConversation:
    """Tokenise a conversation with the tokenizer's chat template and mark the tokens to learn.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)``'s.
    ``loss_mask[i] == 1`` exactly on the tokens the model must produce: with
    ``train_on="assistant"`` each assistant turn's content (and reasoning / tool
    calls) and its end-of-turn token; 0 on system, user and tool turns, role
    headers and generation prompts. ``"last_assistant"``: only the last assistant
    turn; ``"all"``: every token. Works with and without ``{% generation %}``
    marks; see the module docstring for the exact rules and the empty
    ``<think></think>`` policy. Raises ``RecordError`` (a ``ValueError``) for
    invalid messages and ``DataError`` for unusable tokenizers/templates.
    """
    normalized, trainable = normalize_messages(messages)
    if train_on != "all" and not any(trainable):
        raise RecordError("no_assistant_turn", "the conversation has no assistant turn to train on")
    encoder = get_encoder(tokenizer, train_on=train_on)
    ids, mask = encoder.encode(Conversation(normalized, tools, trainable))
    return EncodedConversation(ids.tolist(), mask.tolist())


GREEN, RESET = "\033[1;32m", "\033[0m"


def render_supervised(input_ids: list[int], loss_mask: list[int], tokenizer, color: bool = False) -> str:
    """The decoded conversation with its supervised tokens (``loss_mask == 1``) marked.

    Marked spans are green (``color=True``, for terminals) or between ``[[`` and ``]]``.
    Special tokens are shown, so role headers and end-of-turn tokens are visible.
    """
    pieces, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or loss_mask[i] != loss_mask[start]:
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            if loss_mask[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            pieces.append(text)
            start = i
    return "".join(pieces)
