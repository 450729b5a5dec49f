"""Recipe functions: plain functions returning a Megatron-Bridge ``ConfigContainer``.

``sft`` is the generic recipe (any supported HF checkpoint); the presets fix the
model-specific defaults for H100s; ``tiny`` trains a tiny model on a CPU.
``RECIPES`` maps the names the CLI accepts to the functions.
"""

from bridge_sft.recipes.presets import (
    PRESETS,
    gemma3_1b,
    gemma3_4b,
    gemma3_12b,
    gemma3_27b,
    llama31_8b,
    llama32_1b,
    llama32_3b,
    mistral_7b,
    qwen3_0p6b,
    qwen3_1p7b,
    qwen3_4b,
    qwen3_8b,
    qwen25_0p5b,
    qwen25_1p5b,
    qwen25_7b,
    tiny,
)
from bridge_sft.recipes.sft import sft

RECIPES = {"sft": sft, "tiny": tiny, **PRESETS}

__all__ = [
    "RECIPES", "sft", "tiny", "llama32_1b", "llama32_3b", "llama31_8b", "qwen25_0p5b", "qwen25_1p5b",
    "qwen25_7b", "qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "gemma3_1b", "gemma3_4b", "gemma3_12b",
    "gemma3_27b", "mistral_7b",
]
