"""HF checkpoint -> Megatron model provider, with what bridge-sft adds to Bridge's model bridges.

``megatron_provider(hf_path)`` is ``AutoBridge.from_hf_pretrained(hf_path).to_megatron_provider()``
plus two kinds of additions, each for a documented gap in Megatron-Bridge 0.6.2:

- the provider is made to follow the HF config where Bridge's bridge ignores part
  of it (Gemma 3's pattern of sliding-window and global layers comes from its
  ``layer_types`` instead of Bridge's fixed 5:1);
- model families whose Bridge layers cannot take packed (THD) sequences get a
  core attention that can (Gemma 2: soft-capped attention, run per sequence).

What the model or this host cannot build is refused in one line by ``bridge_sft.model_checks``
(``check_model``, and the HF config check ``megatron_provider`` runs first), re-exported here.
"""

from __future__ import annotations

import logging

import torch
from megatron.bridge import AutoBridge
from megatron.bridge.models.gemma.gemma2_provider import (
    Gemma2DotProductAttention,
    Gemma2FlexDotProductAttention,
    Gemma2ModelProvider,
    gemma2_layer_spec,
)
from megatron.bridge.models.gemma.gemma3_provider import Gemma3ModelProvider
from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

from bridge_sft import bridge_fixes, runtime
from bridge_sft.model_checks import (  # noqa: F401  (re-exported: the entry points import them from here)
    UnsupportedModelError,
    _check_hf_config,
    check_model,
    check_provider,
    interleaved_window_pattern,
    multimodal_message,
)

logger = logging.getLogger(__name__)

# Checkpoints record a provider's layer spec by import path (run_config.yaml), and Bridge re-instantiates it
# when it reads one (export, loading) only from allowed prefixes: allow this module's (gemma2_packed_layer_spec).
register_allowed_target_prefix(f"{__name__}.")


def megatron_provider(hf_path: str | AutoBridge, load_weights: bool = False):
    """The Megatron ``GPTModelProvider`` for the HF checkpoint at ``hf_path`` (a path, hub id or an
    ``AutoBridge`` of one; weights loaded at build time when ``load_weights``), checked and adapted
    as the module docstring says."""
    bridge_fixes.apply()
    bridge = hf_path if isinstance(hf_path, AutoBridge) else AutoBridge.from_hf_pretrained(hf_path)
    hf_config = bridge.hf_pretrained.config
    _check_hf_config(getattr(hf_config, "_name_or_path", "") or str(hf_path), hf_config)
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    _gpt_oss_dtype_from_checkpoint(provider, hf_config)
    _follow_gemma3_layer_types(provider, hf_config)
    _packed_attention_for_gemma2(provider)
    _mla_latent_norm_eps(provider)
    _no_experts_without_moe_layers(provider, hf_config)
    _exaone4_as_hf(provider, hf_config)
    _ernie45_as_hf(provider, hf_config)
    _gemma4_moe_as_hf(provider, hf_config)
    _gemma4_unpadded_vocab(provider, hf_config)
    return provider


def _no_experts_without_moe_layers(provider, hf_config) -> None:
    """Bridge's Nemotron-H bridge sets ``num_moe_experts`` from ``n_routed_experts`` even when the layer pattern
    has no MoE layer ("E"): a dense Nemotron-H (8B, Nano 4B) then reads as an 8-expert MoE model (transformers'
    NemotronHConfig default), which megatron-core's checks and bridge_sft's router-loss handling act on. No
    layer is built differently; clear the experts so the model is the dense model it is."""
    pattern = getattr(provider, "hybrid_layer_pattern", None)
    if getattr(hf_config, "model_type", "") == "nemotron_h" and pattern and "E" not in pattern:
        provider.num_moe_experts = None
        provider.moe_shared_expert_intermediate_size = provider.moe_ffn_hidden_size = None
        provider.moe_router_num_groups = provider.moe_router_group_topk = None


# Model types whose Bridge provider hard-codes bf16 parameters (gpt-oss; Gemma 4's dense and MoE providers).
BF16_PROVIDERS = ("gpt_oss", "gemma4_text")


