"""Packed vs unpacked through Bridge's real ``finetune()`` and our forward step: each sample's
per-token losses are the same whether it trains alone or inside a THD pack (1 process and TP=2)."""

from __future__ import annotations

import json

import pytest
from launch import run_spec

from bridge_sft.tiny import SAMPLE_DIALOGS

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """24 real dialogs, multi-turn ones included."""
    lines = SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()
    multi = [line for line in lines if len(json.loads(line)["messages"]) > 2][:8]
    single = [line for line in lines if len(json.loads(line)["messages"]) == 2][::50][:16]
    path = tmp_path_factory.mktemp("data") / "dialogs.jsonl"
    path.write_text("\n".join(multi + single) + "\n", encoding="utf-8")
    return path


def _losses(tmp_path, name, hf, data, packed, tp=1) -> dict:
    spec = {"hf": str(hf), "data": str(data), "seq_length": 256, "packed": packed, "tp": tp,
            "cache_dir": str(tmp_path / "cache")}
    return run_spec("data_packed_losses.py", tmp_path, name, spec, nproc=tp)


def _compare(unpacked: dict, packed: dict) -> float:
    assert set(unpacked["samples"]) == set(packed["samples"]) and len(packed["samples"]) == 24
    assert max(packed["pack_sizes"]) >= 3 and len(packed["pack_sizes"]) < 24
    worst = 0.0
    for origin, alone in unpacked["samples"].items():
        inside = packed["samples"][origin]
        assert alone["mask"] == inside["mask"] and sum(alone["mask"]) > 0
        worst = max(worst, max(abs(a - b) for a, b in zip(alone["loss"], inside["loss"])))
        # the per-sample loss (mean over supervised tokens) as well
        mean = [sum(x * m for x, m in zip(s["loss"], s["mask"])) / sum(s["mask"]) for s in (alone, inside)]
        assert abs(mean[0] - mean[1]) <= TOLERANCE, origin
    assert worst <= TOLERANCE, worst
    return worst


def test_packed_equals_unpacked_per_sample_one_process(tmp_path, tiny_llama, chat_data):
    unpacked = _losses(tmp_path, "unpacked", tiny_llama, chat_data, packed=False)
    packed = _losses(tmp_path, "packed", tiny_llama, chat_data, packed=True)
    _compare(unpacked, packed)
    # Negative control: the same packs WITHOUT cu_seqlens (attention across samples) change the
    # losses of every sample that is not first in its pack, far beyond the tolerance.
    leaked = [origin for origin, losses in packed["crosstalk"].items()
              if max(abs(a - b) for a, b in zip(losses, unpacked["samples"][origin]["loss"])) > 1e-3]
    assert len(leaked) >= len(packed["samples"]) - len(packed["pack_sizes"])


def test_packed_equals_unpacked_per_sample_tensor_parallel(tmp_path, tiny_qwen3, chat_data):
    unpacked = _losses(tmp_path, "unpacked_tp2", tiny_qwen3, chat_data, packed=False, tp=2)
    packed = _losses(tmp_path, "packed_tp2", tiny_qwen3, chat_data, packed=True, tp=2)
    _compare(unpacked, packed)
