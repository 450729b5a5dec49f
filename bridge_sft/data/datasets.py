"""Map-style torch datasets over prepared samples: the tensors the forward step consumes.

Both datasets have ``len() == num_samples`` (what Bridge asks for): the items
(samples, or packs) are repeated over epochs, each epoch in its own
deterministic order (``numpy`` generator seeded with ``(seed, epoch)``), so
Bridge's sequential ``"single"`` sampler with ``consumed_samples`` resumes
exactly where it stopped, without replaying data. (Several sources are mixed
by ``bridge_sft.data.mixing.MixedDataset`` over one such dataset per source.)

Padding of unpacked samples (``SFTDataset``): ``pad_to_multiple=None`` pads every
sample to ``seq_length``; an integer ``m`` pads each micro-batch (what the
dataset's ``collate_fn`` receives from Bridge's sampler) to its longest sample
rounded up to a multiple of ``m``, at most ``seq_length`` ("dynamic padding").
A causal model's loss at a position depends only on the positions before it, so
the trailing padding a row loses changes no loss; the slots it saves are work
the model no longer does.

The label shift happens here: for a sample with ids ``x`` (length ``n``),
``tokens = x[:-1]``, ``labels = x[1:]``, ``loss_mask = mask[1:]`` (aligned to
labels). Padding slots have ``loss_mask = 0`` and the pad token id as token and
label (never -100), and ``padding_mask = True`` (bool [S]; mixture-of-experts routers
leave them out: ``bridge_sft.moe``).

This module imports torch, not megatron.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from bridge_sft.data.cache import PreparedData
from bridge_sft.data.formats import DataError
from bridge_sft.data.mixing import SOURCE_ID, EpochOrder, MixturePlan  # noqa: F401  (EpochOrder: re-exported)
from bridge_sft.data.packing import PackPlan, slots_needed

logger = logging.getLogger(__name__)

PACKED_KEYS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")


class SFTDataset(torch.utils.data.Dataset):
    """Unpacked samples, one per item.

    ``__getitem__`` returns ``tokens`` int64 [L], ``labels`` int64 [L], ``loss_mask``
    float32 [L], ``position_ids`` int64 [L], ``padding_mask`` bool [L] (True on padding
    slots): L = ``seq_length`` with
    ``pad_to_multiple=None``, else the sample's own ``len(ids) - 1`` slots.
    ``collate_fn`` stacks items into ``[b, T]``, padding each row with the pad id
    (``loss_mask`` 0, positions continuing): T = ``seq_length``, or with
    ``pad_to_multiple=m`` the longest row rounded up to a multiple of ``m``, capped
    at ``seq_length`` (see the module docstring). ``indices``: the prepared samples in
    this split.
    """

    def __init__(
        self,
        data: PreparedData,
        indices: np.ndarray,
        seq_length: int,
        *,
        num_samples: int | None = None,
        seed: int | tuple[int, ...] = 1234,
        shuffle: bool = True,
        pad_id: int = 0,
        pad_to_multiple: int | None = None,
        name: str = "train",
    ):
        if pad_to_multiple is not None and pad_to_multiple < 1:
            raise DataError(f"pad_to_multiple must be a positive integer, not {pad_to_multiple!r}")
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.pad_to_multiple = pad_to_multiple
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
        s = self.seq_length if self.pad_to_multiple is None else n
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

    def padded_length(self, longest: int) -> int:
        """Slots per row of a micro-batch whose longest item has ``longest`` slots."""
        if self.pad_to_multiple is None:
            return self.seq_length
        return min(self.seq_length, -(-longest // self.pad_to_multiple) * self.pad_to_multiple)

    def collate_fn(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into ``[b, T]`` (T: ``padded_length`` of the longest); other keys are stacked."""
        width = self.padded_length(max(len(item["tokens"]) for item in batch))
        fill = {"tokens": self.pad_id, "labels": self.pad_id, "loss_mask": 0, "padding_mask": True}
        out = {}
        for key in batch[0]:
            if key == "position_ids":
                out[key] = torch.arange(width, dtype=torch.int64).expand(len(batch), width).clone()
            elif key in fill:
                rows = torch.full((len(batch), width), fill[key], dtype=batch[0][key].dtype)
                for row, item in zip(rows, batch):
                    row[: len(item[key])] = item[key]
                out[key] = rows
            else:
                out[key] = torch.stack([item[key] for item in batch])
        return out


