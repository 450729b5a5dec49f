"""The tiny mixture-of-experts model of the MoE benchmarks and tests, and the settings it trains with today.

``build_tiny_moe(out)``: a 2-layer Qwen3-MoE (hidden 64, 4 experts, top-2, vocab 512 from
``bridge_sft.tiny.build_tiny_tokenizer("chatml")``), random fp32 weights, no downloads.
Until ``bridge_sft.tiny`` has MoE architectures and the CPU runtime turns Transformer Engine's MoE
fusions off by itself (the model-families work), ``CPU_MOE_OVERRIDES`` are what a CPU run needs
(DESIGN.md section 7).
"""

from __future__ import annotations

from pathlib import Path

EXPERTS, TOPK = 4, 2
CPU_MOE_OVERRIDES = {"moe_permute_fusion": False, "moe_grouped_gemm": False}


def build_tiny_moe(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight ``Qwen3MoeForCausalLM`` and its tokenizer to ``out``; return the path."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from bridge_sft.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("chatml")
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS,
        num_experts_per_tok=TOPK, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=0.001, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = Path(out)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def apply_cpu_moe_overrides(config) -> None:
    for key, value in CPU_MOE_OVERRIDES.items():
        setattr(config.model, key, value)


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
