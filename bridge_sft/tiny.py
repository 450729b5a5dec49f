"""Tiny HF models and tokenizers, built locally with no downloads (tests, demo, notebooks).

``build_tiny_model(out_dir, arch="llama")`` writes a directory that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
and ``AutoBridge.from_hf_pretrained`` all accept: ``config.json``, random
weights in ``model.safetensors`` and a small byte-level BPE tokenizer trained
on the bundled ChatterBot dialogs, with a chat template in the style of the
family (``TINY_ARCHS`` lists them with their HF class and template style).
Everything is deterministic for a given seed.

The shapes are the family's own features at toy size: grouped-query attention,
sliding-window layers (window ``SLIDING_WINDOW`` tokens, so sequences longer than
it exercise the window), Gemma's soft-capping and zero-centred norms, gpt-oss's
attention sinks and biases, DeepSeek/GLM multi-latent attention or shared experts
with a first dense layer, and 4 routed experts (top 2) for every MoE family.

``build_published_tiny_model(out_dir, name)`` builds instead the tiny stand-in of a flagship's
published config (``bridge_sft.published_configs``: Llama 3.2 1B, Gemma 3 1B and 4B, DeepSeek-V3,
Moonlight...): only the sizes shrunk, every other field (RoPE bases and scaling, head_dim, windows,
soft-caps, routing) as published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bridge_sft.tiny_templates import STYLES, TokenizerStyle  # noqa: F401  (TokenizerStyle: re-exported)

SAMPLE_DIALOGS = Path(__file__).parent / "data" / "samples" / "chatterbot.jsonl"

SLIDING_WINDOW = 16  # tokens; tiny sliding-window layers see this much context

@dataclass(frozen=True)
class TinySizes:
    """Shape of a tiny model; the defaults train in milliseconds per step on a CPU."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512  # tokenizer vocabulary, specials included
    max_position_embeddings: int = 2048
    num_experts: int = 4  # MoE families: routed experts, 2 active per token
    moe_intermediate_size: int = 32


def _dialog_texts(path: Path = SAMPLE_DIALOGS) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                texts.append(message["content"])
    return texts


def build_tiny_tokenizer(style: str = "chatml", vocab_size: int = 512):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with a chat template.

    ``style`` is a key of ``STYLES``: ``"llama"`` (Llama 3 headers, turns end with
    ``<|eot_id|>``), ``"chatml"`` (Qwen, ``<|im_end|>``), ``"gemma"``, ``"mistral"``,
    ``"harmony"`` (gpt-oss), ``"deepseek"``, ``"glm"``, ``"nemotron"``, ``"nemotron_h"`` or ``"nemotron3"``
    (reasoning on/off through ``enable_thinking``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, not {style!r}")
    spec = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_dialog_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        chat_template=spec.template,
    )


def _dense(s: TinySizes) -> dict:
    return dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings)


