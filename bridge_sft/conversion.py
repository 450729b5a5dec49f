"""HF <-> Megatron checkpoint conversion through Bridge's ``AutoBridge``.

- ``import_hf(hf_dir, megatron_dir)``: HF weights -> a Megatron ``torch_dist``
  checkpoint (weights only). The provider comes from ``bridge_sft.models.megatron_provider``
  (the checks and adaptations training uses) with this host's runtime settings
  (``bridge_sft.runtime``), rather than from Bridge's ``import_ckpt``.
- ``export_hf(megatron_dir, hf_dir, hf_config_dir)``: a Megatron checkpoint (from
  ``import_hf`` or saved by training; the latest ``iter_*`` is used) -> HF
  directory, through ``AutoBridge.export_ckpt``, which runs single-process over
  gloo. A LoRA training checkpoint is exported MERGED: Bridge's own
  ``export_adapter_ckpt`` writes only the adapter, so we rebuild the base model
  from HF, apply the run's LoRA, load the adapter weights from the checkpoint and
  let ``save_hf_pretrained`` merge them into the base weights (in fp32).

- ``text_only(hf_dir, out_dir)``: Gemma 3 4B/12B/27B, Gemma 4 and Qwen3.5 (dense and MoE) are
  published as multimodal ``*ForConditionalGeneration`` checkpoints; their language model, written
  as the family's ``*ForCausalLM`` checkpoint, is what Bridge's GPT path (and bridge-sft) trains.

Training does not need ``import_hf``: ``checkpoint.pretrained_checkpoint`` may
point at an HF directory directly. The CPU and a GPU without Transformer Engine
build megatron-core's TE layer spec (``bridge_sft.runtime.te_torch``), so their
checkpoints have the parameter names and shapes of a TE GPU's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bridge_sft import runtime
from bridge_sft.models import megatron_provider
from bridge_sft.multimodal import TEXT_ONLY_ARCHITECTURES

import torch
from megatron.bridge import AutoBridge
from megatron.bridge.training.model_load_save import temporary_distributed_context
from megatron.bridge.training.utils.checkpoint_utils import read_run_config

logger = logging.getLogger(__name__)


def _backend() -> str:
    return "gloo" if runtime.is_enabled() or not torch.cuda.is_available() else "nccl"


def import_hf(hf_dir: str | Path, megatron_dir: str | Path) -> Path:
    """Convert the HF checkpoint at ``hf_dir`` into a Megatron checkpoint in ``megatron_dir``."""
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = megatron_provider(bridge, load_weights=True)
    runtime.configure_model(provider)
    with temporary_distributed_context(backend=_backend()):
        provider.finalize()
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
        bridge.save_megatron_model(model, str(megatron_dir), hf_tokenizer_path=str(hf_dir))
    return Path(megatron_dir)


def export_hf(megatron_dir: str | Path, hf_dir: str | Path, hf_config_dir: str | Path, show_progress: bool = False):
    """Write the Megatron checkpoint in ``megatron_dir`` as an HF checkpoint to ``hf_dir``.

    ``hf_config_dir``: the HF directory (or hub id) the model came from; its config,
    tokenizer and generation config are written beside the weights, and for a LoRA
    checkpoint its weights are the base the adapters are merged into.
    """
    bridge = AutoBridge.from_hf_pretrained(str(hf_config_dir))
    iteration_dir = latest_iteration(megatron_dir)
    peft = read_run_config(str(iteration_dir / "run_config.yaml")).get("peft")
    if peft:
        _export_merged_lora(bridge, iteration_dir, peft, hf_dir, show_progress)
    else:
        bridge.export_ckpt(str(megatron_dir), str(hf_dir), show_progress=show_progress)
    return Path(hf_dir)


def latest_iteration(megatron_dir: str | Path) -> Path:
    """``megatron_dir`` itself if it is one ``iter_*`` checkpoint, else its latest ``iter_*``."""
    path = Path(megatron_dir)
    if (path / "run_config.yaml").is_file():
        return path
    iterations = sorted(path.glob("iter_*"))
    if not iterations:
        raise FileNotFoundError(f"{megatron_dir} holds no Megatron checkpoint (no run_config.yaml, no iter_*)")
    return iterations[-1]


def _export_merged_lora(bridge, iteration_dir: Path, peft_config: dict, hf_dir, show_progress: bool) -> None:
    from megatron.bridge.peft.lora import LoRA
    from megatron.bridge.training.checkpointing import (
        _generate_model_state_dict,
        apply_peft_adapter_filter_to_state_dict,
    )
    from megatron.core import dist_checkpointing

    lora_fields = {"target_modules", "exclude_modules", "dim", "alpha", "dropout", "dropout_position"}
    lora = LoRA(**{k: v for k, v in peft_config.items() if k in lora_fields})
    provider = megatron_provider(bridge, load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype = provider.pipeline_dtype = torch.float32
    provider.bf16 = provider.fp16 = False
    provider.finalize()
    provider.register_pre_wrap_hook(lambda chunks: lora(chunks, training=False))
    with temporary_distributed_context(backend=_backend()):
        model = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=True, init_model_with_meta_device=False
        )
        adapters = apply_peft_adapter_filter_to_state_dict(_generate_model_state_dict(model, {}), lora)
        loaded = dist_checkpointing.load(adapters, str(iteration_dir))
        missing, _ = model[0].load_state_dict(loaded["model"], strict=False)
        not_loaded = [k for k in missing if "adapter" in k]
        if not_loaded:
            raise RuntimeError(f"{iteration_dir}: LoRA weights missing from the checkpoint: {not_loaded[:5]}")
        bridge.save_hf_pretrained(model, str(hf_dir), show_progress=show_progress, merge_adapter_weights=True)


# Qwen3.5's multi-token-prediction head (``mtp.*`` weights, ``text_config.mtp_num_hidden_layers``): HF's classes do
# not load it, so the text-only checkpoint has no such weights and its config must not ask Bridge for MTP layers.
_MTP_FIELDS = ("mtp_num_hidden_layers", "mtp_use_dedicated_embeddings")


def text_only(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the language model of a multimodal checkpoint (``hf_dir``: a directory or hub id; its architecture a key
    of ``TEXT_ONLY_ARCHITECTURES``) to ``out_dir`` as a checkpoint of the matching ``*ForCausalLM``: the text config
    (``architectures`` set, the multimodal model's ``tie_word_embeddings``, which is what ties its ``lm_head``), the
    language model's weights and ``lm_head`` unchanged (in their stored dtype), the generation config, the tokenizer
    and its chat template. The vision (and audio) towers and their projectors are left out.

    Qwen3.5's multi-token-prediction head is left out too, and ``mtp_num_hidden_layers`` is dropped from the config:
    transformers does not load ``mtp.*`` weights, and a config that still asked for MTP layers would make
    Megatron-Bridge 0.6.2 build them randomly initialised (it only warns; ``bridge_sft.models`` refuses such a
    checkpoint). Qwen3.5's M-RoPE needs nothing: for text its three position rows are equal, which is the text
    model's RoPE (tests/test_conversion.py checks the logits against the multimodal model's own positions)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(hf_dir))
    architectures = [a for a in (config.architectures or ()) if a in TEXT_ONLY_ARCHITECTURES]
    if not architectures:
        raise ValueError(f"{hf_dir}: architecture {', '.join(config.architectures or ()) or '(none)'} is not one of "
                         f"the multimodal checkpoints `convert text-only` converts ({', '.join(TEXT_ONLY_ARCHITECTURES)}"
                         "); a text-only (*ForCausalLM) checkpoint needs no conversion.")
    causal_lm = TEXT_ONLY_ARCHITECTURES[architectures[0]]
    multimodal = getattr(transformers, architectures[0]).from_pretrained(str(hf_dir), dtype="auto")
    text_config = config.get_text_config()
    text_config.architectures = [causal_lm]
    text_config.tie_word_embeddings = config.tie_word_embeddings
    for field in _MTP_FIELDS:
        if field in text_config.__dict__:
            delattr(text_config, field)
    with torch.device("meta"):  # no second copy of the weights
        text = getattr(transformers, causal_lm)(text_config)
    text.model.load_state_dict(multimodal.model.language_model.state_dict(), assign=True)
    text.lm_head.weight = multimodal.lm_head.weight
    text.generation_config = multimodal.generation_config
    text.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(out_dir)
    return Path(out_dir)
