"""``PreparedData``: the encoded samples of one data set, as flat arrays.

``input_ids`` (uint32) holds all samples' token ids concatenated, ``loss_mask`` (uint8) their
unshifted 0/1 loss masks, ``offsets`` (int64, ``[num_samples + 1]``) where each sample starts
and ends, ``origins`` (int64, ``[num_samples, 2]``) each sample's source index and line/record
index in ``sources``; ``summary`` is the count of what was read, kept, cut and skipped
(``bridge_sft.data.summary``), ``path`` the cache directory when the arrays are memory-mapped
from one (``bridge_sft.data.cache``).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PreparedData:
    """Encoded samples (see the module docstring); arrays may be memory-mapped."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    origins: np.ndarray
    sources: list[str]
    summary: dict[str, Any]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.loss_mask[a:b]

    def origin(self, i: int) -> str:
        src, index = (int(x) for x in self.origins[i])
        name = self.sources[src]
        return f"{name}:{index}" if name.endswith(".jsonl") else f"{name}: record {index}"
