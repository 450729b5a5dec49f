"""Fixes for Megatron-Bridge 0.6.2 / megatron-core 0.19.2 bugs that hit every host, GPU or CPU.

Applied by our entry points (``bridge_sft.train.run``, ``bridge_sft.models.megatron_provider``,
``bridge_sft.conversion``) before a model is built; each fix is idempotent and only acts when
the bug is present.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def apply() -> None:
    """Apply every fix below (idempotent)."""
    _skip_compile_helpers_when_prebuilt()
    _post_layernorm_epsilon()
    _expert_bias_with_padding_mask()


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


def _post_layernorm_epsilon() -> None:
    """Bridge's ``TERowParallelLinearLayerNorm`` (the norm after the attention output projection
    and after the MLP in Gemma 2, Gemma 3 and EXAONE 4) builds ``TENorm(config, output_size)``
    without an epsilon, so it normalises with TENorm's default 1e-5 instead of the model's
    ``layernorm_epsilon`` (1e-6 for Gemma). Rebuild that norm with the model's epsilon."""
    from megatron.bridge.models.common import te_layers

    cls = te_layers.TERowParallelLinearLayerNorm
    if getattr(cls, "_bridge_sft_fixed_eps", False):
        return
    bridge_init = cls.__init__

    def __init__(self, input_size, output_size, *, config, **kwargs):
        bridge_init(self, input_size, output_size, config=config, **kwargs)
        if getattr(self.post_layernorm, "eps", config.layernorm_epsilon) != config.layernorm_epsilon:
            self.post_layernorm = te_layers.TENorm(config, output_size, eps=config.layernorm_epsilon)

    cls.__init__ = __init__
    cls._bridge_sft_fixed_eps = True


def _expert_bias_with_padding_mask() -> None:
    """megatron-core 0.19.2's ``TopKRouter._apply_expert_bias`` leaves padding out of the expert-bias
    statistics with ``routing_map & ~padding_mask``: a ``[tokens, experts]`` map against the flattened
    ``[tokens]`` mask, which does not broadcast (and with as many tokens as experts would mask experts,
    not tokens). Models with an expert bias (DeepSeek-V3, GLM-4.5, Moonlight) then fail whenever a
    padding mask reaches the routers, as bridge-sft's forward step passes one. Mask per token."""
    import inspect

    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    if "routing_map & (~padding_mask)" not in inspect.getsource(TopKRouter._apply_expert_bias):
        return  # fixed upstream, or already replaced

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    TopKRouter._apply_expert_bias = _apply_expert_bias
