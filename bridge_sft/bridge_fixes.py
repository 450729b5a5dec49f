"""Fixes for Megatron-Bridge 0.6.2 / megatron-core 0.19.2 bugs that hit every host, GPU or CPU.

Applied by our training entry points (``bridge_sft.train.run``) before Bridge's
``finetune()``; each fix is idempotent and only acts when the bug is present.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def apply() -> None:
    """Apply every fix below (idempotent)."""
    _skip_compile_helpers_when_prebuilt()


def _skip_compile_helpers_when_prebuilt() -> None:
    """``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` to build the C++
    dataset helpers, but the megatron-core wheel ships them prebuilt and no Makefile, so
    ``make`` fails and Bridge calls ``sys.exit(1)``. Skip the build when the prebuilt
    module is there and the Makefile is not (a source checkout still builds)."""
    from megatron.bridge.training import initialize

    datasets_dir = Path(importlib.util.find_spec("megatron.core.datasets").origin).parent
    prebuilt = any(datasets_dir.glob("helpers_cpp*.so"))
    if prebuilt and not (datasets_dir / "Makefile").exists():
        initialize.compile_helpers = _compile_helpers_prebuilt


def _compile_helpers_prebuilt() -> None:
    """Stand-in for ``compile_helpers``: the wheel's prebuilt ``helpers_cpp`` is used as is."""
