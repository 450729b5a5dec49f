"""Preset recipes: ``sft`` with the defaults for one model on H100s, and ``tiny`` for a CPU.

Parallelism, sequence length and batch size follow Megatron-Bridge 0.6.2's own
SFT/PEFT recipes for these models (``megatron/bridge/recipes/{llama,qwen,gemma,gemma3_vl}/h100``).
The default checkpoints are the chat (Instruct) models, whose tokenizers carry
the chat template the data pipeline needs; point ``hf_path`` at a local copy
(or any HF directory of the same architecture) to train offline.

``peft="lora"`` switches a preset to LoRA the way Bridge's PEFT recipes do:
one GPU (TP=1), learning rate 1e-4, no distributed optimizer. Every keyword of
``sft`` can be given to a preset and wins over the preset's default.
"""

from __future__ import annotations

from typing import Any

from bridge_sft.recipes.sft import sft
from bridge_sft.tiny import SAMPLE_DIALOGS

_LORA_DEFAULTS = {"tensor_parallel": 1, "lr": 1e-4, "distributed_optimizer": False}


def _preset(hf_path: str, data, overrides: dict[str, Any], **defaults: Any):
    settings = {"train_iters": 1000, "warmup_iters": 50, "lr": 5e-6, "micro_batch_size": 1, **defaults}
    if overrides.get("peft") == "lora":
        settings.update(_LORA_DEFAULTS)
    settings.update(overrides)
    return sft(hf_path, data, **settings)


def llama32_1b(hf_path: str = "meta-llama/Llama-3.2-1B-Instruct", data=None, **overrides):
    """Llama 3.2 1B, 1 GPU, seq 4096, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=1, global_batch_size=8)


def llama32_3b(hf_path: str = "meta-llama/Llama-3.2-3B-Instruct", data=None, **overrides):
    """Llama 3.2 3B, 1 GPU, seq 4096, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=1, global_batch_size=8)


def llama31_8b(hf_path: str = "meta-llama/Llama-3.1-8B-Instruct", data=None, **overrides):
    """Llama 3.1 8B, TP=2, seq 4096, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=2, global_batch_size=8)


def qwen25_0p5b(hf_path: str = "Qwen/Qwen2.5-0.5B-Instruct", data=None, **overrides):
    """Qwen2.5 0.5B, 1 GPU, seq 2048, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=32)


def qwen25_1p5b(hf_path: str = "Qwen/Qwen2.5-1.5B-Instruct", data=None, **overrides):
    """Qwen2.5 1.5B, 1 GPU, seq 2048, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=32)


def qwen25_7b(hf_path: str = "Qwen/Qwen2.5-7B-Instruct", data=None, **overrides):
    """Qwen2.5 7B, TP=2, seq 2048, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=2, global_batch_size=32)


def qwen3_0p6b(hf_path: str = "Qwen/Qwen3-0.6B", data=None, **overrides):
    """Qwen3 0.6B, 1 GPU, seq 2048, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=8)


def qwen3_1p7b(hf_path: str = "Qwen/Qwen3-1.7B", data=None, **overrides):
    """Qwen3 1.7B, 1 GPU, seq 2048, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=8)


def qwen3_4b(hf_path: str = "Qwen/Qwen3-4B", data=None, **overrides):
    """Qwen3 4B, TP=2, seq 2048, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=2, global_batch_size=8)


def qwen3_8b(hf_path: str = "Qwen/Qwen3-8B", data=None, **overrides):
    """Qwen3 8B, TP=4, seq 2048, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=4, global_batch_size=32)


# Gemma 3 and Mistral. Bridge 0.6.2 has SFT recipes for Gemma 3 1B (text) and 4B/12B/27B (vision-language:
# their language models use the same parallelism here); it has none for Mistral 7B, whose preset follows
# Llama 3.1 8B's (same size class). Gemma 3 4B/12B/27B are published as multimodal
# Gemma3ForConditionalGeneration checkpoints: give these presets their text-only Gemma3ForCausalLM
# (``bridge-sft convert text-only``).


