"""Recipes and the ``bridge-sft train`` command: presets, overrides, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from launch import REPO, run_python

from bridge_sft.published_configs import PUBLISHED as FLAGSHIPS

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama(hidden, inter, layers, heads, kv, tie, rope_factor=32.0):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": tie,
            "rope_scaling": {**LLAMA3_ROPE, "factor": rope_factor}, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": 128009}


def qwen2(hidden, inter, layers, heads, kv, tie, vocab=151936):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": tie, "torch_dtype": "bfloat16"}


def qwen3(hidden, inter, layers, heads, kv, tie):
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16"}


def gemma3(hidden, inter, layers, heads, kv, head_dim, window, vocab=262208, rope_factor=8.0):
    """A Gemma 3 text config as the text_config of the published checkpoint (5 sliding-window layers per global)."""
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256 if head_dim == 256
              else 168, "sliding_window": window, "sliding_window_pattern": 6, "max_position_embeddings": 131072,
              "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    if rope_factor != 1.0:
        config["rope_scaling"] = {"rope_type": "linear", "factor": rope_factor}
    return config


# The published config.json sizes of each preset's model.
PUBLISHED = {
    "llama32_1b": llama(2048, 8192, 16, 32, 8, True),
    "llama32_3b": llama(3072, 8192, 28, 24, 8, True),
    "llama31_8b": llama(4096, 14336, 32, 32, 8, False, rope_factor=8.0),
    "qwen25_0p5b": qwen2(896, 4864, 24, 14, 2, True),
    "qwen25_1p5b": qwen2(1536, 8960, 28, 12, 2, True),
    "qwen25_7b": qwen2(3584, 18944, 28, 28, 4, False, vocab=152064),
    "qwen3_0p6b": qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3_1p7b": qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3_4b": qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3_8b": qwen3(4096, 12288, 36, 32, 8, False),
    "gemma3_1b": {**gemma3(1152, 6912, 26, 4, 1, 256, 512, vocab=262144, rope_factor=1.0),
                  "max_position_embeddings": 32768},
    "gemma3_4b": gemma3(2560, 10240, 34, 8, 4, 256, 1024),
    "gemma3_12b": gemma3(3840, 15360, 48, 16, 8, 256, 1024),
    "gemma3_27b": gemma3(5376, 21504, 62, 32, 16, 128, 1024),
    "mistral_7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768, "rms_norm_eps": 1e-5,
                   "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": None,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}
# 2026 families (issue 20): LGAI-EXAONE/EXAONE-4.0-1.2B config.json (all layers global, tied embeddings)
PUBLISHED.update({
    "exaone4_1p2b": {"architectures": ["Exaone4ForCausalLM"], "model_type": "exaone4", "hidden_size": 2048,
                     "intermediate_size": 4096, "num_hidden_layers": 30, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 102400, "rms_norm_eps": 1e-5,
                     "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 8192},
                     "sliding_window": None, "layer_types": ["full_attention"] * 30,
                     "max_position_embeddings": 65536, "tie_word_embeddings": True,
                     "torch_dtype": "bfloat16"},
})
EXPECTED_TP = {"llama31_8b": 2, "qwen25_7b": 2, "qwen3_4b": 2, "qwen3_8b": 4, "gemma3_12b": 4, "gemma3_27b": 8,
               "mistral_7b": 2}
SEQ_4096 = ("llama", "gemma3", "mistral")


# --- Mixture-of-experts presets: published config.json of each model, and Bridge 0.6.2's recipe settings.
GPT_OSS = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True, "head_dim": 64,
           "hidden_act": "silu", "hidden_size": 2880, "intermediate_size": 2880, "initial_context_length": 4096,
           "max_position_embeddings": 131072, "num_attention_heads": 64, "num_key_value_heads": 8,
           "experts_per_token": 4, "num_experts_per_tok": 4, "rms_norm_eps": 1e-5,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
           "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
           "tie_word_embeddings": False, "vocab_size": 201088, "eos_token_id": 200002, "pad_token_id": 199999,
           "torch_dtype": "bfloat16"}


def gpt_oss(layers, experts):
    return {**GPT_OSS, "num_hidden_layers": layers, "num_local_experts": experts,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)}


MOE_PUBLISHED = {
    "qwen3_30b_a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "norm_topk_prob": True, "router_aux_loss_coef": 0.001, "vocab_size": 151936,
                      "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "gpt_oss_20b": gpt_oss(24, 32),
    "gpt_oss_120b": gpt_oss(36, 128),
    "olmoe_1b_7b": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
                    "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
                    "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
                    "router_aux_loss_coef": 0.01, "vocab_size": 50304, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "max_position_embeddings": 4096, "clip_qkv": None, "tie_word_embeddings": False,
                    "eos_token_id": 50279, "pad_token_id": 1, "torch_dtype": "bfloat16"},
    "moonlight_16b_a3b": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 2048,
                          "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                          "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                          "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
                          "scoring_func": "sigmoid", "routed_scaling_factor": 2.446, "norm_topk_prob": True,
                          "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                          "v_head_dim": 128, "vocab_size": 163840, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
                          "rope_scaling": None, "max_position_embeddings": 8192, "tie_word_embeddings": False,
                          "aux_loss_alpha": 0.001, "seq_aux": True, "num_nextn_predict_layers": 0,
                          "bos_token_id": 163584, "eos_token_id": 163585, "torch_dtype": "bfloat16"},
}

# Mamba-2 hybrids (published config.json fields): nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 and -Nano-4B-BF16.
_NEMOTRON_H = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "mamba_hidden_act": "silu",
               "conv_kernel": 4, "expand": 2, "use_conv_bias": True, "mamba_proj_bias": False,
               "mlp_hidden_act": "relu2", "layer_norm_epsilon": 1e-5, "vocab_size": 131072, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16"}
HYBRID_PUBLISHED = {
    "nemotron3_nano_30b_a3b": {**_NEMOTRON_H, "hidden_size": 2688, "num_hidden_layers": 52,
                               "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
                               "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
                               "intermediate_size": 1856, "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8,
                               "ssm_state_size": 128, "chunk_size": 128, "n_routed_experts": 128,
                               "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
                               "moe_shared_expert_intermediate_size": 3712, "n_shared_experts": 1,
                               "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                               "max_position_embeddings": 262144},
    "nemotron3_nano_4b": {**_NEMOTRON_H, "hidden_size": 3136, "num_hidden_layers": 42,
                          "hybrid_override_pattern": "M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-",
                          "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                          "intermediate_size": 12544, "mamba_num_heads": 96, "mamba_head_dim": 80, "n_groups": 8,
                          "ssm_state_size": 128, "chunk_size": 256, "max_position_embeddings": 262144},
}

# preset: (EP, PP, seq, global batch), LoRA (TP, EP, seq, global batch, targets, rank, alpha)
ATTENTION, ATTENTION_MLP = ["linear_qkv", "linear_proj"], ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
MOE_EXPECTED = {
    "qwen3_30b_a3b": ((16, 1, 2048, 32), (4, 4, 2048, 32, ATTENTION, 8, 16)),
    "gpt_oss_20b": ((8, 1, 2048, 128), (1, 1, 2048, 128, ATTENTION_MLP, 32, 32)),
    "gpt_oss_120b": ((8, 4, 2048, 128), (1, 8, 2048, 128, ATTENTION_MLP, 32, 32)),
    "olmoe_1b_7b": ((8, 1, 4096, 128), (1, 1, 4096, 128, ATTENTION_MLP, 32, 32)),
    "moonlight_16b_a3b": ((8, 1, 8192, 8), (1, 4, 2048, 32, ["linear_q_proj", "linear_kv_down_proj",
                                                              "linear_kv_up_proj", "linear_proj"], 8, 16)),
}


# Long-context presets: (TP, SP, CP, cp_comm_type, seq, global batch, pad_seq_to_mult, lr, YaRN factor) of Bridge
# 0.6.2's qwen3_8b_sft_8gpu_h100_bf16_32k_config and qwen3_600m_sft_8gpu_h100_bf16_yarn_128k_config (cp_comm_type
# None: megatron-core's default, p2p).
LONG_CONTEXT_PUBLISHED = {"qwen3_8b_32k": PUBLISHED["qwen3_8b"], "qwen3_0p6b_128k": PUBLISHED["qwen3_0p6b"]}
LONG_CONTEXT_EXPECTED = {"qwen3_8b_32k": (4, True, 2, "a2a", 32768, 8, 8, 5e-6, None),
                         "qwen3_0p6b_128k": (1, False, 8, None, 131072, 8, 16, 1e-6, 3.2)}


# Gated DeltaNet hybrids (issue 20): the published config.json fields of bridge_sft.published_configs, written as the
# checkpoint's config.json (Qwen3.5: its text_config, as a text-only Qwen3_5(Moe)ForCausalLM), with the published
# vocabularies. preset: (TP, SP, PP, EP, seq, global batch, lr) of Bridge 0.6.2's SFT recipe, and of its LoRA one
# (None: no LoRA recipe, the preset refuses peft=lora).
def _flagship(name, architecture, model_type, vocab):
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": vocab, "torch_dtype": "bfloat16",
            **FLAGSHIPS[name][1]}


GATED_DELTANET_PUBLISHED = {
    "qwen3_next_80b_a3b": _flagship("qwen3-next-80b-a3b", "Qwen3NextForCausalLM", "qwen3_next", 151936),
    "qwen35_27b": _flagship("qwen3.5-27b", "Qwen3_5ForCausalLM", "qwen3_5_text", 248320),
    "qwen35_35b_a3b": _flagship("qwen3.5-35b-a3b", "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", 248320),
}
GATED_DELTANET_EXPECTED = {
    "qwen3_next_80b_a3b": ((1, False, 2, 8, 2048, 64, 5e-6), None),
    "qwen35_27b": ((4, False, 4, 1, 4096, 32, 5e-6), (2, False, 1, 1, 4096, 32, 1e-4)),
    "qwen35_35b_a3b": ((2, True, 1, 16, 4096, 32, 2e-5), (2, True, 1, 4, 4096, 32, 2e-4)),
}


@pytest.fixture(scope="module")
def hf_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-configs")
    for name, config in {**PUBLISHED, **MOE_PUBLISHED, **HYBRID_PUBLISHED, **LONG_CONTEXT_PUBLISHED,
                         **GATED_DELTANET_PUBLISHED}.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    data = root / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return root, data


@pytest.fixture(scope="module")
def preset_shapes(hf_configs):
    root, data = hf_configs
    out = run_python("preset_shapes.py", root, data).stdout
    return json.loads(out.split("SHAPES ", 1)[1].splitlines()[0])


def test_every_preset_builds_the_published_model_shape(preset_shapes):
    result = preset_shapes
    assert set(result) == (set(PUBLISHED) | set(MOE_PUBLISHED) | set(HYBRID_PUBLISHED)
                           | set(LONG_CONTEXT_PUBLISHED) | set(GATED_DELTANET_PUBLISHED))
    for name, hf in PUBLISHED.items():
        full, lora = result[name]["full"], result[name]["lora"]
        assert full["num_layers"] == hf["num_hidden_layers"], name
        assert full["hidden_size"] == hf["hidden_size"], name
        assert full["ffn_hidden_size"] == hf["intermediate_size"], name
        assert full["num_attention_heads"] == hf["num_attention_heads"], name
        assert full["num_query_groups"] == hf["num_key_value_heads"], name
        # kv_channels None means hidden_size / num_attention_heads to megatron-core
        kv_channels = full["kv_channels"] or full["hidden_size"] // full["num_attention_heads"]
        assert kv_channels == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]), name
        assert full["vocab_size"] == hf["vocab_size"], name
        assert full["share_embeddings_and_output_weights"] == hf["tie_word_embeddings"], name
        rotary_base = [hf["rope_local_base_freq"], hf["rope_theta"]] if name.startswith("gemma3") else hf["rope_theta"]
        assert full["rotary_base"] == rotary_base, name
        assert full["tensor_model_parallel_size"] == EXPECTED_TP.get(name, 1), name
        assert full["seq_length"] == full["dataset_seq_length"] == (4096 if name.startswith(SEQ_4096) else 2048)
        if name.startswith("gemma3"):  # 5 sliding-window layers per global one, from the config's layer types
            assert (full["window_size"], full["interleaved_attn_pattern"]) == (hf["sliding_window"], [5, 1]), name
        assert full["calculate_per_token_loss"] and not full["average_in_collective"], name
        assert full["peft"] is None and full["lr"] == 5e-6
        # LoRA: Bridge's PEFT defaults (1 GPU, lr 1e-4), and dotted overrides still apply.
        assert lora["peft"] == "LoRA" and lora["lr"] == 1e-4 and lora["tensor_model_parallel_size"] == 1
        assert result[name]["lora_train_iters"] == 7
        # recipes/<preset>.yaml: the same model, with the file's overrides.
        from_yaml = result[name]["yaml"]
        assert (from_yaml["train_iters"], from_yaml["save_interval"]) == (1000, 200)
        assert {k: from_yaml[k] for k in full} == full, name


def test_moe_presets_build_the_published_model_with_bridges_parallelism(preset_shapes):
    """Each MoE preset: the published experts / top-k / expert FFN sizes (shared experts, dense first layers,
    MLA where the model has them), and Bridge 0.6.2's recipe parallelism for full SFT and for LoRA."""
    for name, hf in MOE_PUBLISHED.items():
        full, lora, from_yaml = (preset_shapes[name][key] for key in ("full", "lora", "yaml"))
        experts = hf.get("num_experts") or hf.get("num_local_experts") or hf.get("n_routed_experts")
        assert (full["num_layers"], full["hidden_size"], full["num_attention_heads"], full["vocab_size"]) == (
            hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["vocab_size"]), name
        assert (full["num_moe_experts"], full["moe_router_topk"]) == (experts, hf["num_experts_per_tok"]), name
        assert full["moe_ffn_hidden_size"] == hf.get("moe_intermediate_size", hf["intermediate_size"]), name
        shared = hf.get("n_shared_experts")
        assert full["moe_shared_expert_intermediate_size"] == (shared * hf["moe_intermediate_size"] if shared else None)
        dense_first = hf.get("first_k_dense_replace", 0)
        if dense_first:
            assert full["moe_layer_freq"] == [0] * dense_first + [1] * (hf["num_hidden_layers"] - dense_first)
        assert bool(full["multi_latent_attention"]) == ("kv_lora_rank" in hf), name
        if "kv_lora_rank" in hf:
            assert full["kv_lora_rank"] == hf["kv_lora_rank"]
        (ep, pp, seq, gbs), (lora_tp, lora_ep, lora_seq, lora_gbs, targets, rank, alpha) = MOE_EXPECTED[name]
        assert (full["expert_model_parallel_size"], full["pipeline_model_parallel_size"], full["seq_length"],
                full["global_batch_size"]) == (ep, pp, seq, gbs), name
        assert (full["tensor_model_parallel_size"], full["expert_tensor_parallel_size"], full["sequence_parallel"],
                full["lr"], full["peft"]) == (1, 1, False, 5e-6, None), name
        assert full["calculate_per_token_loss"] and not full["average_in_collective"], name
        assert (lora["tensor_model_parallel_size"], lora["expert_model_parallel_size"], lora["seq_length"],
                lora["global_batch_size"], lora["lora"]) == (lora_tp, lora_ep, lora_seq, lora_gbs,
                                                             [targets, rank, alpha]), name
        assert lora["sequence_parallel"] == (lora_tp > 1) and lora["pipeline_model_parallel_size"] == 1, name
        assert lora["lr"] == 1e-4 and lora["expert_tensor_parallel_size"] == 1, name
        assert {k: from_yaml[k] for k in full} == full, name


