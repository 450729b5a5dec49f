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
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bridge_sft.data.formats import Conversation, DataError, RecordError, normalize_messages
from bridge_sft.data.probing import TemplateProbe
from bridge_sft.data.records import EncodedRecord, build_record  # noqa: F401  (re-exported)
from bridge_sft.data.reasoning import (  # noqa: F401  (re-exported)
    EMPTY_THINK_RE,
    ReasoningBlocks,
    history_pieces,
    reasoning_text,
    subtract,
)
from bridge_sft.data.rendering import (  # noqa: F401  (re-exported)
    GENERATION_RE,
    REASONING_FIELDS,
    Renderer,
    load_chat_template,
    load_tools,
)
from bridge_sft.data.spans import TEXT_FIELDS, Skeleton, Skeletons, spans_by_prefixes  # noqa: F401
from bridge_sft.data.splitting import split_long
from bridge_sft.data.tokenizer import (  # noqa: F401  (re-exported)
    TokenizerSpec,
    backend_of,
    to_arrays,
    tokenizer_fingerprint,
)

TRAIN_ON = ("assistant", "last_assistant", "all")
EMPTY_THINK = ("mask", "train")
REASONING_HISTORY = ("split", "template")

Span = tuple[int, int]


@dataclass(frozen=True)
class EncodedConversation:
    """``input_ids`` and ``loss_mask`` (0/1), two equal-length lists of ints, unshifted."""

    input_ids: list[int]
    loss_mask: list[int]


