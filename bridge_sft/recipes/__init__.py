"""Recipe functions: plain functions returning a Megatron-Bridge ``ConfigContainer``.

``sft`` is the generic recipe; the presets fix the model-specific defaults.
"""

from bridge_sft.recipes.sft import sft

__all__ = ["sft"]