def test_mamba_hybrid_presets_build_the_published_model_with_bridges_parallelism(preset_shapes):
    """Nemotron 3 Nano 30B-A3B and Nano 4B: the published layer pattern, Mamba heads / head dim / state / groups /
    chunk, attention and MoE shapes, and Megatron-Bridge 0.6.2's recipe settings (nemotronh/h100) for SFT and LoRA."""
    lora_targets = {"nemotron3_nano_30b_a3b": (["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj",
                                                "out_proj"], 32, 32),
                    "nemotron3_nano_4b": (["linear_qkv", "linear_proj"], 8, 16)}
    # preset: (TP, EP, seq, global batch)
    parallel = {"nemotron3_nano_30b_a3b": (1, 8, 2048, 128), "nemotron3_nano_4b": (1, 1, 2048, 32)}
    for name, hf in HYBRID_PUBLISHED.items():
        full, lora, from_yaml = (preset_shapes[name][key] for key in ("full", "lora", "yaml"))
        assert (full["num_layers"], full["hidden_size"], full["num_attention_heads"], full["num_query_groups"],
                full["kv_channels"], full["vocab_size"]) == (hf["num_hidden_layers"], hf["hidden_size"],
                                                             hf["num_attention_heads"], hf["num_key_value_heads"],
                                                             hf["head_dim"], hf["vocab_size"]), name
        assert full["hybrid_layer_pattern"] == hf["hybrid_override_pattern"], name
        assert (full["mamba_num_heads"], full["mamba_head_dim"], full["mamba_state_dim"], full["mamba_num_groups"],
                full["mamba_chunk_size"]) == (hf["mamba_num_heads"], hf["mamba_head_dim"], hf["ssm_state_size"],
                                              hf["n_groups"], hf["chunk_size"]), name
        if "n_routed_experts" in hf:
            assert (full["num_moe_experts"], full["moe_router_topk"], full["moe_ffn_hidden_size"],
                    full["moe_shared_expert_intermediate_size"]) == (
                hf["n_routed_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"],
                hf["moe_shared_expert_intermediate_size"]), name
        else:
            assert full["num_moe_experts"] is None and full["ffn_hidden_size"] == hf["intermediate_size"], name
        tp, ep, seq, gbs = parallel[name]
        assert (full["tensor_model_parallel_size"], full["expert_model_parallel_size"], full["seq_length"],
                full["global_batch_size"], full["lr"], full["peft"]) == (tp, ep, seq, gbs, 5e-6, None), name
        assert full["calculate_per_token_loss"] and not full["average_in_collective"], name
        assert (lora["tensor_model_parallel_size"], lora["expert_model_parallel_size"], lora["lr"],
                lora["lora"]) == (1, ep, 1e-4, list(lora_targets[name])), name
        assert {k: from_yaml[k] for k in full} == full, name