def _gpt_oss_dtype_from_checkpoint(provider, hf_config) -> None:
    """Bridge's GPT-OSS and Gemma 4 providers hard-code bf16 parameters, whatever the checkpoint's dtype (the
    other bridges read it with ``dtype_from_hf``): an fp32 checkpoint would be rounded to bf16 on import, and
    its round trip would not be exact. Use the checkpoint's dtype (bf16 for the published models)."""
    if getattr(hf_config, "model_type", "") not in BF16_PROVIDERS:
        return
    dtype = getattr(hf_config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        return
    provider.params_dtype = dtype
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16


def _follow_gemma3_layer_types(provider, hf_config) -> None:
    """Bridge's Gemma 3 provider alternates sliding-window and global layers in a fixed 5:1 pattern
    (``interleaved_attn_pattern``) and ignores the checkpoint's ``layer_types``; set the pattern from
    them (the published models follow 5:1, so nothing changes for them) or refuse a non-periodic one."""
    layer_types = getattr(hf_config, "layer_types", None)
    if not isinstance(provider, Gemma3ModelProvider) or not layer_types:
        return
    pattern = interleaved_window_pattern(layer_types)
    if pattern is None:
        raise UnsupportedModelError(
            f"Gemma 3 layer_types {layer_types} are not a repeating pattern of sliding-window layers followed "
            "by one global layer, the only layout Megatron-Bridge 0.6.2's Gemma 3 model can build."
        )
    if tuple(provider.interleaved_attn_pattern) != pattern:
        logger.info("Gemma 3: %d sliding-window layer(s) per global layer, as the checkpoint's layer_types say",
                    pattern[0])
        provider.interleaved_attn_pattern = pattern


# transformers 5.12's MLA attentions (deepseek_v2, deepseek_v3, deepseek_v32, glm4_moe_lite, glm_moe_dsa,
# longcat_flash, mistral4, youtu) build the compressed query and key/value norms (q_a_layernorm,
# kv_a_layernorm) with their RMSNorm's default epsilon, not the config's rms_norm_eps.
MLA_LATENT_NORM_EPS = 1e-6


def _mla_latent_norm_eps(provider) -> None:
    """Megatron's MLA normalises the compressed query and key/value with the model's
    ``layernorm_epsilon`` (HF ``rms_norm_eps``), while HF (and DeepSeek's reference code) uses 1e-6
    there whatever ``rms_norm_eps`` says: a model with ``rms_norm_eps`` 1e-5 (Moonlight-16B-A3B) gives
    per-token losses ~5e-3 away from HF's. Bridge 0.6.2 does not carry the difference, on any host (a TE
    GPU's fused norm + linear reads the same epsilon). Set those norms' epsilon after the model is built."""
    if not getattr(provider, "multi_latent_attention", False) or provider.layernorm_epsilon == MLA_LATENT_NORM_EPS:
        return
    provider.register_pre_wrap_hook(_set_mla_latent_norm_eps)


def _set_mla_latent_norm_eps(model):
    """Pre-wrap hook: epsilon ``MLA_LATENT_NORM_EPS`` on every MLA latent norm, standalone
    (``q_layernorm``/``kv_layernorm``) or fused into the up-projection (``linear_*_up_proj``)."""
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    attentions = changed = 0
    for chunk in model:
        for module in chunk.modules():
            if not isinstance(module, MultiLatentAttention):
                continue
            attentions += 1
            for name in ("q_layernorm", "kv_layernorm", "linear_q_up_proj", "linear_kv_up_proj"):
                norm = getattr(module, name, None)
                if isinstance(getattr(norm, "eps", None), float):
                    norm.eps = MLA_LATENT_NORM_EPS
                    changed += 1
    if attentions and not changed:  # a norm implementation that keeps its epsilon elsewhere
        logger.warning("MLA latent norms keep the model's layernorm_epsilon: HF uses %g there", MLA_LATENT_NORM_EPS)
    return model


def _packed_attention_for_gemma2(provider) -> None:
    if isinstance(provider, Gemma2ModelProvider) and provider.transformer_layer_spec is gemma2_layer_spec:
        provider.transformer_layer_spec = gemma2_packed_layer_spec


def gemma2_packed_layer_spec(config):
    """Bridge's Gemma 2 layer spec with ``PackedGemma2Attention`` as the core attention. (Module level:
    checkpoints record the spec function by its import path.)"""
    spec = gemma2_layer_spec(config)
    spec.submodules.self_attention.submodules.core_attention = PackedGemma2Attention
    return spec


class PackedGemma2Attention(Gemma2FlexDotProductAttention):
    """Bridge's Gemma 2 attention (soft-capped logits, sliding windows), which rejects packed
    sequences, run once per sequence of a THD pack (``[t, heads, dim]`` in,
    ``[t, 1, heads * dim]`` out) on its unfused kernel; unpacked batches unchanged
    (FlexAttention on a GPU, the unfused kernel on the CPU runtime)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is None:
            if runtime.is_enabled():  # FlexAttention would torch.compile a CPU kernel per sequence length
                return Gemma2DotProductAttention.forward(self, query, key, value, attention_mask,
                                                         attn_mask_type=attn_mask_type, **kwargs)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kwargs)
        bounds = packed_seq_params.cu_seqlens_q_padded
        bounds = (bounds if bounds is not None else packed_seq_params.cu_seqlens_q).tolist()
        if bounds[-1] < query.size(0):  # trailing padding: a sequence of its own
            bounds.append(query.size(0))
        outputs = [
            Gemma2DotProductAttention.forward(self, *(x[a:b].unsqueeze(1) for x in (query, key, value)), None,
                                              attn_mask_type=attn_mask_type)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ]
        return torch.cat(outputs, dim=0)


# --- 2026 families (issue 20): EXAONE 4 ---
def _exaone4_as_hf(provider, hf_config) -> None:
    """Megatron-Bridge 0.6.2's EXAONE 4 provider builds a model that is not the HF one:

    - its layer spec (``exaone4_layer_spec``) sets ``qk_layernorm`` but gives no q/k norm modules, so
      megatron-core builds none and loading the checkpoint's ``q_norm``/``k_norm`` stops with
      ``AttributeError: 'NoneType' object has no attribute 'megatron_module'``; and its core attention
      is the unfused ``DotProductAttention``, which refuses packed (THD) sequences;
    - it ignores ``sliding_window`` / ``layer_types``: EXAONE 4.0 32B's sliding-window layers would see
      everything, and its global layers, which HF runs without RoPE, would get RoPE.

    Use ``exaone4_packed_layer_spec`` (TE core attention and q/k norms) and set megatron-core's own
    per-layer window (``window_size``, ``window_attn_skip_freq``) and RoPE skipping (``no_rope_freq``)
    from ``layer_types`` exactly as HF's ``Exaone4Attention`` applies them."""
    from megatron.bridge.models.exaone.exaone4.exaone4_provider import exaone4_layer_spec

    if getattr(hf_config, "model_type", "") != "exaone4":
        return
    if provider.transformer_layer_spec is exaone4_layer_spec:
        provider.transformer_layer_spec = exaone4_packed_layer_spec
    window = getattr(hf_config, "sliding_window", None)
    layer_types = list(getattr(hf_config, "layer_types", None) or [])
    if window and "sliding_attention" in layer_types:  # HF: RoPE on sliding layers only, when any is sliding
        sliding = [kind == "sliding_attention" for kind in layer_types]
        provider.window_size = (window - 1, 0)  # HF's window counts the token itself
        provider.window_attn_skip_freq = [int(s) for s in sliding]
        provider.no_rope_freq = [int(not s) for s in sliding]


def exaone4_packed_layer_spec(config):
    """Bridge's EXAONE 4 layer spec (pure post-norm) with Transformer Engine's core attention (packed
    sequences, sliding windows) and the q/k RMSNorms it leaves out. (Module level: checkpoints record the
    spec function by its import path.)"""
    from megatron.bridge.models.exaone.exaone4.exaone4_provider import exaone4_layer_spec
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm

    spec = exaone4_layer_spec(config)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = TEDotProductAttention
    attention.q_layernorm = attention.k_layernorm = TENorm
    return spec


# --- 2026 families (issue 20): ERNIE 4.5 MoE ---
ERNIE_ROUTING = "softmax_expert_bias"  # the routers' score_function for ERNIE 4.5 (see _ernie45_as_hf)


def _ernie45_as_hf(provider, hf_config) -> None:
    """Megatron-Bridge 0.6.2's ERNIE 4.5 MoE provider differs from the HF model in two ways:

    - its layer spec is the private ``_ernie45_decoder_block_spec``, which a checkpoint records by import
      path and Bridge then refuses to re-instantiate on export (``InstantiationException ... private target
      path segments are not supported``): use the public alias ``ernie45_decoder_block_spec``;
    - it routes with sigmoid scores, while HF ERNIE 4.5 takes softmax scores, picks the top-k of softmax +
      ``e_score_correction_bias`` and weighs them by their softmax renormalised over the top-k.
      megatron-core 0.19.2 has no such score function (its softmax ignores the expert bias, and its config
      allows the bias with sigmoid only), so the routers get ``ERNIE_ROUTING``, served by
      ``_ernie_topk_routing`` (the expert bias and its aux-loss-free updates stay megatron-core's);
    - it hard-codes the RoPE base (500,000, ERNIE-4.5-21B-A3B's) and ignores ``moe_layer_end_index`` and
      ``moe_layer_interval``: take them from the config as HF's decoder layers do."""
    from megatron.bridge.models.ernie.ernie_45_bridge import _ernie45_decoder_block_spec

    if getattr(hf_config, "model_type", "") != "ernie4_5_moe":
        return
    if provider.transformer_layer_spec is _ernie45_decoder_block_spec:
        provider.transformer_layer_spec = ernie45_decoder_block_spec
    provider.rotary_base = (hf_config.rope_parameters or {}).get("rope_theta", provider.rotary_base)
    if getattr(hf_config, "mlp_layer_types", None) is None:
        start, end = hf_config.moe_layer_start_index, hf_config.moe_layer_end_index  # HF resolves end -1 to the last
        interval = hf_config.moe_layer_interval
        provider.moe_layer_freq = [int((i + 1) % interval == 0 and start <= i <= end)
                                   for i in range(hf_config.num_hidden_layers)]
    provider.moe_router_fusion = False  # TE's fused router knows no ERNIE_ROUTING
    _serve_ernie_routing()
    provider.register_pre_wrap_hook(_set_ernie_routing)


def ernie45_decoder_block_spec(config, vp_stage: int | None = None):
    """Bridge's ``_ernie45_decoder_block_spec`` under a public name (checkpoints record it by import path)."""
    from megatron.bridge.models.ernie.ernie_45_bridge import _ernie45_decoder_block_spec

    return _ernie45_decoder_block_spec(config, vp_stage=vp_stage)


def _set_ernie_routing(model):
    """Pre-wrap hook: every router of the model scores with ``ERNIE_ROUTING``."""
    from megatron.core.transformer.moe.router import TopKRouter

    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.score_function = ERNIE_ROUTING
    return model


def _serve_ernie_routing() -> None:
    """Make megatron-core's router module answer ``score_function=ERNIE_ROUTING`` (idempotent; any other
    score function goes to megatron-core's own functions unchanged)."""
    from megatron.core.transformer.moe import router

    if getattr(router.topk_routing_with_score_function, "_bridge_sft_ernie", False):
        return
    topk_routing, aux_scores = router.topk_routing_with_score_function, router.compute_routing_scores_for_aux_loss

    def topk_routing_with_score_function(logits, topk, *args, score_function="softmax", **kwargs):
        if score_function != ERNIE_ROUTING:
            return topk_routing(logits, topk, *args, score_function=score_function, **kwargs)
        return _ernie_topk_routing(logits, topk, kwargs.get("expert_bias"), kwargs.get("precomputed_indices"),
                                   kwargs.get("dense_output", False))

    def compute_routing_scores_for_aux_loss(logits, topk, score_function, *args, **kwargs):
        score_function = "softmax" if score_function == ERNIE_ROUTING else score_function
        return aux_scores(logits, topk, score_function, *args, **kwargs)

    topk_routing_with_score_function._bridge_sft_ernie = True
    router.topk_routing_with_score_function = topk_routing_with_score_function
    router.compute_routing_scores_for_aux_loss = compute_routing_scores_for_aux_loss


ERNIE_NORM_MIN = 1e-12  # HF ERNIE 4.5's moe_norm_min (published 1e-12): floor of the top-k weights' sum


def _ernie_topk_routing(logits, topk: int, expert_bias=None, precomputed_indices=None, dense_output=False):
    """HF ERNIE 4.5's routing on ``logits`` [tokens, experts]: experts = top-k of softmax + ``expert_bias``,
    weights = their softmax over the sum of the k. Returns megatron-core's ``(probs, routing_map)``
    ([tokens, experts]), or ``(probs, indices)`` ([tokens, k]) when ``dense_output``."""
    scores = torch.softmax(logits.float(), dim=-1)
    if precomputed_indices is not None:
        top = precomputed_indices
    else:
        choice = scores if expert_bias is None else scores + expert_bias.float()
        top = torch.topk(choice, k=topk, dim=1).indices
    probs = scores.gather(1, top)
    probs = (probs / probs.sum(dim=-1, keepdim=True).clamp(min=ERNIE_NORM_MIN)).type_as(logits)
    if dense_output:
        return probs, top
    routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
    return routing_probs, routing_map


# --- 2026 families (issue 20): Gemma 4 MoE ---
def _gemma4_unpadded_vocab(provider, hf_config) -> None:
    """Megatron-Bridge 0.6.2's dense Gemma 4 provider (``Gemma4DenseProvider.provide``) pads the embedding and output
    layer to a multiple of 128 rows, which its weight mappings do not do: a vocabulary that is not a multiple of 128
    stops the load with ``Shape mismatch for embedding.word_embeddings.weight``. Take Bridge's own rule for every other family instead
    (the largest power of 2, up to 128, that divides the vocabulary: no padding). Published Gemma 4 (262,144) is
    unchanged."""
    if getattr(hf_config, "model_type", "") != "gemma4_text":
        return
    vocab = hf_config.vocab_size
    provider.make_vocab_size_divisible_by = max(d for d in (1, 2, 4, 8, 16, 32, 64, 128) if vocab % d == 0)


def _gemma4_moe_as_hf(provider, hf_config) -> None:
    """Megatron-Bridge 0.6.2's Gemma 4 MoE provider (``Gemma4ModelProvider``, 26B-A4B) differs from the HF model:

    - its layer spec is ``partial(_gemma4_block_spec, ...)``, a private name that a checkpoint records by import
      path and Bridge then refuses to re-instantiate on export (``InstantiationException ... private target path
      segments are not supported: ['_gemma4_block_spec']``; the public alias ``gemma4_block_spec`` is the same
      function, recorded under the same name): use ``gemma4_moe_block_spec`` with the same arguments;
    - it reads the RoPE bases with ``rope_theta_from_hf``, which prefers a top-level ``rope_theta`` (transformers
      < 5) that HF's Gemma 4 ignores (it takes ``rope_parameters[layer_type]["rope_theta"]``): a config that
      carries one gets its global layers rotated with the wrong base. Take both from ``rope_parameters``;
    - global layers get ``num_global_key_value_heads`` k/v heads whatever ``attention_k_eq_v`` says, while HF uses
      them only with ``attention_k_eq_v`` (``num_key_value_heads`` otherwise): loading such a checkpoint stops
      with a shape error. Give the provider the head count HF's global attention has;
    - its ``interleaved_attn_pattern`` is read from the first run of layer types (``_infer_attn_pattern``): a model
      of global layers only becomes ``(0, layers)``, which builds all but the last layer as sliding-window layers.
      Set it from the whole of ``layer_types`` (``_check_hf_config`` refuses the layouts Bridge cannot build)."""
    from functools import partial

    from megatron.bridge.models.gemma.gemma4_provider import Gemma4ModelProvider
    from megatron.bridge.models.gemma.modeling_gemma4 import _gemma4_block_spec

    if not isinstance(provider, Gemma4ModelProvider):
        return
    spec = provider.transformer_layer_spec
    if isinstance(spec, partial) and spec.func is _gemma4_block_spec:
        provider.transformer_layer_spec = partial(gemma4_moe_block_spec, *spec.args, **spec.keywords)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    local, full = rope.get("sliding_attention", {}), rope.get("full_attention", {})
    provider.rotary_base = (local.get("rope_theta", provider.rotary_base[0]),
                            full.get("rope_theta", provider.rotary_base[1]))
    if not provider.attention_k_eq_v:
        provider.num_global_key_value_heads = hf_config.num_key_value_heads
    pattern = interleaved_window_pattern(getattr(hf_config, "layer_types", None) or [])
    if pattern is not None:
        provider.interleaved_attn_pattern = pattern


def gemma4_moe_block_spec(config, use_transformer_engine: bool = True, **kwargs):
    """Bridge's ``_gemma4_block_spec`` under a public name (checkpoints record it by import path)."""
    from megatron.bridge.models.gemma.modeling_gemma4 import _gemma4_block_spec

    return _gemma4_block_spec(config, use_transformer_engine=use_transformer_engine, **kwargs)
