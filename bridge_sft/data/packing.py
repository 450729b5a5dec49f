"""Packing variable-length samples into fixed-size bins (best-fit decreasing).

A sample of ``n`` token ids occupies ``n - 1`` slots in a pack (the dataset
shifts labels inside each sample: ``tokens = ids[:-1]``, ``labels = ids[1:]``),
rounded up to a multiple of ``pad_seq_to_mult`` for context parallelism.

Best-fit decreasing: samples in decreasing length order each go into the open
bin with the least room that still fits them, or into a new bin. Open bins are
kept in buckets by remaining room, so a placement costs O(log seq_length).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackPlan:
    """``items[offsets[p]:offsets[p+1]]`` are the sample indices of pack ``p``, in slot order.

    ``slots``: slots each sample occupies (``int64 [num_samples]``, indexed like the
    samples passed to ``pack_best_fit``); ``capacity``: slots per pack.
    """

    offsets: np.ndarray
    items: np.ndarray
    capacity: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pack(self, p: int) -> np.ndarray:
        return self.items[self.offsets[p]: self.offsets[p + 1]]


def slots_needed(lengths: np.ndarray, pad_seq_to_mult: int = 1) -> np.ndarray:
    """Slots per sample: ``len(ids) - 1`` rounded up to a multiple of ``pad_seq_to_mult``."""
    slots = np.asarray(lengths, dtype=np.int64) - 1
    if pad_seq_to_mult > 1:
        slots = -(-slots // pad_seq_to_mult) * pad_seq_to_mult
    return slots


def pack_best_fit(slots: np.ndarray, capacity: int) -> PackPlan:
    """Best-fit-decreasing packing of samples needing ``slots[i]`` slots into bins of ``capacity``.

    Deterministic: ties in length keep index order. Raises ``ValueError`` if a
    sample does not fit in one bin.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if len(slots) and int(slots.max()) > capacity:
        i = int(slots.argmax())
        raise ValueError(f"sample {i} needs {int(slots[i])} slots but a pack has only {capacity}")
    if len(slots) and int(slots.min()) < 1:
        raise ValueError("every sample needs at least one slot (two token ids)")
    order = np.argsort(-slots, kind="stable")
    bins: list[list[int]] = []
    # Remaining room -> bins with exactly that room; ``rooms`` lists the rooms that have bins, sorted.
    buckets: dict[int, list[int]] = {}
    rooms: list[int] = []
    for i, need in zip(order.tolist(), slots[order].tolist()):
        k = bisect.bisect_left(rooms, need)
        if k == len(rooms):
            b = len(bins)
            bins.append([i])
            room = capacity - need
        else:
            room = rooms[k]
            bucket = buckets[room]
            b = bucket.pop()
            if not bucket:
                del buckets[room]
                rooms.pop(k)
            bins[b].append(i)
            room -= need
        if room > 0:
            if room not in buckets:
                buckets[room] = []
                bisect.insort(rooms, room)
            buckets[room].append(b)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in bins])
    items = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(offsets[-1]))
    return PackPlan(offsets, items, capacity)


def packing_efficiency(real_tokens: int, num_packs: int, capacity: int) -> float:
    """Real (non-padding) token slots over all slots of the packs."""
    return real_tokens / (num_packs * capacity) if num_packs else 0.0