def test_gated_deltanet_presets_build_the_published_model_with_bridges_parallelism(preset_shapes):
    """Qwen3-Next-80B-A3B, Qwen3.5-27B and -35B-A3B: the published attention, gated-DeltaNet (3 linear-attention
    layers per attention layer, head counts and dims), partial RoPE and MoE shapes, and Megatron-Bridge 0.6.2's
    recipe parallelism for SFT and LoRA (Qwen3-Next: LoRA refused in one line, as Bridge has no recipe for it)."""
    for name, hf in GATED_DELTANET_PUBLISHED.items():
        full, lora, from_yaml = (preset_shapes[name][key] for key in ("full", "lora", "yaml"))
        assert (full["num_layers"], full["hidden_size"], full["num_attention_heads"], full["num_query_groups"],
                full["kv_channels"], full["vocab_size"], full["share_embeddings_and_output_weights"]) == (
            hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["head_dim"], hf["vocab_size"], hf["tie_word_embeddings"]), name
        every = hf["full_attention_interval"]  # megatron's pattern: 1 a gated-DeltaNet layer, 0 an attention layer
        pattern = [0 if (i + 1) % every == 0 else 1 for i in range(hf["num_hidden_layers"])]
        assert (full["experimental_attention_variant"], full["linear_attention_freq"],
                full["attention_output_gate"]) == ("gated_delta_net", pattern, True), name
        assert [full[key] for key in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                                      "linear_num_key_heads", "linear_num_value_heads")] == [
            hf[key] for key in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                                "linear_num_key_heads", "linear_num_value_heads")], name
        rope = hf.get("rope_parameters", hf)
        assert (full["rotary_percent"], full["rotary_base"]) == (rope["partial_rotary_factor"], rope["rope_theta"])
        if "num_experts" in hf:
            assert (full["num_moe_experts"], full["moe_router_topk"], full["moe_ffn_hidden_size"],
                    full["moe_shared_expert_intermediate_size"], full["moe_shared_expert_gate"]) == (
                hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"],
                hf["shared_expert_intermediate_size"], True), name
        else:
            assert full["num_moe_experts"] is None and full["ffn_hidden_size"] == hf["intermediate_size"], name
        expected, expected_lora = GATED_DELTANET_EXPECTED[name]
        parallel = ("tensor_model_parallel_size", "sequence_parallel", "pipeline_model_parallel_size",
                    "expert_model_parallel_size", "seq_length", "global_batch_size", "lr")
        assert tuple(full[key] for key in parallel) == expected and full["peft"] is None, name
        assert full["dataset_seq_length"] == full["seq_length"] and full["expert_tensor_parallel_size"] == 1, name
        assert full["calculate_per_token_loss"] and not full["average_in_collective"], name
        assert {k: from_yaml[k] for k in full} == full, name
        if expected_lora is None:
            assert "has no LoRA preset" in lora["refused"] and "peft=lora" in lora["refused"], name
            continue
        assert tuple(lora[key] for key in parallel) == expected_lora, name
        assert lora["lora"] == [ATTENTION_MLP, 32, 32] and lora["expert_tensor_parallel_size"] == 1, name


