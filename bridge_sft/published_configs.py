"""The published HF ``config.json`` fields of each family's flagship, written here from the public
model cards (nothing is downloaded), and the sizes their tiny stand-ins shrink to.

``PUBLISHED[name]`` is ``(family, fields)``: ``family`` a key of ``bridge_sft.tiny.TINY_ARCHS`` (config
class and tokenizer style) and ``fields`` the architecture fields of the flagship's ``config.json``
as published (legacy ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` keys, which
transformers 5 turns into ``rope_parameters``). Left out everywhere: token ids, dtype, quantisation
and other fields that do not shape the network; the tiny builder sets token ids and the vocabulary
from its own tokenizer.

``TINY_SIZES[name]`` overrides only fields of ``SIZE_FIELDS`` (layers, widths, head counts and
dimensions, experts, MLA ranks, windows), keeping the flagship's ratios where the sizes allow: every
other published field (RoPE bases per layer type, RoPE scaling, ``query_pre_attn_scalar``, window
pattern, partial rotary, soft-caps, routing, shared experts, dense first layers, tied embeddings,
norm epsilons, biases) reaches the tiny model unchanged. Windows are shrunk (halved until <= 512)
only where ~1,100-token sequences would not cross them twice.
"""

from __future__ import annotations

SIZE_FIELDS = frozenset({
    "num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "sliding_window", "layer_types", "max_window_layers",
    # Mamba-2 hybrids: the layer pattern (a prefix of the published one) and the Mamba widths
    "hybrid_override_pattern", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
    "moe_shared_expert_intermediate_size",
    # Falcon-H1's Mamba-2 widths
    "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_d_ssm",
})

