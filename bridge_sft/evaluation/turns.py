"""Held-out conversations read with their locations, and the assistant turns to evaluate in them.

``read_conversations(paths, options)`` reads every record of the data (any source and format
``bridge_sft.data`` reads: the sources, format detection per source and ``to_conversation`` of
training) into ``LocatedConversation``s, each with its record's place (``file:line``). A record
with no assistant turn to train on is skipped and counted (``Skipped``: reason -> places); any
other bad record is a ``DataError`` naming it, as in training with ``on_bad_record="error"``.

``eval_turns(encoder, conversations)`` makes one ``EvalTurn`` per trainable assistant message
(those training supervises; weight-0 turns and the prompt side of prompt/completion records are
context only), with the ``ChatEncoder`` of training (template, training variant, template
variables, reasoning and tool fields):

- the prompt: the conversation before the turn rendered with the generation prompt
  (``ChatEncoder.render(..., add_generation_prompt=True)``) and tokenised as training tokenises
  (the backend, no added special tokens): what a model sees when it must write that turn;
- the teacher-forcing sample: the conversation up to and including the turn, encoded by
  ``ChatEncoder.encode`` with only this turn trainable, so its ``loss_mask`` marks exactly the
  tokens training supervises for the turn (its content, reasoning, tool calls and end-of-turn);
- the reference text: those supervised tokens decoded without special tokens.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bridge_sft.data.chunks import _chunks
from bridge_sft.data.encoding import ChatEncoder, load_tools
from bridge_sft.data.errors import DataError, RecordError
from bridge_sft.data.formats import Conversation, normalize_messages, to_conversation
from bridge_sft.data.options import EncodeOptions
from bridge_sft.data.sources import location, parse_raw, resolve_sources

# Records without a turn to evaluate: skipped and reported, not an error.
SKIPPED_REASONS = ("no_assistant_turn", "no_trainable_turn")


@dataclass
class LocatedConversation:
    """A conversation and the place of its record (``file:line`` or ``file: record N``)."""

    where: str
    conversation: Conversation


@dataclass
class Skipped:
    """Records skipped because they hold no assistant turn to evaluate: reason -> their places."""

    places: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.places.values())

    def describe(self, shown: int = 3) -> str:
        """One line: how many were skipped, why, and where the first ones are."""
        parts = []
        for reason, places in self.places.items():
            more = f" and {len(places) - shown} more" if len(places) > shown else ""
            parts.append(f"{len(places)} with {reason.replace('_', ' ')} ({', '.join(places[:shown])}{more})")
        return "skipped " + "; ".join(parts)


@dataclass
class EvalTurn:
    """One assistant turn to answer. ``turn``: its index in the conversation's messages.
    ``prompt_ids`` / ``target_ids`` / ``target_mask``: plain lists of ints (see the module docstring)."""

    where: str
    turn: int
    prompt_text: str
    prompt_ids: list[int]
    reference: str
    target_ids: list[int]
    target_mask: list[int]


def read_conversations(paths: str | Path | list, options: EncodeOptions) -> tuple[list[LocatedConversation], Skipped]:
    """Every record of the data as a conversation (module docstring); raises ``DataError``."""
    sources = resolve_sources([str(p) for p in paths] if isinstance(paths, (list, tuple)) else str(paths))
    conversations, skipped = [], Skipped()
    default_tools = load_tools(options.tools)
    for chunk in _chunks(sources, options):  # training's reading and per-source format detection
        for index, raw in chunk.items:
            where = location(chunk.source, index)
            try:
                record = parse_raw(raw, chunk.source, index)
                conv = to_conversation(record, chunk.fmt, options.columns, system_prompt=options.system_prompt)
            except RecordError as exc:
                if exc.reason in SKIPPED_REASONS:
                    skipped.places.setdefault(exc.reason, []).append(where)
                    continue
                raise exc.at(where) from None
            if conv.tools is None and default_tools:
                conv.tools = default_tools
            conversations.append(LocatedConversation(where, conv))
    return conversations, skipped


def as_located(conversations: list[Any]) -> list[LocatedConversation]:
    """``LocatedConversation``s from ``LocatedConversation``s, ``Conversation``s or OpenAI-style message
    lists (the last two named ``conversation N``, 1-based)."""
    out = []
    for n, item in enumerate(conversations, 1):
        if isinstance(item, LocatedConversation):
            out.append(item)
            continue
        if not isinstance(item, Conversation):
            messages, trainable = normalize_messages(item)
            item = Conversation(messages, None, trainable)
        out.append(LocatedConversation(f"conversation {n}", item))
    return out


def eval_turns(encoder: ChatEncoder, conversations: list[LocatedConversation],
               decode: Callable[[list[int]], str] | None = None) -> list[EvalTurn]:
    """One ``EvalTurn`` per trainable assistant message, in data order; a turn the template cannot
    render is a ``DataError`` naming its record. ``decode(ids)``: the reference's text without special
    tokens (default: the encoder's tokenizer; pass the one that decodes the answers)."""
    decode = decode or (lambda ids: encoder.backend.decode(ids, skip_special_tokens=True))
    turns = []
    for item in conversations:
        conv = item.conversation
        for i, (message, trainable) in enumerate(zip(conv.messages, conv.trainable)):
            if message["role"] != "assistant" or not trainable:
                continue
            try:
                prompt_text = encoder.render(conv.messages[:i], conv.tools, add_generation_prompt=True)
                upto = Conversation(conv.messages[: i + 1], conv.tools, [j == i for j in range(i + 1)])
                ids, mask = encoder.encode(upto)
            except RecordError as exc:
                raise DataError(f"{item.where}: assistant turn {i}: {exc.detail}") from None
            prompt_ids = encoder.backend.encode(prompt_text, add_special_tokens=False).ids
            reference = decode(ids[mask.astype(bool)].tolist()).strip()
            turns.append(EvalTurn(item.where, i, prompt_text, list(prompt_ids), reference, ids.tolist(),
                                  mask.tolist()))
    return turns
