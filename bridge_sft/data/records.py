"""The samples one conversation makes and the supervised tokens each policy keeps of them
(``truncation`` at ``max_ids``, ``reasoning_history``), counted for the data summary.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bridge_sft.data.formats import Conversation, RecordError
from bridge_sft.data.reasoning import history_pieces
from bridge_sft.data.tokenizer import count_in_spans, to_arrays

if TYPE_CHECKING:
    from bridge_sft.data.encoding import ChatEncoder


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


def build_record(encoder: "ChatEncoder", original: Conversation, conv_plan, max_ids: int | None,
                 split_long: bool) -> EncodedRecord:
    """Arrays and counts of a conversation's pieces (``conv_plan``: piece, backend encoding,
    supervised spans, reasoning spans, as ``ChatEncoder.encode_records`` plans them)."""
    record = EncodedRecord(samples=[], split_pieces=len(conv_plan))
    split_kept = 0
    for conv, enc, spans, reasoning in conv_plan:
        ids, mask = to_arrays(enc, spans)
        record.reasoning_trained += count_in_spans(enc, mask, reasoning)
        labels = int(mask[1:].sum())
        record.supervised_full += labels
        if max_ids is not None and len(ids) > max_ids:
            record.supervised_truncate += int(mask[1:max_ids].sum())
        else:
            record.supervised_truncate += labels
            record.supervised_drop += labels
        if split_long and max_ids is not None and len(ids) > max_ids and encoder.train_on != "all":
            parts = encoder.split_long(conv, max_ids)
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
    if encoder.train_reasoning and len(conv_plan) > 1:
        record.reasoning_template = _reasoning_tokens(encoder, original)
    elif encoder.train_reasoning and encoder.reasoning_history == "template":
        pieces = history_pieces(encoder, original, split=True)
        if len(pieces) > 1:
            record.reasoning_split = sum(_reasoning_tokens(encoder, p) for p in pieces)
    return record


def _reasoning_tokens(encoder: "ChatEncoder", conv: Conversation) -> int:
    """Supervised reasoning tokens of ``conv`` encoded whole (0 where it cannot be)."""
    try:
        text, spans, reasoning = encoder.render_sample(conv)
    except RecordError:
        return 0
    enc = encoder.backend.encode(text, add_special_tokens=False)
    _, mask = to_arrays(enc, spans)
    return count_in_spans(enc, mask, reasoning)