# Nemotron-H fields every published config.json carries (Mamba-2 mixer settings as the model cards publish them).
_NEMOTRON_H_MAMBA = dict(mamba_hidden_act="silu", conv_kernel=4, chunk_size=128, expand=2, use_conv_bias=True,
                         mamba_proj_bias=False, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                         layer_norm_epsilon=1e-5, residual_in_fp32=False, rescale_prenorm_residual=True,
                         use_bias=False, attention_bias=False, mlp_bias=False, mlp_hidden_act="relu2",
                         tie_word_embeddings=False)

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _layer_types(pattern: int, layers: int) -> list[str]:
    """``pattern - 1`` sliding-window layers, then one full-attention layer, repeated."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


PUBLISHED = {
    # meta-llama/Llama-3.2-1B-Instruct config.json
    "llama-3.2-1b": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=True)),
    # meta-llama/Llama-3.1-8B-Instruct config.json
    "llama-3.1-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False)),
    # Qwen/Qwen2.5-7B-Instruct config.json (q/k/v biases are built into Qwen2)
    "qwen2.5-7b": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False)),
    # Qwen/Qwen3-8B config.json
    "qwen3-8b": ("qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, attention_bias=False, use_sliding_window=False, tie_word_embeddings=False)),
    # mistralai/Mistral-7B-Instruct-v0.3 config.json
    "mistral-7b-v0.3": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)),
    # google/gemma-2-9b config.json
    "gemma-2-9b": ("gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
        layer_types=_layer_types(2, 42), attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        attention_bias=False, tie_word_embeddings=True)),
    # google/gemma-3-1b-it config.json (sliding_window_pattern 6)
    "gemma-3-1b": ("gemma3", dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=None, sliding_window=512, layer_types=_layer_types(6, 26), attn_logit_softcapping=None,
        final_logit_softcapping=None, attention_bias=False, tie_word_embeddings=True)),
    # google/gemma-3-4b-it config.json, text_config (global layers: linear RoPE scaling x8)
    "gemma-3-4b": ("gemma3", dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=1024, layer_types=_layer_types(6, 34),
        attn_logit_softcapping=None, final_logit_softcapping=None, attention_bias=False,
        tie_word_embeddings=True)),
    # nvidia/Minitron-8B-Base config.json (Nemotron-4 pruned: head_dim 128 with hidden 4096 and 48 heads)
    "minitron-8b": ("nemotron", dict(
        hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, hidden_act="relu2", max_position_embeddings=4096, norm_eps=1e-5,
        rope_theta=10000.0, partial_rotary_factor=0.5, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False)),
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, attention_bias=False, use_sliding_window=False, tie_word_embeddings=False)),
    # openai/gpt-oss-20b config.json (the mxfp4 quantization_config left out: weights here are not quantised)
    "gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=150000.0, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 4096},
        sliding_window=128, layer_types=_layer_types(2, 24), num_local_experts=32, num_experts_per_tok=4,
        router_aux_loss_coef=0.9, swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False)),
    # allenai/OLMoE-1B-7B-0924 config.json
    "olmoe-1b-7b": ("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None,
        router_aux_loss_coef=0.01, attention_bias=False, tie_word_embeddings=False)),
    # deepseek-ai/DeepSeek-V3 config.json (fp8 quantization_config and the MTP layer left out)
    "deepseek-v3": ("deepseek_v3", dict(
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu", max_position_embeddings=163840, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 4096},
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid",
        moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True, attention_bias=False, tie_word_embeddings=False)),
    # moonshotai/Moonlight-16B-A3B config.json (DeepSeek-V3 architecture without query compression)
    "moonlight-16b-a3b": ("deepseek_v3", dict(
        hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=50000.0, rope_scaling=None, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
        topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True,
        num_nextn_predict_layers=0, attention_bias=False, tie_word_embeddings=False)),
    # zai-org/GLM-4.5-Air config.json (the MTP layer, num_nextn_predict_layers 1, left out as for DeepSeek-V3)
    "glm-4.5-air": ("glm4_moe", dict(
        hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1000000.0, partial_rotary_factor=0.5,
        n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False, attention_bias=True,
        tie_word_embeddings=False)),
    # nvidia/Nemotron-H-8B-Base-8K config.json: 24 Mamba-2, 4 attention (no RoPE), 24 squared-ReLU MLP layers
    "nemotron-h-8b": ("nemotron_h", dict(
        hidden_size=4096, num_hidden_layers=52,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=21504, max_position_embeddings=8192,
        mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128, **_NEMOTRON_H_MAMBA)),
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json: 23 Mamba-2, 6 attention, 23 MoE layers (128 experts,
    # top 6, sigmoid router with expert bias, a shared expert, routed scaling 2.5)
    "nemotron-3-nano-30b-a3b": ("nemotron_h_moe", dict(
        hidden_size=2688, num_hidden_layers=52,
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, intermediate_size=1856, max_position_embeddings=262144,
        mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, n_routed_experts=128,
        num_experts_per_tok=6, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
        n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
        **_NEMOTRON_H_MAMBA)),
    # tiiuae/Falcon-H1-0.5B-Instruct config.json (as Megatron-Bridge's own Falcon-H1 bridge test writes it down; its
    # table row in transformers' FalconH1 docs agrees): every layer Mamba-2 and attention in parallel, then SwiGLU;
    # head_dim 64 x 8 heads != hidden 1024; d_ssm = 24 heads x 64 = 1.5 x hidden; muP multipliers.
    "falcon-h1-0.5b-instruct": ("falcon_h1", dict(
        hidden_size=1024, num_hidden_layers=36, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        intermediate_size=2048, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e11, rope_scaling=None,
        max_position_embeddings=16384, attention_bias=False, mlp_bias=False, projectors_bias=False,
        tie_word_embeddings=False, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=128, mamba_conv_bias=True,
        mamba_proj_bias=False, mamba_norm_before_gate=False, mamba_rms_norm=False,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625, key_multiplier=0.39062499999999994,
        attention_in_multiplier=1.0, attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.23570226039551587, mlp_multipliers=[0.8838834764831844, 0.5859375],
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738])),
}

# Tiny sizes: hidden / (heads * head_dim), intermediate / hidden and query heads per key/value head kept
# where small numbers allow; enough layers for the dense first layers and one full window pattern.
TINY_SIZES = {
    "llama-3.2-1b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16),
    "llama-3.1-8b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=448, num_attention_heads=8,
                         num_key_value_heads=2),
    "qwen2.5-7b": dict(num_hidden_layers=2, hidden_size=224, intermediate_size=1184, num_attention_heads=14,
                       num_key_value_heads=2),
    "qwen3-8b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=384, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16),
    "mistral-7b-v0.3": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=448, num_attention_heads=8,
                            num_key_value_heads=2),
    "gemma-2-9b": dict(num_hidden_layers=2, hidden_size=224, intermediate_size=896, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, sliding_window=512, layer_types=_layer_types(2, 2)),
    "gemma-3-1b": dict(num_hidden_layers=6, hidden_size=288, intermediate_size=1728, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=64, layer_types=_layer_types(6, 6)),
    "gemma-3-4b": dict(num_hidden_layers=6, hidden_size=320, intermediate_size=1280, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, sliding_window=512, layer_types=_layer_types(6, 6)),
    "minitron-8b": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=1024, num_attention_heads=12,
                        num_key_value_heads=2, head_dim=32),
    "qwen3-30b-a3b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=384, moe_intermediate_size=48,
                          num_attention_heads=16, num_key_value_heads=2, head_dim=16, num_experts=16,
                          num_experts_per_tok=4),
    "gpt-oss-20b": dict(num_hidden_layers=2, hidden_size=176, intermediate_size=176, num_attention_heads=16,
                        num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=2,
                        layer_types=_layer_types(2, 2)),
    "olmoe-1b-7b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=4, num_experts=16, num_experts_per_tok=2),
    "deepseek-v3": dict(num_hidden_layers=4, hidden_size=224, intermediate_size=576, moe_intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=16,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
                        num_experts_per_tok=8),
    "moonlight-16b-a3b": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=704, moe_intermediate_size=88,
                              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32,
                              qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=3),
    "glm-4.5-air": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=344, moe_intermediate_size=48,
                        num_attention_heads=12, num_key_value_heads=1, head_dim=32, n_routed_experts=16,
                        num_experts_per_tok=2),
    # Mamba: d_inner = 2 x hidden (8B) / heads x head_dim (Nano), 16 (8B) or 8 (Nano) heads per group, state =
    # 2 x head_dim; chunks of 128 as published (~1,100 tokens cross 9); the first layers of the published pattern.
    "nemotron-h-8b": dict(num_hidden_layers=9, hybrid_override_pattern="M-M-M-M*-", hidden_size=128,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=672,
                          mamba_num_heads=32, mamba_head_dim=8, n_groups=2, ssm_state_size=16),
    "nemotron-3-nano-30b-a3b": dict(num_hidden_layers=7, hybrid_override_pattern="MEMEM*E", hidden_size=112,
                                    num_attention_heads=16, num_key_value_heads=1, head_dim=16, intermediate_size=80,
                                    mamba_num_heads=16, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
                                    n_routed_experts=16, num_experts_per_tok=6, moe_intermediate_size=80,
                                    moe_shared_expert_intermediate_size=160),
    # Falcon-H1: head_dim x heads = hidden / 2, d_ssm = 1.5 x hidden, state = 2 x Mamba head_dim, chunks of 128
    # as published (~1,100 tokens cross 9).
    "falcon-h1-0.5b-instruct": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=8, mamba_n_heads=12,
                                    mamba_d_head=16, mamba_d_ssm=192, mamba_d_state=32),
}


# --- 2026 families (issue 20): EXAONE 4, ERNIE 4.5 MoE, MiniMax-M2 ---
SIZE_FIELDS = SIZE_FIELDS | {"moe_num_experts", "moe_k", "moe_layer_end_index", "rotary_dim", "global_head_dim",
                             "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
                             "top_k_experts"}

PUBLISHED.update({
    # google/gemma-4-E4B-it config.json, text_config: per-layer inputs, the last 18 layers share k/v
    "gemma-4-e4b": ("gemma4", dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=None, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=512, layer_types=_layer_types(6, 42),
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}},
        final_logit_softcapping=30.0, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=18, use_double_wide_mlp=False, attention_k_eq_v=False, enable_moe_block=False,
        attention_bias=False, tie_word_embeddings=True)),
    # google/gemma-4-26B-A4B: the text_config transformers' convert_gemma4_weights.py writes for it (_VARIANTS
    # "gemma-4-26b-a4b"; Gemma4TextConfig's defaults for head_dim, global_head_dim, activation, epsilon, vocabulary):
    # every layer a shared MLP beside 8 of 128 experts; global layers with 2 k/v heads whose values are their keys
    "gemma-4-26b-a4b": ("gemma4_moe", dict(
        hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=262144, rms_norm_eps=1e-6, sliding_window=1024,
        layer_types=_layer_types(6, 30),
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}},
        final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        use_bidirectional_attention="vision", attention_bias=False, tie_word_embeddings=True)),
    # LGAI-EXAONE/EXAONE-4.0-32B config.json: 3 sliding-window layers (RoPE) per global layer (no RoPE)
    "exaone-4.0-32b": ("exaone4", dict(
        hidden_size=5120, intermediate_size=27392, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=1000000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 16.0}, sliding_window=4096,
        sliding_window_pattern="LLLG", layer_types=_layer_types(4, 64), tie_word_embeddings=False)),
    # baidu/ERNIE-4.5-21B-A3B-PT config.json (the last MoE layer is the last layer, 27)
    "ernie-4.5-21b-a3b": ("ernie4_5_moe", dict(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, use_bias=False, moe_num_experts=64, moe_num_shared_experts=2, moe_k=6,
        moe_intermediate_size=1536, moe_layer_start_index=1, moe_layer_end_index=27, moe_layer_interval=1,
        moe_norm_min=1e-12, tie_word_embeddings=True)),
    # MiniMaxAI/MiniMax-M2 config.json (MTP modules left out). It writes partial RoPE as the legacy rotary_dim 64 of
    # head_dim 128, which transformers 5.12's MiniMaxM2Config ignores (full-head RoPE: huggingface/transformers
    # #48241, fixed by #48486, which derives partial_rotary_factor = rotary_dim / head_dim as written here).
    "minimax-m2": ("minimax_m2", dict(
        hidden_size=3072, intermediate_size=1536, num_hidden_layers=62, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, rotary_dim=64, partial_rotary_factor=0.5, hidden_act="silu",
        max_position_embeddings=196608, rms_norm_eps=1e-6, rope_theta=5000000.0, num_local_experts=256,
        num_experts_per_tok=8, scoring_func="sigmoid", use_routing_bias=True, use_qk_norm=True,
        qk_norm_type="per_layer", router_aux_loss_coef=0.001, tie_word_embeddings=False)),
})

TINY_SIZES.update({
    "gemma-4-e4b": dict(num_hidden_layers=12, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=64, global_head_dim=128, layer_types=_layer_types(6, 12),
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=512, num_kv_shared_layers=5),
    "gemma-4-26b-a4b": dict(num_hidden_layers=6, hidden_size=128, intermediate_size=96, moe_intermediate_size=32,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=16, global_head_dim=32,
                            sliding_window=512, layer_types=_layer_types(6, 6), num_experts=16, top_k_experts=4),
    "exaone-4.0-32b": dict(num_hidden_layers=4, hidden_size=160, intermediate_size=856, num_attention_heads=10,
                           num_key_value_heads=2, head_dim=16, sliding_window=512, layer_types=_layer_types(4, 4)),
    "ernie-4.5-21b-a3b": dict(num_hidden_layers=3, hidden_size=160, intermediate_size=768, moe_intermediate_size=96,
                              num_attention_heads=10, num_key_value_heads=2, head_dim=16, moe_num_experts=16,
                              moe_k=2, moe_layer_end_index=2),
    "minimax-m2": dict(num_hidden_layers=2, hidden_size=192, intermediate_size=96, num_attention_heads=12,
                       num_key_value_heads=2, head_dim=32, rotary_dim=16, num_local_experts=16,
                       num_experts_per_tok=2),
})


# --- 2026 families (issue 20): Qwen3-Next and Qwen3.5 (gated DeltaNet + gated attention hybrids) ---
# The published configs write the layer pattern as full_attention_interval 4 (3 gated-DeltaNet layers, then one
# gated-attention layer), which transformers turns into layer_types. Qwen3.5 checkpoints are vision-language
# (Qwen3_5*ForConditionalGeneration): what is written here is their text_config, whose interleaved M-RoPE equals
# plain RoPE on text (the same position in all three sections). Left out: the multi-token-prediction layer (Qwen3.5
# text_configs write mtp_num_hidden_layers 1), mamba_ssm_dtype, and attn_output_gate (no transformers config field:
# HF and megatron always gate). Where the copies of a config disagree or are silent, the comment says so.
SIZE_FIELDS = SIZE_FIELDS | {"linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                             "linear_value_head_dim", "shared_expert_intermediate_size"}

_GATED_DELTANET = dict(full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                       linear_value_head_dim=128, linear_num_key_heads=16, hidden_act="silu",
                       max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                       tie_word_embeddings=False)
_QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                 "mrope_section": [11, 11, 10], "mrope_interleaved": True}

PUBLISHED.update({
    # Qwen/Qwen3-Next-80B-A3B-Instruct config.json, as Megatron-Bridge's tests/unit_tests/models/qwen/
    # test_qwen3_next_bridge.py writes it down (THUDM/slime's scripts/models/qwen3-next-80B-A3B.sh and transformers'
    # Qwen3NextConfig defaults agree): every layer MoE, 512 experts, top 10, a gated shared expert.
    "qwen3-next-80b-a3b": ("qwen3_next", dict(
        _GATED_DELTANET, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_value_heads=32, rope_theta=10000000,
        partial_rotary_factor=0.25, rope_scaling=None, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=0.001)),
    # Qwen/Qwen3.5-27B config.json, text_config, as Megatron-Bridge's tests/unit_tests/models/qwen/
    # test_qwen35_bridge.py and qwen_vl/test_qwen35_vl_bridge.py write it down (head_dim 256 from the latter and from
    # slime's qwen3.5-27B.sh; the former leaves it to the config default, also 256). 24 x 256 = 1.2 x hidden;
    # 3 value heads per key head. The M-RoPE sections: [11, 11, 10] in Bridge's VL test and transformers' default;
    # mrope_interleaved True from other published Qwen3.5 text_configs (4B, 35B-A3B), not seen for 27B itself.
    "qwen3.5-27b": ("qwen3_5", dict(
        _GATED_DELTANET, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
        num_key_value_heads=4, head_dim=256, linear_num_value_heads=48, rope_parameters=_QWEN3_5_ROPE)),
    # Qwen/Qwen3.5-35B-A3B config.json, text_config: transformers' Qwen3_5MoeTextConfig defaults (its docstring
    # checkpoint) and slime's qwen3.5-35B-A3B.sh agree on every size; every layer MoE (softmax router, top-k always
    # renormalised: no norm_topk_prob field), 256 experts, top 8, a gated shared expert. The router_aux_loss_coef
    # (0.001, the class default) is left out: the published text_configs seen do not write it.
    "qwen3.5-35b-a3b": ("qwen3_5_moe", dict(
        _GATED_DELTANET, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_value_heads=32, rope_parameters=_QWEN3_5_ROPE, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512)),
})

# One full pattern (3 gated-DeltaNet layers, 1 attention layer); attention heads x head_dim and linear key / value
# widths in the published proportion to hidden, linear head dims half the attention head_dim as published, query
# heads per key/value head and value heads per key head as published; the top-k kept, fewer experts.
TINY_SIZES.update({
    "qwen3-next-80b-a3b": dict(num_hidden_layers=4, hidden_size=128, intermediate_size=320, num_attention_heads=8,
                               num_key_value_heads=1, head_dim=32, linear_num_key_heads=8, linear_num_value_heads=16,
                               linear_key_head_dim=16, linear_value_head_dim=16, num_experts=32,
                               num_experts_per_tok=10, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3.5-27b": dict(num_hidden_layers=4, hidden_size=160, intermediate_size=544, num_attention_heads=6,
                        num_key_value_heads=1, head_dim=32, linear_num_key_heads=4, linear_num_value_heads=12,
                        linear_key_head_dim=16, linear_value_head_dim=16),
    "qwen3.5-35b-a3b": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=1,
                            head_dim=32, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=16,
                            linear_value_head_dim=16, num_experts=32, num_experts_per_tok=8,
                            moe_intermediate_size=32, shared_expert_intermediate_size=32),
})


def tiny_fields(name: str) -> tuple[str, dict]:
    """``(family, fields)`` of the tiny stand-in of flagship ``name``: the published fields with the
    sizes of ``TINY_SIZES[name]`` (vocabulary and token ids excepted: the builder's tokenizer sets them)."""
    if name not in PUBLISHED:
        raise ValueError(f"published config must be one of {sorted(PUBLISHED)}, not {name!r}")
    family, fields = PUBLISHED[name]
    sizes = TINY_SIZES[name]
    unknown = set(sizes) - SIZE_FIELDS
    if unknown:
        raise ValueError(f"TINY_SIZES[{name!r}] overrides fields that are not sizes: {sorted(unknown)}")
    return family, {**fields, **sizes}


def lost_fields(name: str, config) -> list[str]:
    """The published fields of flagship ``name`` that the transformers ``config`` of its tiny stand-in
    does not carry (empty when it keeps them all): every non-size field (RoPE ones through
    ``rope_parameters``, per layer type for Gemma 3), the window pattern, a window no larger than
    published (and equal when 512 or less), ``head_dim`` != hidden/heads where published (outside MLA), query heads per
    key/value head, dense first layers followed by MoE layers, experts per token per routing group, and for the gated
    DeltaNet hybrids the ``full_attention_interval`` pattern (with both layer kinds) and value heads per key head."""
    _, fields = PUBLISHED[name]
    rope = dict(getattr(config, "rope_parameters", None) or {})  # None: no RoPE (Nemotron-H)
    full = rope.get("full_attention", rope)
    lost = []
    for key, value in fields.items():
        if key in SIZE_FIELDS:
            continue
        if key == "rope_theta":
            kept = full.get("rope_theta") == value
        elif key == "rope_local_base_freq":
            kept = rope.get("sliding_attention", {}).get("rope_theta") == value
        elif key == "rope_scaling":
            kind = (value or {}).get("rope_type", (value or {}).get("type", "default"))
            kept = full.get("rope_type", "default") == kind and all(
                full.get(k) == v for k, v in (value or {}).items() if k not in ("type", "rope_type"))
        elif key == "full_attention_interval":  # transformers writes it as layer_types; every kind in the tiny one
            pattern = ["linear_attention" if (i + 1) % value else "full_attention"
                       for i in range(config.num_hidden_layers)]
            kept = list(config.layer_types) == pattern and config.num_hidden_layers >= value
        elif key == "partial_rotary_factor":
            kept = full.get(key, getattr(config, key, None)) == value
        else:
            kept = getattr(config, key, KeyError) == value
        if not kept:
            lost.append(key)
    layers = config.num_hidden_layers
    if "layer_types" in fields and list(config.layer_types) != fields["layer_types"][:layers]:
        lost.append("layer_types pattern")
    pattern = fields.get("hybrid_override_pattern")
    if pattern and (config.hybrid_override_pattern != pattern[:layers] or set(pattern[:layers]) != set(pattern)):
        lost.append("hybrid_override_pattern prefix with every layer kind")
    if "mamba_num_heads" in fields:
        for ratio in (("mamba_num_heads", "n_groups"), ("ssm_state_size", "mamba_head_dim")):
            if fields[ratio[0]] // fields[ratio[1]] != getattr(config, ratio[0]) // getattr(config, ratio[1]):
                lost.append(f"{ratio[0]} per {ratio[1]}")
    window = fields.get("sliding_window")
    if window and not (config.sliding_window == window if window <= 512 else 0 < config.sliding_window <= window):
        lost.append("sliding_window")
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = fields.get("head_dim") or fields["hidden_size"] // heads
    tiny_head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mla = "kv_lora_rank" in fields  # head sizes are qk_nope/qk_rope/v_head_dim there
    if not mla and (head_dim * heads != fields["hidden_size"]) != (
            tiny_head_dim * config.num_attention_heads != config.hidden_size):
        lost.append("head_dim != hidden_size / num_attention_heads")
    if heads // kv_heads != config.num_attention_heads // config.num_key_value_heads:
        lost.append("query heads per key/value head")
    if "linear_num_key_heads" in fields and (fields["linear_num_value_heads"] // fields["linear_num_key_heads"]
                                             != config.linear_num_value_heads // config.linear_num_key_heads):
        lost.append("linear-attention value heads per key head")
    if "first_k_dense_replace" in fields and layers <= fields["first_k_dense_replace"]:
        lost.append("MoE layers after the dense first layers")
    if fields.get("n_group", 1) > 1 and (config.num_experts_per_tok // config.topk_group
                                         != fields["num_experts_per_tok"] // fields["topk_group"]):
        lost.append("experts per token per routing group")
    return lost