def gemma3_1b(hf_path: str = "google/gemma-3-1b-it", data=None, **overrides):
    """Gemma 3 1B (text), 1 GPU, seq 4096, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=1, global_batch_size=32)


def gemma3_4b(hf_path: str = "google/gemma-3-4b-it", data=None, **overrides):
    """Gemma 3 4B language model, 1 GPU, seq 4096, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=1, global_batch_size=32)


def gemma3_12b(hf_path: str = "google/gemma-3-12b-it", data=None, **overrides):
    """Gemma 3 12B language model, TP=4, seq 4096, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=4, global_batch_size=32)


def gemma3_27b(hf_path: str = "google/gemma-3-27b-it", data=None, **overrides):
    """Gemma 3 27B language model, TP=8 x PP=2, seq 4096, packed global batch 32."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=8, pipeline_parallel=2,
                   global_batch_size=32)


def mistral_7b(hf_path: str = "mistralai/Mistral-7B-Instruct-v0.3", data=None, **overrides):
    """Mistral 7B Instruct v0.3, TP=2, seq 4096, packed global batch 8."""
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=2, global_batch_size=8)


def tiny(hf_path: str, data=str(SAMPLE_DIALOGS), **overrides):
    """A tiny model (``bridge_sft.tiny.build_tiny_model``) on the CPU: fp32, packed seq 256,
    40 iterations of 8 packs, validation every 20, bundled ChatterBot dialogs by default."""
    settings = {
        "output_dir": "outputs/tiny", "seq_length": 256, "global_batch_size": 8, "micro_batch_size": 1,
        "train_iters": 40, "lr": 2e-3, "min_lr": 2e-4, "warmup_iters": 4, "weight_decay": 0.0,
        "precision": "fp32", "distributed_optimizer": False, "eval_interval": 20, "eval_iters": 2,
        "save_interval": 40, "save_hf": True, "log_interval": 5,
    }
    if overrides.get("peft") == "lora":
        settings["lr"] = 1e-2
    settings.update(overrides)
    return sft(hf_path, data, **settings)


PRESETS = {
    fn.__name__: fn
    for fn in (llama32_1b, llama32_3b, llama31_8b, qwen25_0p5b, qwen25_1p5b, qwen25_7b,
               qwen3_0p6b, qwen3_1p7b, qwen3_4b, qwen3_8b, gemma3_1b, gemma3_4b, gemma3_12b, gemma3_27b, mistral_7b)
}


# --- Mixture-of-experts presets (bridge_sft.moe) ------------------------------------------------------------
# Parallelism, sequence length, batch size and LoRA settings of Megatron-Bridge 0.6.2's canonical SFT / PEFT
# recipes for these models (megatron/bridge/recipes/{qwen,gpt_oss,olmoe,moonlight}/h100, the configs their
# module aliases point at); expert tensor parallelism 1 as there. ``full`` is the SFT setting, ``lora`` what
# ``peft="lora"`` changes. The router losses keep the coefficients Bridge reads from the HF config, weighted
# as in pretraining (README "Mixture-of-experts models").


def _moe_preset(hf_path: str, data, overrides: dict[str, Any], lora: dict[str, Any], **full: Any):
    if overrides.get("peft") == "lora":
        overrides = {"pipeline_parallel": 1, "sequence_parallel": False, **lora, **overrides}
    return _preset(hf_path, data, overrides, **full)


def qwen3_30b_a3b(hf_path: str = "Qwen/Qwen3-30B-A3B", data=None, **overrides):
    """Qwen3-30B-A3B (128 experts, top-8): EP=16 (16 GPUs), seq 2048, packed global batch 32.
    LoRA: TP=4 (sequence parallel) x EP=4, rank 8 / alpha 16 on attention only (experts not adapted)."""
    lora = {"tensor_parallel": 4, "sequence_parallel": True, "expert_parallel": 4, "lora_dim": 8, "lora_alpha": 16,
            "lora_targets": ["linear_qkv", "linear_proj"]}
    return _moe_preset(hf_path, data, overrides, lora, seq_length=2048, expert_parallel=16, global_batch_size=32)


