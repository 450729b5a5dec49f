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

End of an assistant turn: the special token a final and a middle assistant turn
share after the content (``<|im_end|>``, ``<|eot_id|>``, ``</s>``); where they end
differently (gpt-oss: ``<|return|>`` for the final turn, ``<|end|>`` before a later
turn, ``<|call|>`` after a tool call), each one found by the probes. A template whose
final assistant turn ends with no special token at all (GLM-4.5: the model's stop
token is the NEXT turn's ``<|user|>``, which the official template only writes when a
user turn follows) cannot teach the model to stop: such a template is replaced by a
known training variant of the same template (``bridge_sft.data.templates``, matched
by content) with ``{% generation %}`` marks, and one warning says so.

Reasoning (``reasoning_content``, or ``thinking`` as gpt-oss names it; each is also
passed under the other name so that whichever the template reads finds it):

- the reasoning block of a turn runs from the start of the turn's body through the
  reasoning text and the template text that closes it (``\n</think>\n\n``;
  harmony: ``<|end|><|start|>assistant`` before ``<|channel|>final``), i.e. what the
  body holds beyond the body of the same turn without reasoning;
  ``train_reasoning=False`` leaves these tokens out of the loss and trains the rest;
- ``reasoning_history="split"`` (default): templates such as Qwen3 and gpt-oss render
  reasoning only in the final turn(s) and drop it from earlier ones, so training the
  whole conversation would silently lose that reasoning. Each assistant turn whose
  reasoning the whole rendering drops (and whose own prefix conversation renders it)
  ends a sample of its own: the conversation up to that turn, rendered by the
  template unchanged, training the turns since the previous such sample. Every
  assistant turn is still trained exactly once, every sample is the template's own
  rendering of a real conversation prefix, and no reasoning is lost; earlier turns
  repeat as (unsupervised) context. ``"template"`` trains what the whole rendering
  shows (one sample per conversation).

``encode_record`` returns a conversation's samples and counts the supervised tokens
and reasoning tokens each policy keeps. With ``split_long=True`` a sample longer than
``max_ids`` becomes several, cut at turn boundaries (see ``ChatEncoder.split_long``).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bridge_sft.data.formats import Conversation, DataError, RecordError, normalize_messages

logger = logging.getLogger(__name__)

TRAIN_ON = ("assistant", "last_assistant", "all")
EMPTY_THINK = ("mask", "train")
REASONING_HISTORY = ("split", "template")
GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*")
TEXT_FIELDS = ("content", "reasoning_content", "thinking")
REASONING_FIELDS = ("reasoning_content", "thinking")
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_fn", "description": "probe", "parameters": {
        "type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}]
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


@dataclass
class EncodedRecord:
    """The samples of one conversation and what each policy keeps (token counts).

    ``samples``: ``(input_ids int64 [n], loss_mask uint8 [n])`` pairs, unshifted, in
    conversation order. Counts are supervised LABELS (a sample's first token is never
    one): ``supervised_full`` in the whole, uncut samples of the reasoning policy;
    ``supervised_truncate`` / ``supervised_drop`` what ``truncation="truncate"`` /
    ``"drop"`` would keep of them at ``max_ids``; ``supervised_split`` what the samples
    returned keep under ``split_long`` (None without it). ``reasoning_*``: supervised
    tokens inside reasoning blocks under the chosen policy (``reasoning_trained``) and
    under ``reasoning_history="template"`` / ``"split"``. ``split_pieces``: samples made
    by ``reasoning_history="split"``; ``split_long``: extra samples made by cutting long
    ones (a sample is still longer than ``max_ids`` where a single exchange is: the
    caller truncates it, counted).
    """

    samples: list[tuple[np.ndarray, np.ndarray]]
    supervised_full: int = 0
    supervised_truncate: int = 0
    supervised_drop: int = 0
    supervised_split: int | None = None
    reasoning_trained: int = 0
    reasoning_template: int = 0
    reasoning_split: int = 0
    split_pieces: int = 1
    split_long: int = 0