def _alternating_windows(s: TinySizes) -> list[str]:
    """Sliding-window layers first, a full-attention layer every second layer."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.num_hidden_layers)]


def _llama(s):
    return {**_dense(s), "rms_norm_eps": 1e-6}


def _qwen3(s):
    return {**_llama(s), "head_dim": s.hidden_size // s.num_attention_heads}


def _qwen3_moe(s):
    return {**_qwen3(s), "num_experts": s.num_experts, "num_experts_per_tok": 2,
            "moe_intermediate_size": s.moe_intermediate_size, "norm_topk_prob": True}


def _mistral(s):
    return {**_llama(s), "sliding_window": None, "head_dim": s.hidden_size // s.num_attention_heads}


def _gemma2(s):
    head_dim = s.hidden_size // s.num_attention_heads
    return {**_dense(s), "rms_norm_eps": 1e-6, "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
            "sliding_window": SLIDING_WINDOW, "layer_types": _alternating_windows(s),
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}


def _gemma3(s):
    head_dim = s.hidden_size // s.num_attention_heads
    return {**_dense(s), "rms_norm_eps": 1e-6, "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
            "sliding_window": SLIDING_WINDOW, "layer_types": _alternating_windows(s),
            "hidden_activation": "gelu_pytorch_tanh"}


def _nemotron(s):
    return {**_dense(s), "norm_eps": 1e-5, "head_dim": s.hidden_size // s.num_attention_heads,
            "hidden_act": "relu2", "partial_rotary_factor": 0.5}


def _gpt_oss(s):
    """Expert width equal to the hidden size, as in gpt-oss-20b/120b (Bridge reads the square
    down_proj in the layout transformers writes)."""
    return {**_dense(s), "intermediate_size": s.hidden_size, "rms_norm_eps": 1e-5,
            "head_dim": s.hidden_size // s.num_attention_heads, "num_local_experts": s.num_experts,
            "num_experts_per_tok": 2, "sliding_window": SLIDING_WINDOW, "layer_types": _alternating_windows(s)}


def _olmoe(s):
    """Multi-head attention (no GQA) with full-width q/k norms, as OLMoE-1B-7B."""
    return {**_dense(s), "num_key_value_heads": s.num_attention_heads, "intermediate_size": s.moe_intermediate_size,
            "rms_norm_eps": 1e-5,
            "num_experts": s.num_experts, "num_experts_per_tok": 2}


def _deepseek_v3(s):
    """MLA (q and kv low-rank), one dense layer then MoE layers with a shared expert."""
    return {**_dense(s), "rms_norm_eps": 1e-6, "num_key_value_heads": s.num_attention_heads,
            "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "n_routed_experts": s.num_experts, "num_experts_per_tok": 2, "n_shared_experts": 1,
            "moe_intermediate_size": s.moe_intermediate_size, "first_k_dense_replace": 1, "n_group": 1,
            "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True}


def _glm4_moe(s):
    """GQA with partial rotary and q/k norms, one dense layer then MoE layers with a shared expert."""
    return {**_dense(s), "rms_norm_eps": 1e-5, "head_dim": s.hidden_size // s.num_attention_heads,
            "partial_rotary_factor": 0.5, "use_qk_norm": True, "attention_bias": True,
            "n_routed_experts": s.num_experts, "num_experts_per_tok": 2, "n_shared_experts": 1,
            "moe_intermediate_size": s.moe_intermediate_size, "first_k_dense_replace": 1, "n_group": 1,
            "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True}


def _nemotron_h_mamba(s):
    """Mamba-2 layers as Nemotron-H 8B's (expand 2: 16 heads of 8 = 2 x hidden; 8 heads per group; conv 4) at
    toy size, with chunks of 16 tokens so that the tests' dialogs cross several."""
    return {"hidden_size": s.hidden_size, "max_position_embeddings": s.max_position_embeddings,
            "mamba_num_heads": 16, "mamba_head_dim": 2 * s.hidden_size // 16, "n_groups": 2, "ssm_state_size": 16,
            "conv_kernel": 4, "expand": 2, "chunk_size": 16, "use_conv_bias": True, "mamba_proj_bias": False,
            "use_mamba_kernels": False, "layer_norm_epsilon": 1e-5}


def _nemotron_h(s):
    """Nemotron-H: Mamba-2, attention (no RoPE) and squared-ReLU MLP layers, each a layer of its own."""
    return {**_nemotron_h_mamba(s), "layers_block_type": ["mamba", "mlp", "mamba", "attention", "mlp"],
            "num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
            "head_dim": s.hidden_size // s.num_attention_heads, "intermediate_size": s.intermediate_size,
            "mlp_hidden_act": "relu2"}


