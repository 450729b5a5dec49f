"""HF <-> Megatron conversion through AutoBridge on CPU (local layer spec)."""

from __future__ import annotations

import json

from launch import run_python


def test_hf_megatron_hf_round_trip_is_bit_exact(tiny_llama, tiny_qwen2, tiny_qwen3, tmp_path):
    out = run_python("roundtrip.py", tmp_path, tiny_llama, tiny_qwen2, tiny_qwen3).stdout
    verdicts = json.loads(out.split("ROUNDTRIP ", 1)[1].splitlines()[0])
    assert set(verdicts) == {tiny_llama.name, tiny_qwen2.name, tiny_qwen3.name}
    for name, verdict in verdicts.items():
        assert verdict["same_names"], name
        assert len(verdict["bit_exact"]) == verdict["tensors"] > 10, (name, verdict)
