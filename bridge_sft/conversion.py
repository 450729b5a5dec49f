"""HF <-> Megatron checkpoint conversion through Bridge's ``AutoBridge``.

- ``import_hf(hf_dir, megatron_dir)``: HF weights -> a Megatron ``torch_dist``
  checkpoint (weights only). Bridge's ``AutoBridge.import_ckpt`` always builds
  the Transformer-Engine layer spec, which cannot run without CUDA, so we build
  the provider ourselves and, on the CPU runtime, switch it to the local spec
  before instantiating the model.
- ``export_hf(megatron_dir, hf_dir)``: a Megatron checkpoint (from ``import_hf``
  or saved by training; the latest ``iter_*`` is used) -> HF directory, through
  ``AutoBridge.export_ckpt``, which runs single-process over gloo.

Training does not need ``import_hf``: ``checkpoint.pretrained_checkpoint`` may
point at an HF directory directly. Note that a Megatron checkpoint saved on the
CPU (local layer spec) has different parameter names from a GPU (TE spec) one:
use HF as the exchange format between the two.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bridge_sft import cpu

cpu.maybe_enable()  # before megatron.bridge: without CUDA, Bridge cannot be imported unpatched

import torch  # noqa: E402
from megatron.bridge import AutoBridge  # noqa: E402
from megatron.bridge.training.model_load_save import temporary_distributed_context  # noqa: E402

logger = logging.getLogger(__name__)


def _backend() -> str:
    return "gloo" if cpu.is_enabled() or not torch.cuda.is_available() else "nccl"


def import_hf(hf_dir: str | Path, megatron_dir: str | Path) -> Path:
    """Convert the HF checkpoint at ``hf_dir`` into a Megatron checkpoint in ``megatron_dir``."""
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=True)
    if cpu.is_enabled():
        cpu.configure_model(provider)
    with temporary_distributed_context(backend=_backend()):
        provider.finalize()
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
        bridge.save_megatron_model(model, str(megatron_dir), hf_tokenizer_path=str(hf_dir))
    return Path(megatron_dir)


def export_hf(megatron_dir: str | Path, hf_dir: str | Path, hf_config_dir: str | Path, show_progress: bool = False):
    """Write the Megatron checkpoint in ``megatron_dir`` as an HF checkpoint to ``hf_dir``.

    ``hf_config_dir``: an HF directory (or hub id) of the same architecture; its
    config, tokenizer and generation config are written beside the weights.
    """
    bridge = AutoBridge.from_hf_pretrained(str(hf_config_dir))
    bridge.export_ckpt(str(megatron_dir), str(hf_dir), show_progress=show_progress)
    return Path(hf_dir)
