"""Map-style torch datasets over prepared samples: the tensors the forward step consumes.

Both datasets have ``len() == num_samples`` (what Bridge asks for): the items
(samples, or packs) are repeated over epochs, each epoch in its own
deterministic order (``numpy`` generator seeded with ``(seed, epoch)``), so
Bridge's sequential ``"single"`` sampler with ``consumed_samples`` resumes
exactly where it stopped, without replaying data.

The label shift happens here: for a sample with ids ``x`` (length ``n``),
``tokens = x[:-1]``, ``labels = x[1:]``, ``loss_mask = mask[1:]`` (aligned to
labels). Padding slots have ``loss_mask = 0`` and the pad token id as token and
label (never -100), and ``padding_mask = True`` (bool [S]; mixture-of-experts routers
leave them out: ``bridge_sft.moe``).

This module imports torch, not megatron.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from bridge_sft.data.cache import PreparedData
from bridge_sft.data.formats import DataError
from bridge_sft.data.packing import PackPlan, slots_needed

logger = logging.getLogger(__name__)

PACKED_KEYS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")


class EpochOrder:
    """Dataset index -> item index, over as many shuffled epochs as ``num_samples`` needs."""

    def __init__(self, num_items: int, num_samples: int | None, seed: int, shuffle: bool):
        self.num_items = num_items
        self.num_samples = num_items if num_samples is None else int(num_samples)
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}
        if self.num_samples and not num_items:
            raise DataError(f"{self.num_samples} samples were asked for, but the split has no data")

    @property
    def epochs(self) -> float:
        return self.num_samples / self.num_items if self.num_items else 0.0

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                perm = np.arange(self.num_items)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        epoch, j = divmod(index, self.num_items)
        return int(self.permutation(epoch)[j])


class SFTDataset(torch.utils.data.Dataset):
    """Unpacked samples, each padded to ``seq_length``.

    ``__getitem__`` returns ``tokens`` int64 [S], ``labels`` int64 [S],
    ``loss_mask`` float32 [S], ``position_ids`` int64 [S], ``padding_mask`` bool [S]
    (S = ``seq_length``).
    ``indices``: the prepared samples in this split.
    """

    def __init__(
        self,
        data: PreparedData,
        indices: np.ndarray,
        seq_length: int,
        *,
        num_samples: int | None = None,
        seed: int = 1234,
        shuffle: bool = True,
        pad_id: int = 0,
        name: str = "train",
    ):
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seq_length = seq_length
        self.pad_id = pad_id
        lengths = data.lengths[self.indices] if len(self.indices) else np.empty(0, np.int64)
        if len(lengths) and int(lengths.max()) > seq_length + 1:
            raise DataError(f"a sample has {int(lengths.max())} ids, more than seq_length + 1 = {seq_length + 1}")
        self.order = EpochOrder(len(self.indices), num_samples, seed, shuffle)
        logger.info(
            "%s: %d samples = %.1f epochs over %d samples", name, self.order.num_samples, self.order.epochs,
            len(self.indices),
        )

    def __len__(self) -> int:
        return self.order.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self.data.sample(int(self.indices[self.order(index)]))
        n = len(ids) - 1
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        tokens[:n] = ids[:-1]
        labels[:n] = ids[1:]
        loss_mask[:n] = mask[1:]
        padding_mask = torch.ones(s, dtype=torch.bool)
        padding_mask[:n] = False
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(s, dtype=torch.int64),
            "padding_mask": padding_mask,
        }


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packs of samples, one pack of ``seq_length`` slots per item (THD, micro-batch size 1).

    ``__getitem__`` returns ``tokens``/``labels``/``position_ids`` int64 [S] and
    ``loss_mask`` float32 [S] (position ids restart at 0 for each sample), ``padding_mask`` bool [S]
    (True on the slots no sample fills), and
    ``cu_seqlens_q`` = ``cu_seqlens_kv`` int32 [n+1]: the sample boundaries,
    starting at 0 and ending at S (trailing padding is a segment of its own);
    ``max_seqlen_q`` = ``max_seqlen_kv`` int32 [1], the longest segment. With
    ``pad_seq_to_mult > 1`` (context parallelism) each sample is padded to a
    multiple of it; ``cu_seqlens_q_padded`` = ``cu_seqlens_kv_padded`` then hold
    the physical boundaries and ``cu_seqlens_q`` the cumulative real lengths
    (Transformer Engine's convention, as in Bridge's packed SFT dataset).
    """

    def __init__(
        self,
        data: PreparedData,
        indices: np.ndarray,
        plan: PackPlan,
        seq_length: int,
        *,
        num_samples: int | None = None,
        seed: int = 1234,
        shuffle: bool = True,
        pad_id: int = 0,
        pad_seq_to_mult: int = 1,
        name: str = "train",
    ):
        if plan.capacity != seq_length:
            raise ValueError(f"pack capacity {plan.capacity} != seq_length {seq_length}")
        if pad_seq_to_mult > 1 and seq_length % pad_seq_to_mult:
            raise DataError(f"seq_length {seq_length} must be a multiple of pad_seq_to_mult {pad_seq_to_mult}")
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.plan = plan
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.pad_seq_to_mult = pad_seq_to_mult
        self.order = EpochOrder(len(plan), num_samples, seed, shuffle)
        logger.info(
            "%s: %d packs = %.1f epochs over %d packs (%d samples)", name, self.order.num_samples,
            self.order.epochs, len(plan), len(self.indices),
        )

    def __len__(self) -> int:
        return self.order.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        members = self.indices[self.plan.pack(self.order(index))]
        s, mult = self.seq_length, self.pad_seq_to_mult
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        padding_mask = np.ones(s, dtype=bool)
        physical, logical = [0], [0]
        pos = 0
        for sample in members.tolist():
            ids, mask = self.data.sample(sample)
            n = len(ids) - 1
            width = -(-n // mult) * mult
            tokens[pos: pos + n] = ids[:-1]
            labels[pos: pos + n] = ids[1:]
            loss_mask[pos: pos + n] = mask[1:]
            padding_mask[pos: pos + n] = False
            position_ids[pos: pos + width] = np.arange(width)
            pos += width
            physical.append(pos)
            logical.append(logical[-1] + n)
        if pos < s:  # trailing padding: a segment of its own
            position_ids[pos:] = np.arange(s - pos)
            physical.append(s)
            logical.append(logical[-1])
        cu_physical = torch.tensor(physical, dtype=torch.int32)
        max_seqlen = torch.tensor([int(np.diff(physical).max())], dtype=torch.int32)
        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "padding_mask": torch.from_numpy(padding_mask),
            "max_seqlen_q": max_seqlen,
            "max_seqlen_kv": max_seqlen,
        }
        if mult > 1:
            cu_logical = torch.tensor(logical, dtype=torch.int32)
            item.update(cu_seqlens_q=cu_logical, cu_seqlens_kv=cu_logical,
                        cu_seqlens_q_padded=cu_physical, cu_seqlens_kv_padded=cu_physical)
        else:
            item.update(cu_seqlens_q=cu_physical, cu_seqlens_kv=cu_physical)
        return item

    @staticmethod
    def collate_fn(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack packs into ``[b, S]``; ``cu_seqlens*`` become ``[b, max n + 1]``, shorter rows
        extended with repeats of their last boundary (zero-length segments), as Bridge does."""
        out = {k: torch.stack([item[k] for item in batch]) for k in batch[0] if k not in PACKED_KEYS}
        for key in PACKED_KEYS:
            if key not in batch[0]:
                continue
            rows = [item[key] for item in batch]
            width = max(len(r) for r in rows)
            out[key] = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])
        return out


def packed_real_tokens(data: PreparedData, indices: np.ndarray) -> int:
    """Real token slots of these samples when packed (``len(ids) - 1`` each)."""
    return int((data.lengths[np.asarray(indices, dtype=np.int64)] - 1).sum())


def plan_packs(data: PreparedData, indices: np.ndarray, seq_length: int, pad_seq_to_mult: int = 1) -> PackPlan:
    """Best-fit-decreasing pack plan over ``indices`` (positions in the plan index ``indices``)."""
    from bridge_sft.data.packing import pack_best_fit

    slots = slots_needed(data.lengths[np.asarray(indices, dtype=np.int64)], pad_seq_to_mult)
    return pack_best_fit(slots, seq_length)
