"""Fixes for Megatron-Bridge 0.6.2 / megatron-core 0.19.2 bugs that hit every host, GPU or CPU.

Applied right after ``megatron.bridge`` is first imported in a process that imported
``bridge_sft`` (the runtime's import gate, on every kind of host), so a model built through
Bridge's own API (``AutoBridge.to_megatron_provider``, ``load_megatron_model``, ``export_ckpt``)
is the one our entry points build; those entry points (``bridge_sft.train.run``,
``bridge_sft.models.megatron_provider``) apply them again for processes that imported megatron
first. Each fix is idempotent and only acts when the bug is present. (Gemma 3 270M's real
weights showed why: with the post-norm epsilon wrong, its logits were 13 away from HF's.)
"""

from __future__ import annotations

import contextvars
import importlib.util
from pathlib import Path


def apply() -> None:
    """Apply every fix below (idempotent)."""
    _skip_compile_helpers_when_prebuilt()
    _post_layernorm_epsilon()
    _expert_bias_with_padding_mask()
    _router_token_count_with_padding_mask()
    _mla_query_projection_without_norm()
    _nemotron_h_embedding_name()
    _exaone4_untied_output_layer()
    _gemma4_dense_te_attention()
    _gemma4_shared_kv_heads()
    _falcon_h1_packed_sequences()


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


def _router_token_count_with_padding_mask() -> None:
    """megatron-core 0.19.2's ``get_tokens_per_expert_and_token_count`` (the load-balancing losses) all-reduces
    the per-expert counts over TP x CP IN PLACE (``_reduce`` mutates a contiguous input), then, with a
    padding mask, reads this rank's token count from the same, now global, tensor: every rank's
    load-balancing loss is scaled by the global valid-token count instead of its own (gradient off by
    about 100 % on CP=2 with unequally padded shards; bridge_sft's tests/test_context_parallel.py).
    Count before reducing."""
    import inspect

    from megatron.core.transformer.moe import moe_utils, router

    original = moe_utils.get_tokens_per_expert_and_token_count
    if "local_tokens_per_expert.sum() / topk" not in inspect.getsource(original):
        return  # changed upstream

    def get_tokens_per_expert_and_token_count(routing_map, reduce_group, topk=None, with_padding_mask=False):
        global_tokens_per_expert, local_num_tokens, total_num_tokens = original(
            routing_map, reduce_group, topk, with_padding_mask)
        if with_padding_mask:
            local_num_tokens = routing_map.sum() / topk  # this rank's valid tokens (each routed to topk experts)
        return global_tokens_per_expert, local_num_tokens, total_num_tokens

    router.get_tokens_per_expert_and_token_count = get_tokens_per_expert_and_token_count


def _mla_query_projection_without_norm() -> None:
    """megatron-core 0.19.2's ``QKNormConfigResolver`` (MLA with ``qk_layernorm``) builds the query
    projection of a model WITHOUT query compression (``q_lora_rank`` None: DeepSeek-V2-Lite,
    Moonlight-16B-A3B) as a fused RMSNorm + linear, although such a model has no query norm (HF:
    ``q_proj(hidden_states)``; megatron-core <= 0.15 built the spec's plain linear). Bridge sets
    ``qk_layernorm`` for every DeepSeek model (for the key/value and compressed-query norms) and
    has no weight for that extra norm, so loading the checkpoint stops with ``AttributeError:
    'NoneType' object has no attribute 'megatron_module'``. Same on a TE GPU host (the resolver picks
    TE's fused layer). Build the spec's own ``linear_q_proj`` unless the spec asks for a fused one."""
    import inspect

    from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

    resolve = QKNormConfigResolver._resolve_mla_qk_layernorm
    if getattr(resolve, "_bridge_sft_fixed", False):
        return
    if "linear_q_proj_cls = self._mla_fused_linear_or_default(" not in inspect.getsource(resolve):
        return  # fixed upstream

    def _resolve_mla_qk_layernorm(self):
        resolved = resolve(self)
        if not self.has_q_lora and not self._is_fused_norm_linear(self.submodules.linear_q_proj):
            resolved["linear_q_proj"] = self.submodules.linear_q_proj or self.linear_impl
        return resolved

    _resolve_mla_qk_layernorm._bridge_sft_fixed = True
    QKNormConfigResolver._resolve_mla_qk_layernorm = _resolve_mla_qk_layernorm


