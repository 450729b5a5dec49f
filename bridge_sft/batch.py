"""Micro-batch normalisation shared by the forward step and the tests (torch only, no megatron)."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # HF convention for "no loss at this position"

_SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def normalize_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Bring a micro-batch into the form ``get_batch`` and the model expect.

    - ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` of shape ``[seq]``
      become ``[1, seq]``;
    - labels equal to -100 get ``loss_mask = 0`` and the valid token id 0
      (megatron-core's cross-entropy has no ignore_index: a -100 label would
      give a finite, non-zero loss, or an index error on GPU);
    - a missing ``loss_mask`` is ``labels != -100`` (float);
    - missing ``position_ids`` are ``0..seq-1`` per row, restarting at every
      packed-sequence boundary when ``cu_seqlens_q`` is present.
    """
    batch = dict(batch)
    for key in _SEQUENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            batch[key] = value.unsqueeze(0)

    labels = batch["labels"]
    ignored = labels == IGNORE_INDEX
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        loss_mask = torch.ones(labels.shape, dtype=torch.float32)
    if ignored.any():
        batch["labels"] = labels.masked_fill(ignored, 0)
        loss_mask = loss_mask.masked_fill(ignored, 0)
    batch["loss_mask"] = loss_mask

    if batch.get("position_ids") is None:
        batch["position_ids"] = _position_ids(batch["tokens"], batch.get("cu_seqlens_q"))
    return batch


def _position_ids(tokens: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    batch_size, seq_len = tokens.shape
    positions = torch.arange(seq_len, dtype=torch.long).expand(batch_size, seq_len).clone()
    if cu_seqlens is not None:
        for row, bounds in enumerate(cu_seqlens.view(batch_size, -1).tolist()):
            for start, end in zip(bounds[:-1], bounds[1:]):
                positions[row, start:end] -= start
    return positions
