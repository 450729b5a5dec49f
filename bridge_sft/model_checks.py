"""What bridge-sft cannot train, refused at config time in one line that says why and what to do.

``_check_hf_config(hf_path, hf_config)``: HF configs Megatron-Bridge 0.6.2 would convert wrongly or cannot build
(multimodal checkpoints, MTP layers without weights, group-limited routing scored differently, Mamba and Qwen3-Next
settings Bridge does not map, GLM-5's sparse attention, ...). ``check_model(config)`` / ``check_provider(model)``:
parallel layouts and features this host cannot run (features that need Transformer Engine where it is missing).
``bridge_sft.models.megatron_provider`` calls the first; the training entry points the second.
"""

from __future__ import annotations

from megatron.bridge.models.olmoe.olmoe_provider import OlMoEModelProvider, olmoe_layer_spec

from bridge_sft import runtime


class UnsupportedModelError(ValueError):
    """The HF model, or one of its features, cannot be trained here (the message says why and what to do)."""


def multimodal_message(hf_path: str, architectures) -> str | None:
    """The one-line error for a multimodal checkpoint whose language model ``convert text-only`` writes (Bridge would
    build its vision-language model), None for any other; local directories get it from ``check_hf_checkpoint``,
    hub ids here."""
    from bridge_sft.multimodal import TEXT_ONLY_ARCHITECTURES

    multimodal = [a for a in (architectures or ()) if a in TEXT_ONLY_ARCHITECTURES]
    if not multimodal:
        return None
    return (f"hf_path={hf_path} is a multimodal checkpoint ({multimodal[0]}); bridge-sft trains its language model "
            f"({TEXT_ONLY_ARCHITECTURES[multimodal[0]]}): run `bridge-sft convert text-only {hf_path} DIR` and use "
            "hf_path=DIR.")


