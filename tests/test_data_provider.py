"""``SFTDatasetProvider`` under the real Bridge import (in a subprocess: megatron is process-global)."""

from __future__ import annotations

import json

from launch import run_python

from bridge_sft.tiny import SAMPLE_DIALOGS


def test_provider_contract(tmp_path, tiny_qwen3):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(True)[:40]), encoding="utf-8")
    out = tmp_path / "facts.json"
    run_python("data_provider_facts.py", tiny_qwen3, data, out, tmp_path / "cache")
    f = json.loads(out.read_text())
    assert f["is_dataset_provider"] and f["yaml_roundtrip"]
    assert f["loader"] == ["single", 0, False]
    assert f["lengths"] == [40, 6, None]  # exactly what Bridge asks for; no test data -> None
    assert f["split_sizes"] == [30, 10] and f["splits_disjoint"] and f["valid_shuffled"] is False
    assert f["train_item_keys"] == sorted(["tokens", "labels", "loss_mask", "position_ids", "padding_mask",
                                           "cu_seqlens_q", "cu_seqlens_kv", "max_seqlen_q", "max_seqlen_kv"])
    assert f["unpacked_item_keys"] == ["labels", "loss_mask", "padding_mask", "position_ids", "tokens"]
    assert f["unpacked_lengths"] == [5, 3, 40]
    assert f["no_validation_wanted"] is None
    assert len(f["cache_entries"]) == 1  # the train and validation splits share one encoded cache
    assert "dataset.seq_length=128 but model.seq_length=256" in f["mismatch_error"]
    errors = f["field_errors"]
    assert "truncation must be one of" in errors["truncation"]
    assert "train_on must be one of" in errors["train_on"]
    assert "validation_fraction must be in [0, 1)" in errors["validation_fraction"]
    assert "multiple of pad_seq_to_mult 3" in errors["pad_seq_to_mult"]
    assert "unknown format 'csv'" in errors["format"]