def gpt_oss_20b(hf_path: str = "openai/gpt-oss-20b", data=None, **overrides):
    """gpt-oss-20b (32 experts, top-4): EP=8, seq 2048, packed global batch 128.
    LoRA: 1 GPU, rank 32 on attention and MLP (experts adapted)."""
    return _moe_preset(hf_path, data, overrides, {"expert_parallel": 1}, seq_length=2048, expert_parallel=8,
                       global_batch_size=128)


def gpt_oss_120b(hf_path: str = "openai/gpt-oss-120b", data=None, **overrides):
    """gpt-oss-120b (128 experts, top-4): PP=4 x EP=8 (32 GPUs), seq 2048, packed global batch 128.
    LoRA: EP=8 (8 GPUs), rank 32 on attention and MLP (experts adapted)."""
    return _moe_preset(hf_path, data, overrides, {"expert_parallel": 8}, seq_length=2048, pipeline_parallel=4,
                       expert_parallel=8, global_batch_size=128)


def olmoe_1b_7b(hf_path: str = "allenai/OLMoE-1B-7B-0924-Instruct", data=None, **overrides):
    """OLMoE-1B-7B (64 experts, top-8): EP=8, seq 4096, packed global batch 128.
    LoRA: 1 GPU, rank 32 on attention and MLP (experts adapted)."""
    return _moe_preset(hf_path, data, overrides, {"expert_parallel": 1}, seq_length=4096, expert_parallel=8,
                       global_batch_size=128)