def padding_multiple(pad_to_multiple: int, *, tensor_parallel: int = 1, context_parallel: int = 1,
                     pad_seq_to_mult: int = 1) -> int:
    """Rows of a dynamically padded micro-batch are a multiple of this: ``pad_to_multiple``, and what the
    run's parallelism needs (context parallelism splits a row into 2 x CP chunks; sequence parallelism
    splits it over the TP ranks, taken even without SP: 64 already is a multiple of usual TP sizes)."""
    return math.lcm(pad_to_multiple, pad_seq_to_mult, 2 * context_parallel if context_parallel > 1 else 1,
                    tensor_parallel)


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
        seed: int | tuple[int, ...] = 1234,
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


class FullPassDataset(torch.utils.data.Dataset):
    """Evaluation items: one pass over ``items`` (a dataset of exactly its held-out items, in a fixed order)
    per ``pass_items`` dataset indices, ``num_samples`` indices in all.

    An evaluation of ``eval_iters`` global batches reads ``pass_items = eval_iters x global batch`` consecutive
    indices (Bridge's sequential sampler, resumed at ``consumed_valid_samples``), so each evaluation starts at a
    pass boundary and sees every held-out item exactly once, whatever the micro-batch size or the
    data-parallel split of the global batch. The ``pass_items - len(items)`` indices that fill the last
    global batch repeat items with ``loss_mask`` zero: they add no loss and no token to the count that
    divides it. Items keep every other key (``cu_seqlens``, ``source_id``), so batches stay well formed.
    """

    def __init__(self, items: torch.utils.data.Dataset, pass_items: int, num_samples: int, name: str = "validation"):
        if not 0 < len(items) <= pass_items:
            raise ValueError(f"{name}: a pass of {pass_items} items cannot hold the {len(items)} held-out items")
        self.items, self.pass_items, self.num_samples = items, int(pass_items), int(num_samples)
        logger.info("%s: every evaluation covers all %d items once (+%d that supervise nothing, to fill the "
                    "last global batch)", name, len(items), self.pass_items - len(items))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        j = index % self.pass_items
        item = self.items[j % len(self.items)]
        if j >= len(self.items):
            item = {**item, "loss_mask": torch.zeros_like(item["loss_mask"])}
        return item

    def collate_fn(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        collate = getattr(self.items, "collate_fn", None) or torch.utils.data.default_collate
        return collate(batch)


class MixedDataset(torch.utils.data.Dataset):
    """Items of several per-source datasets in the order of a ``MixturePlan``.

    ``datasets[i]`` must serve at least ``plan.draws[i]`` items in the order the plan was
    made with (same ``EpochOrder``). Each item gets ``source_id`` (int64 scalar: the
    source's index in ``names``; unless ``with_source_id=False``); ``collate_fn`` is the
    sources' (they are all packed or all unpacked) and stacks ``source_id`` into ``[b]``.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], plan: MixturePlan, names: Sequence[str],
                 *, with_source_id: bool = True):
        self.datasets = list(datasets)
        self.plan = plan
        self.names = list(names)
        self.with_source_id = with_source_id
        for i, dataset in enumerate(self.datasets):
            if len(dataset) < plan.draws[i]:
                raise ValueError(f"source {names[i]} serves {len(dataset)} items, the plan draws {plan.draws[i]}")

    def __len__(self) -> int:
        return len(self.plan.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i = int(self.plan.source[index])
        item = self.datasets[i][int(self.plan.position[index])]
        if self.with_source_id:
            item[SOURCE_ID] = torch.tensor(i, dtype=torch.int64)
        return item

    def collate_fn(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        collate = getattr(self.datasets[0], "collate_fn", None) or torch.utils.data.default_collate
        return collate(batch)
