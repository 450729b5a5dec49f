"""Shared fixtures: tiny HF models built once per test session (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/launch.py


def _tiny(tmp_path_factory, arch: str) -> Path:
    from bridge_sft.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64, GQA 4/2 heads, vocab 512) with a Llama-3-style template."""
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A 2-layer Qwen2ForCausalLM (q/k/v biases) with a ChatML template."""
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A 2-layer Qwen3ForCausalLM (q/k RMSNorm) with a ChatML template."""
    return _tiny(tmp_path_factory, "qwen3")