# The two names a Nemotron-H checkpoint gives its embedding: NVIDIA's published checkpoints (and Bridge's
# mapping) `backbone.embeddings.weight`; transformers 5 saves `backbone.embedding.weight` (its conversion
# mapping renames `backbone.` -> `model.` and `embedding.weight` -> `embeddings.weight` on load, and reverses both
# on save).
_NEMOTRON_H_EMBEDDING = "backbone.embeddings.weight"
_NEMOTRON_H_EMBEDDING_SAVED_BY_HF = "backbone.embedding.weight"


def _nemotron_h_embedding_name() -> None:
    """Bridge's ``NemotronHBridge`` maps the embedding to ``backbone.embeddings.weight`` only, so a Nemotron-H
    checkpoint written by transformers 5 (``save_pretrained``: ``backbone.embedding.weight``; any fine-tune saved
    with HF, every tiny model here) loads with its embedding left at random initialisation, after one log
    warning ("Can't find backbone.embeddings.weight in hf_keys"). Same on a GPU. Map the embedding to the name
    the checkpoint being read has (and export under that name, so a round trip keeps the names)."""
    from megatron.bridge.models.nemotronh.nemotron_h_bridge import NemotronHBridge

    if getattr(NemotronHBridge, "_bridge_sft_fixed_embedding", False):
        return
    build_tasks, registry = NemotronHBridge.build_conversion_tasks, NemotronHBridge.mapping_registry

    def build_conversion_tasks(self, hf_pretrained, megatron_model, *args, **kwargs):
        source = getattr(getattr(hf_pretrained, "state", None), "source", None)
        if source is not None:
            keys = set(source.get_all_keys())
            saved_by_hf = _NEMOTRON_H_EMBEDDING_SAVED_BY_HF in keys and _NEMOTRON_H_EMBEDDING not in keys
            self._bridge_sft_embedding = _NEMOTRON_H_EMBEDDING_SAVED_BY_HF if saved_by_hf else None
        return build_tasks(self, hf_pretrained, megatron_model, *args, **kwargs)

    def mapping_registry(self):
        mappings = registry(self)
        name = getattr(self, "_bridge_sft_embedding", None)
        for mapping in mappings.mappings if name else ():
            if mapping.hf_param == _NEMOTRON_H_EMBEDDING:
                mapping.hf_param = name
        return mappings

    NemotronHBridge.build_conversion_tasks = build_conversion_tasks
    NemotronHBridge.mapping_registry = mapping_registry
    NemotronHBridge._bridge_sft_fixed_embedding = True