def test_long_context_presets_carry_bridges_context_parallel_settings(preset_shapes):
    """Each long-context preset: the published model, Bridge 0.6.2's long-context recipe settings (CP and its
    communication, sequence parallelism, per-sequence padding for CP, per-token loss, no fused cross-entropy,
    YaRN for 128k), the same from recipes/<preset>.yaml, and LoRA on one GPU per CP group."""
    for name, hf in LONG_CONTEXT_PUBLISHED.items():
        full, lora, from_yaml = (preset_shapes[name][key] for key in ("full", "lora", "yaml"))
        tp, sp, cp, comm, seq, gbs, pad, lr, yarn = LONG_CONTEXT_EXPECTED[name]
        assert (full["num_layers"], full["hidden_size"], full["vocab_size"]) == (
            hf["num_hidden_layers"], hf["hidden_size"], hf["vocab_size"]), name
        assert (full["tensor_model_parallel_size"], full["sequence_parallel"], full["context_parallel_size"],
                full["cp_comm_type"]) == (tp, sp, cp, comm), name
        assert (full["seq_length"], full["dataset_seq_length"], full["global_batch_size"],
                full["pad_seq_to_mult"], full["lr"]) == (seq, seq, gbs, pad, lr), name
        assert full["calculate_per_token_loss"] and not full["average_in_collective"], name
        assert full["cross_entropy_loss_fusion"] is False, name
        if yarn:
            assert (full["position_embedding_type"], full["yarn_rotary_scaling_factor"],
                    full["yarn_original_max_position_embeddings"], full["distributed_optimizer"]) == (
                "yarn", yarn, 40960, True), name
        else:
            assert full["position_embedding_type"] == "rope", name
        assert {k: from_yaml[k] for k in full} == full, name
        assert (lora["peft"], lora["tensor_model_parallel_size"], lora["sequence_parallel"],
                lora["context_parallel_size"]) == ("LoRA", 1, False, cp), name