def moonlight_16b_a3b(hf_path: str = "moonshotai/Moonlight-16B-A3B-Instruct", data=None, **overrides):
    """Moonlight-16B-A3B (DeepSeek-V3 architecture: MLA attention, 64 routed + 2 shared experts, top-6):
    EP=8, seq 8192, packed global batch 8. LoRA: EP=4, seq 2048, global batch 32, rank 8 / alpha 16 on the
    MLA projections only."""
    lora = {"expert_parallel": 4, "seq_length": 2048, "global_batch_size": 32, "lora_dim": 8, "lora_alpha": 16,
            "lora_targets": ["linear_q_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]}
    return _moe_preset(hf_path, data, overrides, lora, seq_length=8192, expert_parallel=8, global_batch_size=8)


def nemotron3_nano_30b_a3b(hf_path: str = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", data=None, **overrides):
    """Nemotron 3 Nano 30B-A3B (Mamba-2 / attention / MoE hybrid, 128 experts, top-6): EP=8, seq 2048, packed
    global batch 128. LoRA: EP=8, rank 32 / alpha 32 on attention, MLP and the Mamba in/out projections."""
    lora = {"expert_parallel": 8, "lora_dim": 32, "lora_alpha": 32,
            "lora_targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj"]}
    return _moe_preset(hf_path, data, overrides, lora, seq_length=2048, expert_parallel=8, global_batch_size=128)


MOE_PRESETS = {fn.__name__: fn for fn in (qwen3_30b_a3b, gpt_oss_20b, gpt_oss_120b, olmoe_1b_7b, moonlight_16b_a3b,
                                          nemotron3_nano_30b_a3b)}
PRESETS.update(MOE_PRESETS)


# --- Mamba-2 hybrids (bridge_sft.runtime.mamba where mamba_ssm is missing) -----------------------------------
# Megatron-Bridge 0.6.2's recipes megatron/bridge/recipes/nemotronh/h100/nemotron_3_nano_4b.py (SFT and PEFT).


def nemotron3_nano_4b(hf_path: str = "nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16", data=None, **overrides):
    """Nemotron 3 Nano 4B (dense Mamba-2 / attention hybrid): 1 GPU per replica, seq 2048, packed global batch
    32. LoRA: rank 8 / alpha 16 on attention only."""
    if overrides.get("peft") == "lora":
        overrides = {"lora_dim": 8, "lora_alpha": 16, "lora_targets": ["linear_qkv", "linear_proj"], **overrides}
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=32)


HYBRID_PRESETS = {fn.__name__: fn for fn in (nemotron3_nano_4b,)}
PRESETS.update(HYBRID_PRESETS)


# --- Long-context presets (context parallelism) ---------------------------------------------------------------
# Megatron-Bridge 0.6.2's long-context SFT recipes (megatron/bridge/recipes/qwen/h100/qwen3.py:
# qwen3_8b_sft_8gpu_h100_bf16_32k_config, qwen3_600m_sft_8gpu_h100_bf16_yarn_128k_config): context parallelism
# (each sequence split over CP ranks, every packed sequence padded to a multiple of 2 x CP, Bridge's
# ``pad_seq_to_mult``), per-token loss averaging (some CP ranks hold no supervised token), no fused
# cross-entropy. Training without TE runs the same settings on te_torch's attention (bridge_sft.runtime).


def _long_context(config, pad_seq_to_mult: int | None = None, cp_comm_type: str | None = None):
    config.model.cross_entropy_loss_fusion = False
    config.model.calculate_per_token_loss = True
    config.ddp.average_in_collective = False
    if cp_comm_type is not None:
        config.model.cp_comm_type = cp_comm_type
    if pad_seq_to_mult is not None and hasattr(config.dataset, "pad_seq_to_mult"):
        config.dataset.pad_seq_to_mult = pad_seq_to_mult
    return config


def qwen3_8b_32k(hf_path: str = "Qwen/Qwen3-8B", data=None, **overrides):
    """Qwen3 8B at 32k tokens: TP=4 (sequence parallel) x CP=2 (all-to-all), 8 GPUs per replica, packed
    global batch 8, sequences padded to multiples of 8 (Bridge's 32k recipe)."""
    lora = overrides.get("peft") == "lora"  # LoRA: TP=1 (Bridge's PEFT default), so no sequence parallelism
    config = _preset(hf_path, data, overrides, seq_length=32768, tensor_parallel=4, sequence_parallel=not lora,
                     context_parallel=2, global_batch_size=8)
    cp = config.model.context_parallel_size
    return _long_context(config, pad_seq_to_mult=8 if cp == 2 else None, cp_comm_type="a2a")


def qwen3_0p6b_128k(hf_path: str = "Qwen/Qwen3-0.6B", data=None, **overrides):
    """Qwen3 0.6B at 128k tokens with YaRN (RoPE stretched from its native 40,960 positions, factor 3.2):
    CP=8 (8 GPUs per replica), packed global batch 8, lr 1e-6 constant after 10 warmup steps, distributed
    optimizer (Bridge's YaRN 128k recipe)."""
    settings = {"seq_length": 131072, "context_parallel": 8, "global_batch_size": 8, "lr": 1e-6, "min_lr": 1e-6,
                "warmup_iters": 10, "distributed_optimizer": True}
    config = _long_context(_preset(hf_path, data, overrides, **settings))
    model = config.model
    model.position_embedding_type = "yarn"
    model.yarn_original_max_position_embeddings = 40960
    model.yarn_rotary_scaling_factor = model.seq_length / model.yarn_original_max_position_embeddings
    model.yarn_beta_fast, model.yarn_beta_slow = 32.0, 1.0
    model.yarn_mscale, model.yarn_mscale_all_dim = 1.0, 1.0
    model.yarn_correction_range_round_to_int = False
    return config


LONG_CONTEXT_PRESETS = {fn.__name__: fn for fn in (qwen3_8b_32k, qwen3_0p6b_128k)}
PRESETS.update(LONG_CONTEXT_PRESETS)


# --- 2026 families (issue 20) ------------------------------------------------------------------------------
# Megatron-Bridge 0.6.2 has SFT / PEFT recipes for EXAONE 4.0 1.2B only among EXAONE 4, ERNIE 4.5, MiniMax-M2
# and Gemma 4 (recipes/exaone/h100/exaone4.py; Gemma 4: E4B pretraining only; MiniMax: M3 only; ERNIE: none).


def exaone4_1p2b(hf_path: str = "LGAI-EXAONE/EXAONE-4.0-1.2B", data=None, **overrides):
    """EXAONE 4.0 1.2B, 1 GPU, seq 2048, packed global batch 128 (full SFT and LoRA alike, as Bridge's recipes)."""
    return _preset(hf_path, data, overrides, seq_length=2048, tensor_parallel=1, global_batch_size=128)


PRESETS.update({fn.__name__: fn for fn in (exaone4_1p2b,)})


# Qwen3-Next and Qwen3.5 (gated DeltaNet + gated attention hybrids). Megatron-Bridge 0.6.2's recipes:
# recipes/qwen/h100/qwen3_next.py (SFT; its PEFT recipe raises NotImplementedError) and, for Qwen3.5, the SFT / PEFT
# recipes of the vision-language checkpoints (recipes/qwen_vl/h100/qwen35_vl.py; Bridge has text-only Qwen3.5
# recipes for pretraining only), whose parallelism the language model keeps here, as for Gemma 3 above. Bridge's
# recipes set one multi-token-prediction layer (mtp_num_layers 1); here it comes from the checkpoint's config.json
# (Bridge maps mtp_num_hidden_layers / num_nextn_predict_layers to it), as for every preset.
# Bridge's Qwen3-Next recipe does not pack ("Packed sequence is NOT supported"; 64 samples a step, unpacked), yet
# megatron-core 0.19's GatedDeltaNet takes packed THD batches (ssm/gated_delta_net/gdn.py: cu_seqlens): these presets
# pack, as every preset does (packed == unpacked is tested per family in tests/test_families.py).
# Qwen3.5 checkpoints are published as Qwen3_5(Moe)ForConditionalGeneration: give these presets a text-only
# Qwen3_5(Moe)ForCausalLM directory (model_type qwen3_5_text / qwen3_5_moe_text).


def qwen3_next_80b_a3b(hf_path: str = "Qwen/Qwen3-Next-80B-A3B-Instruct", data=None, **overrides):
    """Qwen3-Next-80B-A3B (48 layers, 3 gated-DeltaNet per gated-attention layer; 512 experts, top-10, a shared
    expert): PP=2 x EP=8 (16 GPUs), seq 2048, global batch 64. No LoRA preset: Bridge 0.6.2 has no PEFT recipe
    for Qwen3-Next."""
    if overrides.get("peft") == "lora":
        raise ValueError("qwen3_next_80b_a3b has no LoRA preset: Megatron-Bridge 0.6.2's Qwen3-Next PEFT recipe "
                         "refuses PEFT (NotImplementedError); train it in full (drop peft=lora), or run the generic "
                         "recipe `bridge-sft train sft hf_path=... peft=lora` with parallelism of your own")
    return _preset(hf_path, data, overrides, seq_length=2048, pipeline_parallel=2, expert_parallel=8,
                   global_batch_size=64)


def qwen35_27b(hf_path: str = "Qwen/Qwen3.5-27B", data=None, **overrides):
    """Qwen3.5-27B language model (64 layers, 3 gated-DeltaNet per gated-attention layer): TP=4 x PP=4 (16 GPUs),
    seq 4096, packed global batch 32. LoRA: TP=2 (2 GPUs), rank 32 / alpha 32 on attention and MLP."""
    if overrides.get("peft") == "lora":
        overrides = {"tensor_parallel": 2, "pipeline_parallel": 1, **overrides}
    return _preset(hf_path, data, overrides, seq_length=4096, tensor_parallel=4, pipeline_parallel=4,
                   global_batch_size=32)


def qwen35_35b_a3b(hf_path: str = "Qwen/Qwen3.5-35B-A3B", data=None, **overrides):
    """Qwen3.5-35B-A3B language model (40 layers, 3 gated-DeltaNet per gated-attention layer; 256 experts, top-8,
    a shared expert): TP=2 (sequence parallel) x EP=16 (16 GPUs), seq 4096, packed global batch 32, lr 2e-5.
    LoRA: TP=2 (sequence parallel) x EP=4 (4 GPUs), lr 2e-4, rank 32 / alpha 32 on attention and MLP (experts
    adapted)."""
    lora = {"tensor_parallel": 2, "sequence_parallel": True, "expert_parallel": 4, "lr": 2e-4}
    return _moe_preset(hf_path, data, overrides, lora, seq_length=4096, tensor_parallel=2, sequence_parallel=True,
                       expert_parallel=16, global_batch_size=32, lr=2e-5)


GATED_DELTANET_PRESETS = {fn.__name__: fn for fn in (qwen3_next_80b_a3b, qwen35_27b, qwen35_35b_a3b)}
PRESETS.update(GATED_DELTANET_PRESETS)