# --- 2026 families (issue 20) ---
def _exaone4_untied_output_layer() -> None:
    """Megatron-Bridge 0.6.2's EXAONE 4 bridge maps no ``lm_head.weight`` (it assumes tied embeddings, as
    EXAONE 4.0 1.2B has), so a checkpoint with its own output layer (EXAONE 4.0 32B:
    ``tie_word_embeddings`` false) stops on load with ``AttributeError: 'NoneType' object has no attribute
    'megatron_module'``. Map ``output_layer.weight`` to ``lm_head.weight`` (unused when tied: Megatron then
    has no ``output_layer.weight``)."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
    from megatron.bridge.models.conversion.param_mapping import AutoMapping
    from megatron.bridge.models.exaone.exaone4.exaone4_bridge import Exaone4Bridge

    registry = Exaone4Bridge.mapping_registry
    if getattr(registry, "_bridge_sft_fixed", False):
        return

    def mapping_registry(self) -> MegatronMappingRegistry:
        mappings = registry(self)
        if not any(m.megatron_param == "output_layer.weight" for m in mappings.mappings):
            return MegatronMappingRegistry(*mappings.mappings,
                                           AutoMapping(megatron_param="output_layer.weight", hf_param="lm_head.weight"))
        return mappings

    mapping_registry._bridge_sft_fixed = True
    Exaone4Bridge.mapping_registry = mapping_registry


def _gemma4_dense_te_attention() -> None:
    """Megatron-Bridge 0.6.2's dense Gemma 4 provider (``Gemma4DenseProvider.build``) builds its layers from
    ``get_gemma4_layer_spec``, a local spec whose core attention, megatron-core's unfused
    ``DotProductAttention``, refuses packed (THD) sequences ("Packed sequence is not supported by
    DotProductAttention"), on every host; Bridge's MoE Gemma 4 spec already uses TE's. Build the dense
    layers with ``TEDotProductAttention`` (``te_torch`` on the CPU runtime): its per-layer window comes from
    the provider's ``window_size`` / ``window_attn_skip_freq``, its softmax scale (1.0) from
    ``Gemma4DenseSelfAttention``'s own config."""
    from megatron.bridge.models.gemma import gemma4_provider

    local_spec = gemma4_provider.get_gemma4_layer_spec
    if getattr(local_spec, "_bridge_sft_fixed", False):
        return

    def get_gemma4_layer_spec(config=None):
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        spec = local_spec(config)
        spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
        return spec

    get_gemma4_layer_spec._bridge_sft_fixed = True
    gemma4_provider.get_gemma4_layer_spec = get_gemma4_layer_spec


def _gemma4_shared_kv_heads() -> None:
    """Megatron-Bridge 0.6.2's Gemma 4 bridge fills the absent k/v projections of KV-shared layers (Gemma 4
    E2B/E4B: the last ``num_kv_shared_layers``) with zeros sized by ``num_global_key_value_heads`` on
    global layers, which is None unless ``attention_k_eq_v`` (HF then uses ``num_key_value_heads``), so loading
    stops with ``TypeError: unsupported operand type(s) for *: 'NoneType' and 'int'``. Give the bridge the
    head count HF's attention uses."""
    import copy

    from megatron.bridge.models.gemma.gemma4_bridge import Gemma4Bridge

    text_config = Gemma4Bridge._text_config
    if getattr(text_config, "_bridge_sft_fixed", False):
        return

    def _text_config(self):
        config = text_config(self)
        if config is None or getattr(config, "attention_k_eq_v", False) or not hasattr(config, "num_key_value_heads"):
            return config
        config = copy.copy(config)
        config.num_global_key_value_heads = config.num_key_value_heads
        return config

    _text_config._bridge_sft_fixed = True
    Gemma4Bridge._text_config = _text_config



# The packed-sequence metadata of the Falcon-H1 forward in progress (see _falcon_h1_packed_sequences).
_FALCON_H1_PACKED = contextvars.ContextVar("bridge_sft_falcon_h1_packed_seq_params", default=None)


def _falcon_h1_packed_sequences() -> None:
    """Bridge 0.6.2's Falcon-H1 drops packed (THD) sequence metadata on its way down: ``FalconH1Model.forward``
    and ``FalconH1Stack.forward`` take no ``packed_seq_params`` (a packed batch fails with a TypeError), and
    ``FalconH1Layer.forward``, which does take it, hands it to the attention but not to the Mamba mixer, whose
    convolution and scan state would then run from one sample of a pack into the next. Same on a GPU.

    Fix: the model's forward accepts ``packed_seq_params`` and holds it (with ``total_tokens`` filled in, so
    that megatron-core computes the Mamba ``seq_idx``) for the duration of the call; each Falcon-H1 layer and
    Mamba mixer called without one takes it from there. Unpacked calls are unchanged."""
    import dataclasses

    from megatron.bridge.models.falcon_h1.modeling_falconh1 import falconh1_layer, falconh1_model

    model_cls = falconh1_model.FalconH1Model
    if getattr(model_cls, "_bridge_sft_fixed_packing", False):
        return
    model_forward = model_cls.forward
    layer_forward = falconh1_layer.FalconH1Layer.forward
    mixer_forward = falconh1_layer.FalconH1MambaMixer.forward

    def forward(self, input_ids, position_ids, attention_mask, *args, packed_seq_params=None, **kwargs):
        if packed_seq_params is None:
            return model_forward(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        if packed_seq_params.seq_idx is None:  # as Bridge's gpt_step does for hybrids: the pack's length
            labels = kwargs.get("labels", args[1] if len(args) > 1 else None)  # (decoder_input, labels, ...)
            rows = input_ids if input_ids is not None else labels
            total = rows.size(1) if rows is not None else self.config.seq_length
            packed_seq_params = dataclasses.replace(packed_seq_params, total_tokens=total)
        token = _FALCON_H1_PACKED.set(packed_seq_params)
        try:
            return model_forward(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            _FALCON_H1_PACKED.reset(token)

    def layer(self, *args, packed_seq_params=None, **kwargs):
        return layer_forward(self, *args, packed_seq_params=packed_seq_params or _FALCON_H1_PACKED.get(), **kwargs)

    def mixer(self, *args, packed_seq_params=None, **kwargs):
        return mixer_forward(self, *args, packed_seq_params=packed_seq_params or _FALCON_H1_PACKED.get(), **kwargs)

    # No functools.wraps: inspect.signature would follow __wrapped__ and hide the new packed_seq_params.
    model_cls.forward, forward.__doc__ = forward, model_forward.__doc__
    falconh1_layer.FalconH1Layer.forward = layer
    falconh1_layer.FalconH1MambaMixer.forward = mixer
    model_cls._bridge_sft_fixed_packing = True