def _mtp_without_weights_message(hf_path: str, hf_config) -> str | None:
    """The one-line error for a local checkpoint whose config asks for multi-token-prediction layers
    (``mtp_num_hidden_layers``: Qwen3.5, Qwen3-Next) but whose weights hold no ``mtp.*`` tensors (a text-only model
    saved by transformers, which does not load them): Megatron-Bridge 0.6.2 builds the MTP layers anyway, randomly
    initialised, and only logs "Can't find mtp... in hf_keys". None otherwise (hub ids are not checked)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    layers, path = getattr(hf_config, "mtp_num_hidden_layers", None), Path(hf_path)
    if not layers or not path.is_dir():
        return None
    index = path / "model.safetensors.index.json"
    keys = list(json.loads(index.read_text())["weight_map"]) if index.is_file() else []
    for file in [] if keys else path.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            keys += weights.keys()
    if any(key.startswith("mtp.") for key in keys):
        return None
    return (f"{hf_path}: config.json asks for {layers} multi-token-prediction layer(s) (mtp_num_hidden_layers) but "
            "the checkpoint has no mtp.* weights, so Megatron-Bridge would train them from random values: remove "
            "mtp_num_hidden_layers from config.json (`bridge-sft convert text-only` leaves it out).")


def _check_hf_config(hf_path: str, hf_config) -> None:
    message = multimodal_message(hf_path, getattr(hf_config, "architectures", None)) or \
        _mtp_without_weights_message(hf_path, hf_config)
    if message:
        raise UnsupportedModelError(message)
    model_type = getattr(hf_config, "model_type", "")
    groups, group_topk = getattr(hf_config, "n_group", None) or 1, getattr(hf_config, "topk_group", None) or 1
    topk = getattr(hf_config, "num_experts_per_tok", None)
    if groups > 1 and topk and topk // group_topk != 2:
        # HF scores a routing group by its 2 best experts; megatron-core by its top_k // topk_group best ones.
        raise UnsupportedModelError(
            f"{hf_path}: group-limited routing with num_experts_per_tok={topk} and topk_group={group_topk} "
            "scores each group by its top num_experts_per_tok // topk_group experts in Megatron but by its top 2 in "
            "HF; Megatron-Bridge 0.6.2 would train a different router (published DeepSeek-V3 has 8 // 4 = 2)."
        )
    if model_type == "gemma4_text" and getattr(hf_config, "enable_moe_block", False):
        layer_types = list(getattr(hf_config, "layer_types", None) or [])
        if interleaved_window_pattern(layer_types) is None:
            raise UnsupportedModelError(
                f"{hf_path}: Gemma 4 MoE layer_types {layer_types} are not a repeating pattern of sliding-window "
                "layers followed by one global layer, the only layout Megatron-Bridge 0.6.2's Gemma 4 MoE model "
                "builds (google/gemma-4-26B-A4B: 5 sliding-window layers, then 1 global).")
    if model_type == "nemotron_h":
        _check_nemotron_h_mamba(hf_path, hf_config)
    if model_type == "falcon_h1":
        _check_falcon_h1_mamba(hf_path, hf_config)
    if model_type == "qwen3_next":
        _check_qwen3_next(hf_path, hf_config)
    if model_type == "glm_moe_dsa":
        # Bridge 0.6.2's GLM-5 bridge reads `indexer_rope_interleave`, which transformers 5.12's GlmMoeDsaConfig
        # lacks (AttributeError), and megatron-core's DeepSeek sparse attention needs CUDA kernels
        # (fast_hadamard_transform, its TileLang/cuDNN indexer kernels) that have no plain-torch stand-in here.
        raise UnsupportedModelError(
            f"{hf_path}: GLM-5 (GlmMoeDsaForCausalLM, DeepSeek sparse attention) is not supported: Megatron-Bridge "
            "0.6.2 cannot read its transformers 5.12 config, and its sparse-attention indexer needs CUDA kernels "
            "bridge-sft has no stand-in for. Fine-tune a GLM-4.5 (Glm4MoeForCausalLM) model instead."
        )
    if model_type == "olmoe" and hf_config.num_key_value_heads != hf_config.num_attention_heads:
        # Bridge's OLMoE attention builds its k norm over num_attention_heads * head_dim.
        raise UnsupportedModelError(
            f"{hf_path}: OLMoE with grouped-query attention (num_key_value_heads={hf_config.num_key_value_heads} "
            f"< num_attention_heads={hf_config.num_attention_heads}) is not supported by Megatron-Bridge 0.6.2's "
            "OLMoE bridge (it assumes one key/value head per query head, as OLMoE-1B-7B has)."
        )


_NO_DT_LIMIT = (0.0, float("inf"))


def _check_qwen3_next(hf_path: str, hf_config) -> None:
    """Qwen3-Next settings Megatron-Bridge 0.6.2's Qwen3NextBridge does not map (it builds every layer's MLP as
    experts, renormalises the top-k router weights, and adds no q/k/v bias), each as the published
    Qwen3-Next-80B-A3B has it."""
    published = {"mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": True, "attention_bias": False}
    for key, wanted in published.items():
        value = getattr(hf_config, key, wanted)
        if value != wanted:
            raise UnsupportedModelError(
                f"{hf_path}: Qwen3-Next with {key}={value!r} is not supported: Megatron-Bridge 0.6.2's Qwen3-Next "
                f"bridge builds the model as {key}={wanted!r} (as the published Qwen3-Next-80B-A3B), so Megatron "
                "would train a different model than the checkpoint's."
            )


def _check_nemotron_h_mamba(hf_path: str, hf_config) -> None:
    """Mamba settings megatron-core 0.19.2's MambaMixer does not follow (it asserts on some, ignores others):
    a SiLU convolution activation, no projection bias, a convolution bias, no limit on dt."""
    _refuse_mamba_settings(hf_path, hf_config, "Nemotron-H", {"mamba_hidden_act": "silu", "mamba_proj_bias": False,
                                                              "use_conv_bias": True, "time_step_limit": _NO_DT_LIMIT},
                           "every published Nemotron-H and Nemotron 3 model")


def _check_falcon_h1_mamba(hf_path: str, hf_config) -> None:
    """Falcon-H1 Mamba settings megatron-core 0.19.2's MambaMixer does not build (Bridge's FalconH1MambaMixer
    is one): it asserts a convolution bias and no projection bias, and Bridge maps no dt limit."""
    _refuse_mamba_settings(hf_path, hf_config, "Falcon-H1", {"mamba_proj_bias": False, "mamba_conv_bias": True,
                                                             "time_step_limit": _NO_DT_LIMIT},
                           "every published Falcon-H1 model")


def _refuse_mamba_settings(hf_path: str, hf_config, family: str, supported: dict, published: str) -> None:
    """One line for the first ``hf_config`` field whose value differs from the only one ``supported`` (a field
    the config lacks has the supported value)."""
    for field, wanted in supported.items():
        value = getattr(hf_config, field, wanted)
        if field == "time_step_limit":
            value = tuple(value or wanted)
        if value != wanted:
            raise UnsupportedModelError(
                f"{hf_path}: {family} with {field}={value!r} is not supported: megatron-core 0.19.2's Mamba "
                f"mixer only builds {field}={wanted!r} (as {published} has).")


def interleaved_window_pattern(layer_types) -> tuple[int, int] | None:
    """``(k, 1)`` when ``layer_types`` repeat k sliding-window layers then one global layer (the last period may be
    cut short; no global layer at all: ``(len(layer_types), 1)``), the only layouts Bridge's Gemma 3 and Gemma 4 MoE
    models build (``interleaved_attn_pattern``: layer n, from 1, is global when n % (k + 1) == 0); None otherwise."""
    local = [kind == "sliding_attention" for kind in layer_types]
    period = local.index(False) + 1 if False in local else len(local) + 1
    if any(local[i] != ((i + 1) % period != 0) for i in range(len(local))):
        return None
    return (period - 1, 1)


def check_model(config) -> None:
    """Reject model settings this host or Bridge cannot run (one line each, naming the setting and the fix)."""
    check_provider(config.model)


def check_provider(model) -> None:
    """``check_model`` for a model provider on its own."""
    olmoe = isinstance(model, OlMoEModelProvider) or getattr(model, "transformer_layer_spec", None) is olmoe_layer_spec
    if olmoe and getattr(model, "tensor_model_parallel_size", 1) > 1:
        # Bridge's OLMoE attention normalises q and k over all heads, which a tensor-parallel rank does not hold.
        raise UnsupportedModelError(
            f"model.tensor_model_parallel_size={model.tensor_model_parallel_size}: Megatron-Bridge 0.6.2's OLMoE "
            "model normalises queries and keys across all attention heads and cannot split them over "
            "tensor-parallel ranks. Use tensor_parallel=1 with expert parallelism (model.expert_model_parallel_size)."
        )
    groups, tp = getattr(model, "mamba_num_groups", None), getattr(model, "tensor_model_parallel_size", 1)
    if groups and tp > 1 and groups % tp:
        # megatron-core's MambaMixer splits the Mamba groups over TP ranks (it asserts, deep in model building).
        raise UnsupportedModelError(
            f"model.tensor_model_parallel_size={tp}: the model's Mamba-2 layers have {groups} group(s) of heads "
            f"(mamba_n_groups / n_groups), which megatron-core splits over tensor-parallel ranks; use a "
            f"tensor-parallel size that divides {groups} (published Falcon-H1 models have 1 group: 1)."
        )
    if runtime.mode() in ("cpu", "no_te"):
        where = "the CPU" if runtime.mode() == "cpu" else "a GPU without Transformer Engine"
        # Context parallelism runs without TE (te_torch's attention, bridge_sft.runtime.context_parallel),
        # except TE's hierarchical variant.
        needs_te = {
            "cp_comm_type": getattr(model, "cp_comm_type", None) == "a2a+p2p",
            "fp8": bool(getattr(model, "fp8", None)),
            "fp4": bool(getattr(model, "fp4", None)),
        }
        for key, wanted in needs_te.items():
            if wanted:
                raise UnsupportedModelError(
                    f"model.{key}={getattr(model, key)} needs Transformer Engine, which is not available on {where}: "
                    "run on a GPU host with TE, or turn it off."
                )