def test_dry_run_prints_the_resolved_config(hf_configs, tmp_path):
    root, data = hf_configs
    recipe = tmp_path / "my.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "qwen3_0p6b", "hf_path": str(root / "qwen3_0p6b"),
                                      "train": {"train_iters": 11}}))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_sft.cli", "train", str(recipe), f"data={data}", "optimizer.lr=3e-6",
         "--dry-run"], cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout[proc.stdout.index("_target_"):])
    assert printed["train"]["train_iters"] == 11
    assert printed["optimizer"]["lr"] == 3e-6
    assert printed["model"]["num_layers"] == 28
    assert printed["dataset"]["data_path"] == str(data)
    assert list(workdir.iterdir()) == []  # a dry run writes nothing


def test_bad_input_is_one_clear_line_and_writes_nothing(tiny_llama, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    gemma3_mm = tmp_path / "gemma3-mm"
    gemma3_mm.mkdir()
    (gemma3_mm / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                       "model_type": "gemma3"}))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                        '{"messages": [\n')
    out = tmp_path / "out"
    ok = [f"hf_path={tiny_llama}", f"output_dir={out}"]
    cases = {
        "missing_hf": ["train", "tiny", f"hf_path={tmp_path / 'nope'}", f"output_dir={out}"],
        "unsupported_arch": ["train", "tiny", f"hf_path={gpt2}", f"output_dir={out}"],
        "missing_data": ["train", "tiny", *ok, f"data={tmp_path / 'nope.jsonl'}"],
        "bad_data": ["train", "tiny", *ok, f"data={bad_json}"],
        "unknown_recipe": ["train", "llama9_1t", *ok],
        "unknown_key": ["train", "tiny", *ok, "train.train_itres=5"],
        "bad_type": ["train", "tiny", *ok, "train.train_iters=many"],
        "missing_hf_path": ["train", "tiny", f"output_dir={out}"],
        "seq_mismatch": ["train", "tiny", *ok, "dataset.seq_length=128"],
        "fp8_without_te": ["train", "tiny", *ok, "model.fp8=hybrid"],  # context parallelism runs without TE
        "multimodal": ["train", "tiny", f"hf_path={gemma3_mm}", f"output_dir={out}"],
        "convert_missing": ["convert", "import", str(tmp_path / "nope"), str(tmp_path / "converted")],
        "lr_below_min_lr": ["train", "tiny", *ok, "lr=1e-5"],  # tiny's min_lr is 2e-4
        "eval_samples_pp": ["train", "tiny", *ok, "eval_samples=2", "pipeline_parallel=2"],
    }
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    out_text = run_python("cli_batch.py", spec).stdout
    results = json.loads(out_text.rsplit("CLI-RESULT ", 1)[1].splitlines()[0])
    expect = {
        "missing_hf": "nope: no such directory",
        "unsupported_arch": "architecture GPT2LMHeadModel is not supported by Megatron-Bridge",
        "missing_data": "nope.jsonl: no such file or directory",
        "bad_data": "bad.jsonl:2: invalid JSON",  # file and line of the bad record
        "unknown_recipe": "unknown recipe 'llama9_1t'",
        "unknown_key": "unknown key 'train.train_itres'. Did you mean train.train_iters",
        "bad_type": "train.train_iters='many': expected int",
        "missing_hf_path": "recipe tiny needs hf_path=...",
        "seq_mismatch": "dataset.seq_length=128 but model.seq_length=256",
        "fp8_without_te": "model.fp8=hybrid needs Transformer Engine, which is not available on the CPU",
        "multimodal": "bridge-sft convert text-only",
        "convert_missing": "nope: no such directory",
        "lr_below_min_lr": "optimizer.min_lr=0.0002 is above optimizer.lr=1e-05",
        "eval_samples_pp": "eval_samples=2 decodes with the model of the training process",
    }
    for name, phrase in expect.items():
        result = results[name]
        assert result["code"] == 2, (name, result)
        assert len(result["error_lines"]) == 1 and phrase in result["error_lines"][0], (name, result)
    assert not out.exists() and not (tmp_path / "converted").exists()


def test_bad_input_exit_code_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bridge_sft.cli", "train", "tiny", f"hf_path={tmp_path / 'x'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: hf_path=")
    assert list(tmp_path.iterdir()) == []