class ChatEncoder:
    """Encodes conversations with one tokenizer and chat template (see the module docstring).

    ``tokenizer``: a fast (Rust-backed) HF tokenizer, or its ``TokenizerSpec``.
    ``chat_template``: overrides the tokenizer's (a template string, or name -> template
    as ``ChatEncoder.templates`` gives them: a worker process is handed the templates its
    parent chose, so it neither probes for nor announces a training variant again).
    ``template_kwargs``: extra variables for the template (``enable_thinking``,
    ``date_string``, ...). ``train_reasoning``: supervise reasoning blocks (True) or
    only the rest of each assistant turn. ``reasoning_history``: ``"split"`` or
    ``"template"`` (module docstring).

    Composes a ``Renderer`` (templates), a ``TemplateProbe`` (header and end-of-turn texts
    of templates without marks), ``Skeletons`` (turn bodies in a rendering) and
    ``ReasoningBlocks``; samples are split by ``reasoning.history_pieces`` and
    ``splitting.split_long``.
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | dict[str, str] | None = None,
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
        self.backend = backend_of(spec)

        template = chat_template if chat_template is not None else spec.chat_template
        if not template:
            raise DataError(
                f"tokenizer {self.name} has no chat template; give one with chat_template=PATH.jinja "
                "(CLI: --chat-template), or use a tokenizer directory whose tokenizer_config.json or "
                "chat_template.jinja has one"
            )
        templates = dict(template) if isinstance(template, dict) else {"default": template}
        self.renderer = Renderer(templates, {**spec.special_tokens_map, **(template_kwargs or {})}, self.name)
        self.probe = TemplateProbe(self.renderer, self.backend, spec.special_ids)
        self.skeletons = Skeletons(self.renderer, self.probe)
        self.reasoning = ReasoningBlocks(self.renderer, self.probe, empty_think)
        # template key -> name of the training variant used
        self.fallbacks: dict[str, str] = self.probe.use_training_variants() if train_on != "all" else {}

    @property
    def templates(self) -> dict[str, str]:
        """The templates in use (name -> text), training variants included."""
        return self.renderer.templates

    _templates = templates

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return self.renderer.template_kwargs

    # ------------------------------------------------------------------ public

    def has_generation_marks(self, tools: Any = None) -> bool:
        return self.renderer.has_generation_marks(tools)

    def encode(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int64 [n], loss_mask uint8 [n])`` of one validated conversation rendered whole."""
        text, spans = self.render_with_spans(conv)
        return to_arrays(self.backend.encode(text, add_special_tokens=False), spans)

    def encode_many(self, convs: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray] | RecordError]:
        """``encode`` for many conversations, tokenising in one batch; a bad one yields its ``RecordError``."""
        rendered: list[tuple[str, list[Span]] | RecordError] = []
        for conv in convs:
            try:
                rendered.append(self.render_with_spans(conv))
            except RecordError as exc:
                rendered.append(exc)
        texts = [r[0] for r in rendered if not isinstance(r, RecordError)]
        encodings = iter(self.backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        return [r if isinstance(r, RecordError) else to_arrays(next(encodings), r[1]) for r in rendered]

    def encode_records(
        self, convs: Sequence[Conversation], max_ids: int | None = None, split_long: bool = False
    ) -> list[EncodedRecord | RecordError]:
        """``encode_record`` for many conversations (the whole samples tokenised in one batch)."""
        planned: list[list[tuple[Conversation, str, list, list]] | RecordError] = []
        for conv in convs:
            try:
                pieces = history_pieces(self, conv, split=self.reasoning_history == "split" and self.train_reasoning)
                planned.append([(p, *self.render_sample(p)) for p in pieces])
            except RecordError as exc:
                planned.append(exc)
        texts = [t for plan in planned if not isinstance(plan, RecordError) for _, t, _, _ in plan]
        encodings = iter(self.backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out: list[EncodedRecord | RecordError] = []
        for conv, plan in zip(convs, planned):
            if isinstance(plan, RecordError):
                out.append(plan)
                continue
            try:
                out.append(build_record(self, conv, [(p, next(encodings), s, r) for p, _, s, r in plan],
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

    def render_with_spans(self, conv: Conversation) -> tuple[str, list[Span]]:
        """The whole rendered conversation and its supervised character spans ``[start, end)``."""
        text, spans, _ = self.render_sample(conv)
        return text, spans

    def render(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        """The template's text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        return self.renderer.render(messages, tools, add_generation_prompt)

    def split_long(self, conv: Conversation, max_ids: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A conversation longer than ``max_ids`` ids as samples cut at turn boundaries
        (``bridge_sft.data.splitting.split_long``)."""
        return split_long(self, conv, max_ids)

    # ------------------------------------------------------------------ samples

    def render_sample(self, conv: Conversation) -> tuple[str, list[Span], list[Span]]:
        """Text, supervised spans and reasoning spans (both ``[start, end)`` in characters) of
        one sample under ``train_on`` and ``train_reasoning``."""
        conv = self.train_on_last(conv)
        reasoning: list[Span] = []
        if self.train_on != "all" and self.has_generation_marks(conv.tools):
            text, spans = self.renderer.render_marked(conv)
            reasoning = [r for r in (self.reasoning.find(text, a, b, m, conv.tools)
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
                r = self.reasoning.find(text, span[0], span[1], message, conv.tools)
                if isinstance(r, tuple):
                    reasoning.append(r)
                spans.append(span)
        if not spans:
            raise RecordError("no_supervised_tokens", "no assistant turn to train on is left in the rendered text")
        if self.train_on == "last_assistant":
            spans = spans[-1:]
            reasoning = [r for r in reasoning if r[0] >= spans[0][0]]
        if not self.train_reasoning and reasoning:
            spans = subtract(spans, reasoning)
            if not spans:
                raise RecordError("no_supervised_tokens",
                                  "train_reasoning=false leaves no supervised token (the turns hold only reasoning)")
        return text, spans, reasoning

    def train_on_last(self, conv: Conversation) -> Conversation:
        """``train_on="last_assistant"``: only the last trainable assistant turn stays trainable."""
        if self.train_on != "last_assistant":
            return conv
        last = max((i for i, (m, t) in enumerate(zip(conv.messages, conv.trainable))
                    if t and m["role"] == "assistant"), default=None)
        return Conversation(conv.messages, conv.tools, [i == last for i in range(len(conv.messages))])

    def _marked_messages(self, conv: Conversation, spans: list) -> list[dict | None]:
        """The trainable assistant message of each generation span (None where they cannot be paired)."""
        trainable = [m for m, t in zip(conv.messages, conv.trainable) if m["role"] == "assistant" and t]
        return trainable if len(trainable) == len(spans) else [None] * len(spans)

    # ------------------------------------------------------------------ templates without marks

    def _assistant_turns(self, conv: Conversation, text: str) -> list[Span | None]:
        """Supervised span of each trainable assistant message (None for the others), in ``text``:
        from the skeleton of the conversation's shape, else by rendering prefixes."""
        header, eots = self._probe(conv.tools)
        spans = None
        skeleton = self._skeleton(conv, header, eots)
        if skeleton is not None:
            spans = skeleton.align(self.renderer.for_template(conv.messages, conv.tools), text)
        if spans is None:
            spans = self._spans_by_prefixes(conv, text, eots)
        out: list[Span | None] = []
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

    def _probe(self, tools: Any) -> tuple[str, tuple[str, ...]]:
        """``(G, EOTS)``: the assistant header text and the end-of-turn texts (module docstring)."""
        return self.probe.markers(tools)

    def _skeleton(self, conv: Conversation, header: str, eots: tuple[str, ...]) -> Skeleton | None:
        return self.skeletons.get(conv, header, eots)

    def _spans_by_prefixes(self, conv: Conversation, text: str, eots) -> list[Span | None]:
        return spans_by_prefixes(self.renderer, self.probe, conv, text, eots)


# --------------------------------------------------------------------------- public API

_ENCODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def get_encoder(tokenizer, *, train_on: str = "assistant", **kwargs) -> ChatEncoder:
    """A cached ``ChatEncoder`` for this tokenizer object and settings."""
    key = (train_on, json.dumps(kwargs, sort_keys=True, default=repr), tokenizer_fingerprint(tokenizer))
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