def _nemotron_h_moe(s):
    """Nemotron 3 Nano: the MLP layers are MoE layers (sigmoid router with expert bias, top 2 of 4, a shared
    expert, routed scaling 2.5)."""
    return {**_nemotron_h(s), "layers_block_type": ["mamba", "moe", "mamba", "attention", "moe"],
            "n_routed_experts": s.num_experts, "num_experts_per_tok": 2,
            "moe_intermediate_size": s.moe_intermediate_size, "moe_shared_expert_intermediate_size": 2 * s.moe_intermediate_size, "n_shared_experts": 1,
            "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "norm_topk_prob": True}



# Falcon-H1's muP multipliers, each a distinct value away from 1 so that a multiplier dropped or swapped in
# conversion or in a layer changes the outputs. The LM head and SSM outputs are scaled up (the published 0.04 and
# 0.24 leave random-weight logits nearly flat, 6e-3 apart): the tiny model's losses then show a Mamba state that
# leaks between packed samples (the published values are in bridge_sft.published_configs).
FALCON_H1_MULTIPLIERS = dict(embedding_multiplier=5.6, lm_head_multiplier=8.0, key_multiplier=0.39,
                             attention_in_multiplier=1.1, attention_out_multiplier=0.94, ssm_in_multiplier=1.25,
                             ssm_out_multiplier=2.4, mlp_multipliers=[0.88, 0.59],
                             ssm_multipliers=[0.35, 0.25, 0.45, 0.5, 0.3])


def _falcon_h1(s):
    """Falcon-H1: every layer runs Mamba-2 and attention side by side on one norm, then a SwiGLU MLP, with muP
    multipliers (``FALCON_H1_MULTIPLIERS``); Mamba-2 with d_ssm = 1.5 x hidden in heads of 8 and one group as
    Falcon-H1-1.5B-Instruct (d_ssm 3072 = 1.5 x 2048), chunks of 16 tokens so that the dialogs cross several."""
    return {**_dense(s), "rms_norm_eps": 1e-5, "head_dim": s.hidden_size // s.num_attention_heads,
            "mamba_d_ssm": 96, "mamba_n_heads": 12, "mamba_d_head": 8, "mamba_n_groups": 1, "mamba_d_state": 16,
            "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 16, "mamba_conv_bias": True,
            "mamba_proj_bias": False, "mamba_norm_before_gate": False, "mamba_rms_norm": True,
            "projectors_bias": False, "attention_bias": False, "mlp_bias": False,
            **FALCON_H1_MULTIPLIERS}


# arch -> (transformers config class, tokenizer style, config fields for TinySizes, ties embeddings)
TINY_ARCHS = {
    "llama": ("LlamaConfig", "llama", _llama, False),
    "qwen2": ("Qwen2Config", "chatml", _llama, False),
    "qwen3": ("Qwen3Config", "chatml", _qwen3, False),
    "mistral": ("MistralConfig", "mistral", _mistral, False),
    "gemma2": ("Gemma2Config", "gemma", _gemma2, True),
    "gemma3": ("Gemma3TextConfig", "gemma", _gemma3, True),
    "nemotron": ("NemotronConfig", "nemotron", _nemotron, False),
    "qwen3_moe": ("Qwen3MoeConfig", "chatml", _qwen3_moe, False),
    "gpt_oss": ("GptOssConfig", "harmony", _gpt_oss, False),
    "olmoe": ("OlmoeConfig", "chatml", _olmoe, False),
    "deepseek_v3": ("DeepseekV3Config", "deepseek", _deepseek_v3, False),
    "glm4_moe": ("Glm4MoeConfig", "glm", _glm4_moe, False),
    "nemotron_h": ("NemotronHConfig", "nemotron_h", _nemotron_h, False),
    "nemotron_h_moe": ("NemotronHConfig", "nemotron3", _nemotron_h_moe, False),
    "falcon_h1": ("FalconH1Config", "falcon", _falcon_h1, False),
}
MOE_ARCHS = ("qwen3_moe", "gpt_oss", "olmoe", "deepseek_v3", "glm4_moe", "nemotron_h_moe")


# --- 2026 families (issue 20): Gemma 4, EXAONE 4, ERNIE 4.5 MoE, MiniMax-M2 ---
def _exaone4(s):
    """EXAONE 4.0 32B's layout: 3 sliding-window layers (RoPE) then 1 global layer (no RoPE), post-norms, q/k norms."""
    return {**_dense(s), "num_hidden_layers": 4, "rms_norm_eps": 1e-5, "head_dim": s.hidden_size // s.num_attention_heads,
            "sliding_window": SLIDING_WINDOW, "sliding_window_pattern": "LLLG",
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}


def _ernie4_5_moe(s):
    """A dense first layer, then MoE layers with a shared expert and an expert-bias (aux-free) router."""
    return {**_dense(s), "rms_norm_eps": 1e-5, "head_dim": s.hidden_size // s.num_attention_heads,
            "moe_num_experts": s.num_experts, "moe_k": 2, "moe_intermediate_size": s.moe_intermediate_size,
            "moe_num_shared_experts": 1, "moe_layer_start_index": 1, "moe_layer_end_index": -1,
            "moe_layer_interval": 1}


def _minimax_m2(s):
    """Every layer MoE (sigmoid router with expert bias), full-width q/k norms, RoPE on half of each head
    (published ``rotary_dim``, with the ``partial_rotary_factor`` transformers 5.12 needs: see published_configs)."""
    head_dim = s.hidden_size // s.num_attention_heads
    return {**_dense(s), "intermediate_size": s.moe_intermediate_size, "rms_norm_eps": 1e-6, "head_dim": head_dim,
            "num_local_experts": s.num_experts, "num_experts_per_tok": 2, "rotary_dim": head_dim // 2,
            "partial_rotary_factor": 0.5, "use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid",
            "use_routing_bias": True}


def _gemma4(s):
    """Gemma 4 E-model features: sliding-window and global layers (wider global heads, partial RoPE), per-layer
    inputs, the last layers sharing the k/v of earlier ones, soft-capped logits (the 5:1 pattern: gemma-4-e4b)."""
    head_dim = s.hidden_size // s.num_attention_heads
    return {**_dense(s), "num_hidden_layers": 4, "rms_norm_eps": 1e-6, "head_dim": head_dim,
            "global_head_dim": 2 * head_dim, "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2, "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": s.vocab_size,
            "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}


TINY_ARCHS.update({
    "gemma4": ("Gemma4TextConfig", "gemma4", _gemma4, True),
    "exaone4": ("Exaone4Config", "exaone", _exaone4, False),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "ernie", _ernie4_5_moe, True),
    "minimax_m2": ("MiniMaxM2Config", "minimax", _minimax_m2, False),
})
MOE_ARCHS = MOE_ARCHS + ("ernie4_5_moe", "minimax_m2")


def _gated_deltanet(s):
    """Qwen3-Next / Qwen3.5 layers at toy size: 3 gated-DeltaNet layers then 1 gated-attention layer (the published
    full_attention_interval 4); the flagships' 2 value heads per key head (16/32), their conv width 4; attention
    heads twice the hidden width (Qwen3.5-9B: 16 x 256 = 4096) with a quarter of each head rotated."""
    head_dim = 2 * s.hidden_size // s.num_attention_heads
    return {**_dense(s), "num_hidden_layers": 4, "rms_norm_eps": 1e-6, "head_dim": head_dim,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}


def _gated_deltanet_moe(s):
    """The MoE members: every layer's MLP is routed experts (top 2 of 4, softmax, renormalised) beside a gated
    shared expert."""
    return {**_gated_deltanet(s), "num_experts": s.num_experts, "num_experts_per_tok": 2,
            "moe_intermediate_size": s.moe_intermediate_size, "shared_expert_intermediate_size": s.moe_intermediate_size}


def _qwen3_next(s):
    return {**_gated_deltanet_moe(s), "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}


TINY_ARCHS.update({
    "qwen3_5": ("Qwen3_5TextConfig", "qwen3_5", _gated_deltanet, False),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "qwen3_5", _gated_deltanet_moe, False),
    "qwen3_next": ("Qwen3NextConfig", "qwen3_5", _qwen3_next, False),
})
MOE_ARCHS = MOE_ARCHS + ("qwen3_5_moe", "qwen3_next")


def _gemma4_moe(s):
    """Gemma 4 26B-A4B's layers at toy size (its published fields: bridge_sft.published_configs): every layer a dense
    shared MLP 3x the experts' width (2112 = 3 x 704) beside routed experts (top 2 of 4 here, 8 of 128 there);
    sliding-window and global layers, the global ones with heads twice as wide, fewer k/v heads (2 against 4 here,
    2 against 8 there) and values equal to their keys (attention_k_eq_v); no per-layer inputs or shared k/v;
    soft-capped logits."""
    return {**_dense(s), "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
            "num_global_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "attention_k_eq_v": True,
            "rms_norm_eps": 1e-6, "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2, "hidden_activation": "gelu_pytorch_tanh",
            "intermediate_size": 3 * s.moe_intermediate_size, "enable_moe_block": True, "num_experts": s.num_experts,
            "top_k_experts": 2, "moe_intermediate_size": s.moe_intermediate_size, "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0, "use_bidirectional_attention": "vision", "final_logit_softcapping": 30.0}


TINY_ARCHS["gemma4_moe"] = ("Gemma4TextConfig", "gemma4", _gemma4_moe, True)
MOE_ARCHS = MOE_ARCHS + ("gemma4_moe",)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    sizes: TinySizes = TinySizes(),
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Write a random-weight HF causal LM and its tokenizer to ``out_dir``; return the path.

    ``arch``: a key of ``TINY_ARCHS`` (``"llama"``, ``"qwen2"`` (q/k/v biases),
    ``"qwen3"`` (q/k RMSNorm), ``"mistral"``, ``"gemma2"``, ``"gemma3"``, ``"nemotron"``,
    and the MoE families ``MOE_ARCHS``). ``tie_word_embeddings``: None keeps the
    family's own choice (Gemma ties, the others do not). Weights are fp32.
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {sorted(TINY_ARCHS)}, not {arch!r}")
    config_name, style, fields, ties = TINY_ARCHS[arch]
    tokenizer = build_tiny_tokenizer(style, sizes.vocab_size)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        rope_theta=10000.0,
        tie_word_embeddings=ties if tie_word_embeddings is None else tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **fields(sizes),
    )
    randomise = arch not in ("llama", "qwen2", "qwen3")  # those stay as first built: tests and the demo rest on them
    return _write_random_model(config, tokenizer, out_dir, seed, randomise)


def _write_random_model(config, tokenizer, out_dir: str | Path, seed: int, randomise: bool) -> Path:
    """An fp32 model of ``config`` with seeded random weights (``_randomise_constant_inits`` when ``randomise``),
    saved with ``tokenizer`` to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if randomise:
        _randomise_constant_inits(model, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _randomise_constant_inits(model, seed: int) -> None:
    """Give every parameter HF initialises to a constant (norm weights, biases, router
    biases, attention sinks) small random values, so that a conversion or layer that
    drops, swaps or mis-shifts one of them changes the outputs and is caught."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            flat = param.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        _randomise_expert_bias(model, generator)


# Model types whose router expert bias (a buffer, left at zero above) the tiny builder randomises, so that
# routing which drops it or applies it to the wrong scores picks other experts and is caught.
RANDOM_EXPERT_BIAS = ("ernie4_5_moe", "minimax_m2")


def _randomise_expert_bias(model, generator) -> None:
    """Add 0.1 * N(0, 1) to every ``e_score_correction_bias`` buffer of a ``RANDOM_EXPERT_BIAS`` model."""
    import torch

    if model.config.model_type not in RANDOM_EXPERT_BIAS:
        return
    for name, buffer in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            buffer.add_(0.1 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))


