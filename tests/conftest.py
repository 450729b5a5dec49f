"""Shared fixtures: tiny HF models built once per test session (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/launch.py


class TinyModels:
    """``tiny_models[arch]``: the directory of ``bridge_sft.tiny.build_tiny_model(arch=arch)``, built on first use."""

    def __init__(self, tmp_path_factory):
        self._factory, self._built = tmp_path_factory, {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in self._built:
            from bridge_sft.tiny import build_tiny_model

            self._built[arch] = build_tiny_model(self._factory.mktemp(f"tiny-{arch}"), arch=arch)
        return self._built[arch]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Every family of bridge_sft.tiny.TINY_ARCHS (2 layers, hidden 64), each with its family's chat template."""
    return TinyModels(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64, GQA 4/2 heads, vocab 512) with a Llama-3-style template."""
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models) -> Path:
    """A 2-layer Qwen2ForCausalLM (q/k/v biases) with a ChatML template."""
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    """A 2-layer Qwen3ForCausalLM (q/k RMSNorm) with a ChatML template."""
    return tiny_models["qwen3"]
