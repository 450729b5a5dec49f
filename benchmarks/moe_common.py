"""The tiny mixture-of-experts model of the MoE benchmarks and tests, and the settings it trains with today.

``build_tiny_moe(out)``: ``bridge_sft.tiny.build_tiny_model(out, arch="qwen3_moe")``, a 2-layer
Qwen3-MoE (hidden 64, ``EXPERTS`` experts, top-``TOPK``, vocab 512, ChatML template), random fp32
weights, no downloads. ``configure(config)``: the router losses the MoE step-overhead benchmark
trains with.
"""

from __future__ import annotations

from pathlib import Path

from bridge_sft.tiny import TinySizes, build_tiny_model

EXPERTS, TOPK = TinySizes().num_experts, 2
AUX_COEFF, Z_COEFF = 0.01, 0.001  # benchmarks/moe_step_overhead.py's router-loss coefficients


def build_tiny_moe(out: str | Path) -> Path:
    """Write the tiny random-weight ``Qwen3MoeForCausalLM`` and its tokenizer to ``out``; return the path."""
    return build_tiny_model(out, arch="qwen3_moe")


def configure(config) -> None:
    """The MoE step-overhead worker's settings for a ``ConfigContainer``: the load-balancing loss
    (``AUX_COEFF``) and the z-loss (``Z_COEFF``) on."""
    config.model.moe_aux_loss_coeff, config.model.moe_z_loss_coeff = AUX_COEFF, Z_COEFF


def set_router_coefficients(context, **coefficients) -> None:
    """Set router-loss coefficients for the coming iteration (a Bridge callback ``context``): ``aux``
    (``moe_aux_loss_coeff``), ``z`` (``moe_z_loss_coeff``), ``capacity`` (``moe_expert_capacity_factor``).
    The routers read them at every forward, from their own config objects, which need not be the run's."""
    from megatron.core.transformer.moe.router import TopKRouter

    names = {"aux": "moe_aux_loss_coeff", "z": "moe_z_loss_coeff", "capacity": "moe_expert_capacity_factor"}
    routers = [m for chunk in context.model for m in chunk.modules() if isinstance(m, TopKRouter)]
    for config in {id(c): c for c in [context.state.cfg.model, *(r.config for r in routers)]}.values():
        for key, value in coefficients.items():
            setattr(config, names[key], value)