class ChatEncoder:
    """Encodes conversations with one tokenizer and chat template (see the module docstring).

    ``tokenizer``: a fast (Rust-backed) HF tokenizer, or its ``TokenizerSpec``.
    ``chat_template``: overrides the tokenizer's (a template string).
    ``template_kwargs``: extra variables for the template (``enable_thinking``,
    ``date_string``, ...). ``train_reasoning``: supervise reasoning blocks (True) or
    only the rest of each assistant turn. ``reasoning_history``: ``"split"`` or
    ``"template"`` (module docstring).
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        train_on: str = "assistant",
        empty_think: str = "mask",
        train_reasoning: bool = True,
        reasoning_history: str = "split",
        name: str | None = None,
    ):
        if train_on not in TRAIN_ON:
            raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        if empty_think not in EMPTY_THINK:
            raise DataError(f"empty_think must be one of {', '.join(EMPTY_THINK)}, not {empty_think!r}")
        if reasoning_history not in REASONING_HISTORY:
            raise DataError(
                f"reasoning_history must be one of {', '.join(REASONING_HISTORY)}, not {reasoning_history!r}"
            )
        if not isinstance(train_reasoning, bool):
            raise DataError(f"train_reasoning must be true or false, not {train_reasoning!r}")
        spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec.from_tokenizer(tokenizer, name)
        self.spec = spec
        self.train_on = train_on
        self.empty_think = empty_think
        self.train_reasoning = train_reasoning
        self.reasoning_history = reasoning_history
        self.name = name or spec.name
        self._backend = _backend(spec)

        template = chat_template if chat_template is not None else spec.chat_template
        if not template:
            raise DataError(
                f"tokenizer {self.name} has no chat template; give one with chat_template=PATH.jinja "
                "(CLI: --chat-template), or use a tokenizer directory whose tokenizer_config.json or "
                "chat_template.jinja has one"
            )
        self._templates = dict(template) if isinstance(template, dict) else {"default": template}
        self.template_kwargs = {**spec.special_tokens_map, **(template_kwargs or {})}
        self._special_ids = spec.special_ids
        self._skeletons: OrderedDict[str, _Skeleton | None] = OrderedDict()
        self._probes: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._arguments: dict[str, str] = {}
        self._glues: dict[str, str | None] = {}
        self.fallbacks: dict[str, str] = {}  # template key -> name of the training variant used
        if train_on != "all":
            self._use_training_variants()

    # ------------------------------------------------------------------ public

    def has_generation_marks(self, tools: Any = None) -> bool:
        return GENERATION_RE.search(self._template(tools)) is not None

    def encode(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int64 [n], loss_mask uint8 [n])`` of one validated conversation rendered whole."""
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

    def encode_records(
        self, convs: Sequence[Conversation], max_ids: int | None = None, split_long: bool = False
    ) -> list[EncodedRecord | RecordError]:
        """``encode_record`` for many conversations (the whole samples tokenised in one batch)."""
        planned: list[list[tuple[Conversation, str, list, list]] | RecordError] = []
        for conv in convs:
            try:
                pieces = self._pieces(conv, split=self.reasoning_history == "split" and self.train_reasoning)
                planned.append([(p, *self._render(p)) for p in pieces])
            except RecordError as exc:
                planned.append(exc)
        texts = [t for plan in planned if not isinstance(plan, RecordError) for _, t, _, _ in plan]
        encodings = iter(self._backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out: list[EncodedRecord | RecordError] = []
        for conv, plan in zip(convs, planned):
            if isinstance(plan, RecordError):
                out.append(plan)
                continue
            try:
                out.append(self._record(conv, [(p, next(encodings), s, r) for p, _, s, r in plan],
                                        max_ids=max_ids, split_long=split_long))
            except RecordError as exc:
                out.append(exc)
        return out

    def encode_record(self, conv: Conversation, max_ids: int | None = None,
                      split_long: bool = False) -> EncodedRecord:
        """The samples of one conversation under the reasoning policy, and, with ``split_long``,
        every sample longer than ``max_ids`` ids cut at turn boundaries (``split_long``)."""
        result = self.encode_records([conv], max_ids, split_long)[0]
        if isinstance(result, RecordError):
            raise result
        return result

    def render_with_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and its supervised character spans ``[start, end)``."""
        text, spans, _ = self._render(conv)
        return text, spans

    def render(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        """The template's text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, _ = render_jinja_template(
                conversations=[self._for_template(messages, tools)],
                tools=tools,
                chat_template=self._template(tools),
                add_generation_prompt=add_generation_prompt,
                **self.template_kwargs,
            )
        except Exception as exc:  # jinja2.TemplateError, raise_exception(), TypeError in filters ...
            raise RecordError("template_error", f"the chat template failed on this conversation: {exc}") from None
        return texts[0]

    # ------------------------------------------------------------------ samples

    def _render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """Text, supervised spans and reasoning spans (both ``[start, end)`` in characters)."""
        conv = self._train_on_last(conv)
        reasoning: list[tuple[int, int]] = []
        if self.train_on != "all" and self.has_generation_marks(conv.tools):
            text, spans = self._render_marked(conv)
            reasoning = [r for r in (self._reasoning_in(text, a, b, m, conv.tools)
                                     for (a, b), m in zip(spans, self._marked_messages(conv, spans)))
                         if isinstance(r, tuple)]
        else:
            text = self.render(conv.messages, conv.tools)
            if self.train_on == "all":
                return text, [(0, len(text))], []
            spans = []
            for message, span in zip(conv.messages, self._assistant_turns(conv, text)):
                if span is None:
                    continue
                r = self._reasoning_in(text, span[0], span[1], message, conv.tools)
                if isinstance(r, tuple):
                    reasoning.append(r)
                spans.append(span)
        if not spans:
            raise RecordError("no_supervised_tokens", "no assistant turn to train on is left in the rendered text")
        if self.train_on == "last_assistant":
            spans = spans[-1:]
            reasoning = [r for r in reasoning if r[0] >= spans[0][0]]
        if not self.train_reasoning and reasoning:
            spans = _subtract(spans, reasoning)
            if not spans:
                raise RecordError("no_supervised_tokens",
                                  "train_reasoning=false leaves no supervised token (the turns hold only reasoning)")
        return text, spans, reasoning

    def _marked_messages(self, conv: Conversation, spans: list) -> list[dict | None]:
        """The trainable assistant message of each generation span (None where they cannot be paired)."""
        trainable = [m for m, t in zip(conv.messages, conv.trainable) if m["role"] == "assistant" and t]
        return trainable if len(trainable) == len(spans) else [None] * len(spans)

    def _train_on_last(self, conv: Conversation) -> Conversation:
        """``train_on="last_assistant"``: only the last trainable assistant turn stays trainable."""
        if self.train_on != "last_assistant":
            return conv
        last = max((i for i, (m, t) in enumerate(zip(conv.messages, conv.trainable))
                    if t and m["role"] == "assistant"), default=None)
        return Conversation(conv.messages, conv.tools, [i == last for i in range(len(conv.messages))])

    def _pieces(self, conv: Conversation, split: bool) -> list[Conversation]:
        """The samples ``reasoning_history="split"`` makes of a conversation (module docstring); one
        piece, the conversation itself, when no trainable turn's reasoning is dropped (or not ``split``)."""
        conv = self._train_on_last(conv)
        if not split or self.train_on == "all" or not any(_reasoning_text(m) for m in conv.messages):
            return [conv]
        text = self.render(conv.messages, conv.tools)
        if self.has_generation_marks(conv.tools):
            spans = dict(zip([i for i, (m, t) in enumerate(zip(conv.messages, conv.trainable))
                              if m["role"] == "assistant" and t], self._render_marked(conv)[1]))
        else:
            spans = dict(enumerate(self._assistant_turns(conv, text)))
        cuts = []
        for j, (message, trainable) in enumerate(zip(conv.messages, conv.trainable)):
            if not trainable or message["role"] != "assistant" or not _reasoning_text(message):
                continue
            span = spans.get(j)
            if span is not None and self._reasoning_in(text, span[0], span[1], message, conv.tools) != "dropped":
                continue
            prefix = Conversation(conv.messages[: j + 1], conv.tools, [False] * j + [True])
            try:
                prefix_text, prefix_spans, prefix_reasoning = self._render(prefix)
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

    def _record(self, original: Conversation, conv_plan, max_ids: int | None, split_long: bool) -> EncodedRecord:
        """Arrays and counts of a conversation's pieces (``conv_plan``: piece, encoding, spans, reasoning)."""
        record = EncodedRecord(samples=[], split_pieces=len(conv_plan))
        split_kept = 0
        for conv, enc, spans, reasoning in conv_plan:
            ids, mask = self._to_arrays(enc, spans)
            n_reasoning = self._reasoning_count(enc, mask, reasoning)
            record.reasoning_trained += n_reasoning
            labels = int(mask[1:].sum())
            record.supervised_full += labels
            if max_ids is not None and len(ids) > max_ids:
                record.supervised_truncate += int(mask[1:max_ids].sum())
            else:
                record.supervised_truncate += labels
                record.supervised_drop += labels
            if split_long and max_ids is not None and len(ids) > max_ids and self.train_on != "all":
                parts = self.split_long(conv, max_ids)
                record.split_long += len(parts) - 1
                for part_ids, part_mask in parts:
                    record.samples.append((part_ids, part_mask))
                    split_kept += int(part_mask[1:max_ids].sum())
            else:
                record.samples.append((ids, mask))
                split_kept += int(mask[1:max_ids].sum()) if max_ids is not None else labels
        if split_long:
            record.supervised_split = split_kept
        # What the other reasoning policy would train (extra renderings only where reasoning is split).
        record.reasoning_template = record.reasoning_split = record.reasoning_trained
        if self.train_reasoning and len(conv_plan) > 1:
            record.reasoning_template = self._reasoning_tokens(original)
        elif self.train_reasoning and self.reasoning_history == "template":
            pieces = self._pieces(original, split=True)
            if len(pieces) > 1:
                record.reasoning_split = sum(self._reasoning_tokens(p) for p in pieces)
        return record

    def _reasoning_tokens(self, conv: Conversation) -> int:
        try:
            text, spans, reasoning = self._render(conv)
        except RecordError:
            return 0
        enc = self._backend.encode(text, add_special_tokens=False)
        _, mask = self._to_arrays(enc, spans)
        return self._reasoning_count(enc, mask, reasoning)

    def _reasoning_count(self, enc, mask: np.ndarray, reasoning: list[tuple[int, int]]) -> int:
        """Supervised tokens whose first character lies in a reasoning span."""
        if not reasoning or not len(mask):
            return 0
        starts = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        inside = np.zeros(len(mask), dtype=bool)
        for a, b in reasoning:
            inside |= (starts >= a) & (starts < b)
        return int((inside & (mask == 1)).sum())

    def split_long(self, conv: Conversation, max_ids: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A conversation longer than ``max_ids`` ids as several samples ``(ids, mask)``.

        Each sample is the template's rendering of ``[system messages] + messages[a:b]``: it
        starts at a user turn (after the leading system/developer messages, always kept),
        ends after a trainable assistant turn, and trains the trainable assistant turns in
        ``[previous b, b)``; ``b`` is the furthest end whose sample fits with no more context
        than those turns, then ``a`` moves back one user turn at a time while the sample
        still fits (the most recent context first). So every trainable turn is trained in
        exactly one sample, and each sample carries as much preceding conversation as fits.
        A sample that does not fit even without context (a single exchange longer than
        ``max_ids``) is returned whole: the caller cuts it as ``truncation="truncate"`` does
        (counted). Lengths are measured by rendering and tokenising candidate samples.
        """
        msgs, flags = conv.messages, conv.trainable
        n_sys = 0
        while n_sys < len(msgs) and msgs[n_sys]["role"] in ("system", "developer"):
            n_sys += 1
        ends = [i + 1 for i in range(n_sys, len(msgs)) if flags[i] and msgs[i]["role"] == "assistant"]
        starts = [i for i in range(n_sys, len(msgs)) if msgs[i]["role"] == "user"] or [n_sys]
        lengths: dict[tuple[int, int], int] = {}

        def window(a: int, b: int, trained_from: int) -> Conversation:
            return Conversation(msgs[:n_sys] + msgs[a:b], conv.tools,
                                [False] * n_sys + [flags[i] and i >= trained_from for i in range(a, b)])

        def length(a: int, b: int) -> int:
            if (a, b) not in lengths:
                try:
                    text = self.render(msgs[:n_sys] + msgs[a:b], conv.tools)
                    lengths[(a, b)] = len(self._backend.encode(text, add_special_tokens=False).ids)
                except RecordError:
                    lengths[(a, b)] = max_ids + 1  # a window the template rejects is never chosen
            return lengths[(a, b)]

        out: list[tuple[np.ndarray, np.ndarray, int]] = []
        done = n_sys  # messages before this index are trained already
        while True:
            pending = [b for b in ends if b > done]
            if not pending:
                break
            # The window starts at the last user turn at or before the first turn to train.
            a0 = max([s for s in starts if s <= done] or [done])
            # Lengths grow with the window: binary searches for the furthest end, then the earliest start.
            k = _last_true(len(pending), lambda i: length(a0, pending[i]) <= max_ids)
            b = pending[max(k, 0)]
            a = a0
            if k >= 0:
                earlier = [s for s in starts if s < a0]
                i = _first_true(len(earlier), lambda i: length(earlier[i], b) <= max_ids)
                if i < len(earlier):
                    a = earlier[i]
            try:
                ids, mask = self.encode(window(a, b, done))
            except RecordError:
                ids, mask = self.encode(window(a0, b, done))
            out.append((ids, mask))
            done = b
        return out

    # ------------------------------------------------------------------ helpers

    def _template(self, tools: Any) -> str:
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise DataError(f"tokenizer {self.name}: no 'default' chat template among {', '.join(self._templates)}")

    def _use_training_variants(self) -> None:
        """Replace each template whose assistant turns cannot be located (and that has no
        generation marks) by a known training variant of it, if there is one (one warning)."""
        from bridge_sft.data.templates import training_variant

        for key, template in list(self._templates.items()):
            if GENERATION_RE.search(template):
                continue
            tools = _PROBE_TOOLS if key == "tool_use" else None
            try:
                self._probe(tools)
                continue
            except DataError as exc:
                why = str(exc)
            variant = training_variant(template)
            if variant is None:
                continue  # encode() raises the probe's error, with the fix
            name, text = variant
            self._templates[key] = text
            self._probes.pop(template, None)
            self.fallbacks[key] = name
            _announce(f"chat template of {self.name}: {why.split(': ', 1)[-1].split('. Add')[0]}; using the known "
                      f"training variant {name} of the same template (it marks the assistant output with "
                      "{% generation %})")

    def _for_template(self, messages: list[dict], tools: Any) -> list[dict]:
        """Messages as the template expects them: reasoning under both names, tool-call
        arguments as objects or JSON strings (whichever form the template renders)."""
        if self._template(tools) not in self._arguments:
            self._probe_arguments(tools)
        form = self._arguments.get(self._template(tools))
        out = []
        for message in messages:
            if message["role"] == "assistant":
                reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f)), None)
                if reasoning is not None and not all(message.get(f) == reasoning for f in REASONING_FIELDS):
                    message = {**message, **{f: reasoning for f in REASONING_FIELDS}}
                if form and message.get("tool_calls"):
                    message = {**message, "tool_calls": [_tool_call_as(call, form) for call in message["tool_calls"]]}
            out.append(message)
        return out

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
                conversations=[self._for_template(conv.messages, conv.tools)],
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

    # ---- reasoning blocks

    def _reasoning_in(self, text: str, start: int, end: int, message: dict | None, tools: Any):
        """The reasoning block ``(start, end)`` of an assistant body ``text[start:end]``; None if
        the message has no reasoning, ``"dropped"`` if the template did not render it here."""
        reasoning = _reasoning_text(message) if message is not None else None
        if not reasoning:
            return None
        for v in _variants(reasoning):
            if v.strip():
                at = text.find(v, start, end)
                if at >= 0:
                    break
        else:
            return "dropped"
        stop = at + len(v)
        glue = self._reasoning_glue(tools)
        if glue and text.startswith(glue, stop) and stop + len(glue) <= end:
            stop += len(glue)
        return start, stop

    def _reasoning_glue(self, tools: Any) -> str | None:
        """Template text that closes a reasoning block (between the reasoning and the part a
        turn without reasoning also has before its content); None if reasoning is not rendered."""
        key = self._template(tools)
        if key in self._glues:
            return self._glues[key]
        r, a = "@@BSFTprobeR@@", "@@BSFTprobeA@@"
        glue = None
        try:
            user = {"role": "user", "content": "@@BSFTprobeU@@"}
            with_r = self.render([user, {"role": "assistant", "content": a, "reasoning_content": r}], tools)
            without = self.render([user, {"role": "assistant", "content": a}], tools)
            header, _ = self._probe(tools) if not self.has_generation_marks(tools) else ("", ())
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
        self._glues[key] = glue
        return glue

    # ---- templates without generation marks

    def _probe(self, tools: Any) -> tuple[str, tuple[str, ...]]:
        """``(G, EOTS)``: the assistant header text and the end-of-turn texts (see module docstring)."""
        key = self._template(tools)
        if key in self._probes:
            return self._probes[key]
        self._probe_arguments(tools)
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
        if header[len(_common_prefix(header, user_end)):].strip():
            header = header[len(_common_prefix(header, user_end)):]  # drop the user turn's own ending
        # else: the user turn's ending is all the prompt there is (Mistral: "[/INST]")
        if "<think>" in header and header[: header.index("<think>")].strip():
            # A generation prompt that opens a reasoning block (Nemotron: "assistant\n<think>\n"):
            # the block belongs to the turn's body, where the reasoning policies apply.
            header = header[: header.index("<think>")]
        if not header.strip():
            raise self._unsupported("no assistant header is shared by the generation prompt and rendered turns")
        final_turn, mid_turn = final[final.index(a):], mid[mid.index(a): mid.index(u2)]
        tail_final, tail_mid = final_turn[len(a):], mid_turn[len(a):]
        # The turn ends with the last special token the final and a middle assistant turn share
        # after the content ("<|im_end|>" of "<|im_end|>\n", both of "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
        # or, where they share none, with the first special token of each (gpt-oss: "<|return|>", "<|end|>").
        shared = _common_prefix(tail_final, tail_mid)
        ends = self._special_ends(shared)
        if ends:
            eots = (shared[: ends[-1]],)
        else:
            firsts = [self._special_ends(t)[:1] for t in (tail_final, tail_mid)]
            if not all(firsts):
                raise self._unsupported(
                    f"no end-of-turn special token follows an assistant turn (after the content: {tail_final!r})"
                )
            eots = tuple(dict.fromkeys(t[: f[0]] for t, f in zip((tail_final, tail_mid), firsts)))
        eots = eots + self._tool_call_end(tools, eots)
        self._probes[key] = (header, eots)
        return header, eots

    def _special_ends(self, text: str) -> list[int]:
        """End offsets of the special tokens in ``text``."""
        enc = self._backend.encode(text, add_special_tokens=False)
        return [end for token_id, (_, end) in zip(enc.ids, enc.offsets) if token_id in self._special_ids]

    def _after_special_run(self, text: str, start: int, stop: int) -> int:
        """End of the first run of adjacent special tokens in ``text[start:stop]`` (-1 if none)."""
        enc = self._backend.encode(text[start:stop], add_special_tokens=False)
        end = -1
        for token_id, (a, b) in zip(enc.ids, enc.offsets):
            if token_id in self._special_ids and (end < 0 or a == end):
                end = b
            elif end >= 0:
                break
        return start + end if end >= 0 else -1

    def _probe_arguments(self, tools: Any) -> None:
        """Whether the template renders tool-call arguments given as objects (HF's convention)
        or only as JSON strings (DeepSeek-V3 concatenates them); records the form it takes."""
        key = self._template(tools)
        if key in self._arguments:
            return
        self._arguments[key] = ""
        for form in ("object", "string"):
            self._arguments[key] = form
            try:
                self.render(_tool_probe(form)[0], tools or _PROBE_TOOLS)
                return
            except RecordError:
                continue
        self._arguments[key] = ""

    def _tool_call_end(self, tools: Any, eots: tuple[str, ...]) -> tuple[str, ...]:
        """The end of a tool-call turn where none of ``eots`` ends it (gpt-oss: ``<|call|>``)."""
        form = self._arguments.get(self._template(tools))
        if not form:
            return ()
        messages, arg, result = _tool_probe(form)
        try:
            text = self.render(messages, tools or _PROBE_TOOLS)
        except RecordError:
            return ()
        if arg not in text or result not in text:
            return ()
        between = text[text.index(arg) + len(arg): text.index(result)]
        if any(e in between for e in eots):
            return ()
        ends = self._special_ends(between)
        if not ends:
            return ()
        first = between[: ends[0]]
        enc = self._backend.encode(first, add_special_tokens=False)
        start = enc.offsets[-1][0]
        return (first[start:],)

    def _unsupported(self, why: str) -> DataError:
        return DataError(
            f"cannot locate assistant turns in the chat template of {self.name}: {why}. Add {{% generation %}} / "
            "{% endgeneration %} marks around the assistant output in the template (chat_template=...), "
            "or train on every token (train_on='all')"
        )

    def _assistant_turns(self, conv: Conversation, text: str) -> list[tuple[int, int] | None]:
        """Supervised span of each trainable assistant message (None for the others), in ``text``."""
        header, eots = self._probe(conv.tools)
        spans = None
        skeleton = self._skeleton(conv, header, eots)
        if skeleton is not None:
            spans = skeleton.align(self._for_template(conv.messages, conv.tools), text)
        if spans is None:
            spans = self._spans_by_prefixes(conv, text, eots)
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

    def _skeleton(self, conv: Conversation, header: str, eots: tuple[str, ...]) -> "_Skeleton | None":
        key = _shape_key(conv)
        if key in self._skeletons:
            self._skeletons.move_to_end(key)
            return self._skeletons[key]
        skeleton = _Skeleton.build(self, conv, header, eots)
        self._skeletons[key] = skeleton
        if len(self._skeletons) > _SKELETON_CACHE_SIZE:
            self._skeletons.popitem(last=False)
        return skeleton

    def _spans_by_prefixes(self, conv: Conversation, text: str, eots) -> list[tuple[int, int] | None]:
        """Fallback: each assistant turn starts where the rendered prompt before it (with the
        generation prompt) ends, and ends at its end-of-turn token."""
        eots = (eots,) if isinstance(eots, str) else tuple(eots)
        spans: list[tuple[int, int] | None] = []
        header, _ = self._probe(conv.tools)
        for j, message in enumerate(conv.messages):
            if message["role"] != "assistant":
                spans.append(None)
                continue
            before = self.render(conv.messages[:j], conv.tools) if j else ""
            prompt = self.render(conv.messages[:j], conv.tools, add_generation_prompt=True) if j else None
            if prompt is not None and text.startswith(prompt):
                # The generation prompt is what the model is given; DeepSeek-V3's turn after tool
                # outputs has no assistant header, and its prompt none either.
                start = len(prompt)
            elif text.startswith(before) and text.find(header, len(before)) >= 0:
                start = text.find(header, len(before)) + len(header)
            elif not text.startswith(before):
                raise self._unsupported(
                    f"the conversation up to message {j} renders differently on its own than inside the whole "
                    "conversation"
                )
            else:  # no header at all (DeepSeek-V3's second tool-call turn): the body starts right there
                start = len(before)
            through = self.render(conv.messages[: j + 1], conv.tools)
            end = -1
            if text.startswith(through):
                end = max((p + len(e) for e in eots for p in [text.rfind(e, start, len(through))] if p >= 0),
                          default=-1)
            if end < 0:  # the template renders this turn differently when it is the last one
                end = min((p + len(e) for e in eots for p in [text.find(e, start)] if p >= 0), default=-1)
            if end < 0:
                raise self._unsupported(f"the end of assistant message {j} was not found")
            spans.append((start, end))
        return spans


_ANNOUNCED: set[str] = set()
QUIET = {"fallback": False}  # worker processes set it: the main process has said it already


def _announce(message: str) -> None:
    if message not in _ANNOUNCED and not QUIET["fallback"]:
        _ANNOUNCED.add(message)
        logger.warning(message)


def _reasoning_text(message: dict) -> str | None:
    for f in REASONING_FIELDS:
        v = message.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _tool_call_as(call: Any, form: str) -> Any:
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


def _tool_probe(form: str) -> tuple[list[dict], str, str]:
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


def _last_true(n: int, fits) -> int:
    """The largest ``i < n`` with ``fits(i)``, for a ``fits`` true up to some point (-1 if none)."""
    lo, hi = -1, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _first_true(n: int, fits) -> int:
    """The smallest ``i < n`` with ``fits(i)``, for a ``fits`` true from some point on (``n`` if none)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
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
    def build(cls, encoder: ChatEncoder, conv: Conversation, header: str, eots) -> "_Skeleton | None":
        eots = (eots,) if isinstance(eots, str) else tuple(eots)
        fields: list[tuple[int, str]] = []
        messages = []
        for j, message in enumerate(encoder._for_template(conv.messages, conv.tools)):
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
                start = encoder._after_special_run(s, cursor, header_limit)
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
