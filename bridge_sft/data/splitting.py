"""Splitting a conversation longer than the sequence length into samples cut at turn
boundaries (``truncation="split"``).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np

from bridge_sft.data.formats import Conversation, RecordError
from bridge_sft.data.tokenizer import to_arrays

if TYPE_CHECKING:
    from bridge_sft.data.encoding import ChatEncoder


def split_long(encoder: "ChatEncoder", conv: Conversation, max_ids: int) -> list[tuple[np.ndarray, np.ndarray]]:
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
    (counted). Lengths are measured by rendering and tokenising candidate samples; the
    chosen sample reuses its candidate's tokens (its text is the same).
    """
    msgs, flags = conv.messages, conv.trainable
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys]["role"] in ("system", "developer"):
        n_sys += 1
    ends = [i + 1 for i in range(n_sys, len(msgs)) if flags[i] and msgs[i]["role"] == "assistant"]
    starts = [i for i in range(n_sys, len(msgs)) if msgs[i]["role"] == "user"] or [n_sys]
    lengths: dict[tuple[int, int], int] = {}
    encoded: dict[tuple[int, int], tuple[str, object]] = {}  # window -> its text and tokens

    def window(a: int, b: int, trained_from: int) -> Conversation:
        return Conversation(msgs[:n_sys] + msgs[a:b], conv.tools,
                            [False] * n_sys + [flags[i] and i >= trained_from for i in range(a, b)])

    def length(a: int, b: int) -> int:
        if (a, b) not in lengths:
            try:
                text = encoder.renderer.render(msgs[:n_sys] + msgs[a:b], conv.tools)
                enc = encoder.backend.encode(text, add_special_tokens=False)
                encoded[(a, b)] = (text, enc)
                lengths[(a, b)] = len(enc.ids)
            except RecordError:
                lengths[(a, b)] = max_ids + 1  # a window the template rejects is never chosen
        return lengths[(a, b)]

    def encode(a: int, b: int, trained_from: int) -> tuple[np.ndarray, np.ndarray]:
        text, spans, _ = encoder.render_sample(window(a, b, trained_from))
        hit = encoded.get((a, b))
        enc = hit[1] if hit is not None and hit[0] == text else encoder.backend.encode(text, add_special_tokens=False)
        return to_arrays(enc, spans)

    out: list[tuple[np.ndarray, np.ndarray]] = []
    done = n_sys  # messages before this index are trained already
    while True:
        pending = [b for b in ends if b > done]
        if not pending:
            break
        # The window starts at the last user turn at or before the first turn to train.
        a0 = max([s for s in starts if s <= done] or [done])
        # Lengths grow with the window: binary searches for the furthest end (the first that
        # fits, from the furthest down), then the earliest start.
        furthest_first = pending[::-1]
        i = bisect_left(furthest_first, True, key=lambda end: length(a0, end) <= max_ids)
        fits = i < len(pending)
        b = furthest_first[i] if fits else pending[0]
        a = a0
        if fits:
            earlier = [s for s in starts if s < a0]
            i = bisect_left(earlier, True, key=lambda start: length(start, b) <= max_ids)
            if i < len(earlier):
                a = earlier[i]
        try:
            ids, mask = encode(a, b, done)
        except RecordError:
            ids, mask = encode(a0, b, done)
        out.append((ids, mask))
        done = b
    return out