def published_tiny_config(name: str, tokenizer):
    """The transformers config of the tiny stand-in of a published flagship config (a key of
    ``bridge_sft.published_configs.PUBLISHED``): the flagship's own fields with only its sizes shrunk
    (``published_configs.tiny_fields``), vocabulary and special tokens from ``tokenizer``, fp32."""
    import transformers

    from bridge_sft.published_configs import tiny_fields

    family, fields = tiny_fields(name)
    return getattr(transformers, TINY_ARCHS[family][0])(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **fields,
    )


def build_published_tiny_model(out_dir: str | Path, name: str, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write the tiny stand-in of a published flagship config (a key of
    ``bridge_sft.published_configs.PUBLISHED``, e.g. ``"gemma-3-1b"``, ``"moonlight-16b-a3b"``) to
    ``out_dir`` as ``build_tiny_model`` does: ``published_tiny_config``, random fp32 weights (constant
    initialisations randomised) and a tokenizer of the family's style."""
    from bridge_sft.published_configs import PUBLISHED

    if name not in PUBLISHED:
        raise ValueError(f"name must be one of {sorted(PUBLISHED)}, not {name!r}")
    tokenizer = build_tiny_tokenizer(TINY_ARCHS[PUBLISHED[name][0]][1], vocab_size)
    config = published_tiny_config(name, tokenizer)
    return _write_random_model(config, tokenizer, out_dir, seed, randomise=True)
