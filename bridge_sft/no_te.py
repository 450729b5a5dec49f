"""Megatron-Bridge without Transformer Engine: the CPU runtime's base, and GPU hosts without TE.

Megatron-core runs without TE on its local layer spec, but Bridge 0.6.2 does not:

1. ``megatron.bridge.peft.lora_layers`` imports ``transformer_engine`` and
   ``megatron.bridge.training.pretrain`` imports ``nvidia_resiliency_ext`` at
   module level without a guard. Stand-ins are served ONLY to those two modules
   (through a private ``__import__`` in their globals), and only for a package
   that is not installed. ``sys.modules`` never holds them, so every other
   ``import transformer_engine`` still fails: a global stub would flip
   ``HAVE_TE`` to True all over megatron-core and send it down TE code paths.
2. ``peft.utils.HAVE_TE`` is set to False: megatron-core defines ``TELinear`` on a
   MagicMock when TE is absent, so Bridge's own check says "TE present".
3. Packed (THD) sequences: megatron-core's local ``DotProductAttention``
   rejects ``packed_seq_params`` (only TE's attention takes them).
   ``PackedDotProductAttention`` runs causal attention once per packed
   sequence (torch SDPA); Bridge's provider installs it for ``attention_backend=local``.
   Unpacked batches take the parent's code path unchanged.

``enable()`` does all three (before megatron.bridge is imported);
``serve_missing_imports()`` only the first, for a host that has TE but lacks
``nvidia_resiliency_ext``. ``configure_model(provider)`` selects the local
layer spec and attention. Importing this module changes nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any

import torch

logger = logging.getLogger(__name__)

_ENABLED = False

# Bridge module -> the missing packages it imports at module level without a guard.
_STANDIN_IMPORTERS = {
    "megatron.bridge.peft.lora_layers": ("transformer_engine",),
    "megatron.bridge.training.pretrain": ("nvidia_resiliency_ext",),
}



class _Missing(type):
    """A class standing in for any name of a package that is not installed.

    Attribute access yields further stand-ins (``te.ops.Sequential``), so
    annotations and ``isinstance`` checks work (nothing is an instance);
    instantiating one raises ImportError.
    """

    def __getattr__(cls, name: str) -> "_Missing":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{cls.__qualname__}.{name}", (), {"__module__": cls.__module__})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{cls.__qualname__} is not available: its package is not installed.")


def _standin_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"bridge_sft stand-in for the missing package {name!r}")

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{name}.{attr}", (), {"__module__": name})

    module.__getattr__ = __getattr__
    return module


def _import_with_standins(missing: tuple[str, ...]):
    """An ``__import__`` that serves stand-ins for ``missing`` packages and delegates all else."""
    real_import = builtins.__import__

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        root = name.partition(".")[0]
        if level == 0 and root in missing and importlib.util.find_spec(root) is None:
            if fromlist:
                return _standin_module(name)
            return _standin_module(root)  # `import a.b as x` binds via getattr(a, "b")
        return real_import(name, globals, locals, fromlist, level)

    return __import__


class _StandInLoader(importlib.abc.Loader):
    """Executes a module with a private builtins dict whose ``__import__`` serves stand-ins.

    Only the import statements of that one module see the stand-ins; ``sys.modules``
    never holds them, so every other ``import transformer_engine`` still fails.
    """

    def __init__(self, loader: importlib.abc.Loader, missing: tuple[str, ...]):
        self._loader = loader
        self._missing = missing

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__builtins__ = {**builtins.__dict__, "__import__": _import_with_standins(self._missing)}
        self._loader.exec_module(module)


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        missing = _STANDIN_IMPORTERS.get(fullname)
        if missing is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _StandInLoader(spec.loader, missing)
        return spec



def _packed_dot_product_attention_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class PackedDotProductAttention(DotProductAttention):
        """Local core attention that also takes THD packed sequences.

        With ``packed_seq_params`` (qkv_format "thd"), query/key/value arrive as
        ``[t, heads, head_dim]`` for one row of ``t`` packed tokens; each
        sequence ``cu_seqlens[i]:cu_seqlens[i+1]`` gets causal attention to
        itself only, and the result is ``[t, 1, heads * head_dim]`` as TE's THD
        attention returns it. Each sequence goes through torch's
        ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU:
        no ``s x s`` probabilities kept for backward), or, with ``use_sdpa = False``
        or a setting SDPA cannot express (softmax offsets, sliding windows,
        query-key layer scaling), through the parent's unfused kernel.
        """

        use_sdpa = True

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            bounds = cu_seqlens.tolist()
            if bounds[-1] < query.size(0):  # trailing padding: a sequence of its own
                bounds.append(query.size(0))
            spans = [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]
            if self._sdpa_applies(attention_bias):
                return self._sdpa(query, key, value, spans)
            outputs = [
                super(PackedDotProductAttention, self).forward(
                    query[start:end].unsqueeze(1), key[start:end].unsqueeze(1), value[start:end].unsqueeze(1),
                    None, AttnMaskType.causal, attention_bias,
                )
                for start, end in spans
            ]
            return torch.cat(outputs, dim=0)

        def _sdpa_applies(self, attention_bias) -> bool:
            config = self.config
            return (self.use_sdpa and attention_bias is None and self.softmax_offset is None
                    and not config.apply_query_key_layer_scaling and config.window_size is None)

        def _sdpa(self, query, key, value, spans):
            """Causal SDPA per sequence; ``[t, np|ng, hn]`` in, ``[t, 1, np * hn]`` out."""
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:  # explicit, so every SDPA backend applies (enable_gqa narrows them)
                key = key.repeat_interleave(groups, dim=1)
                value = value.repeat_interleave(groups, dim=1)
            dropout = self.attention_dropout.p if self.training else 0.0
            outputs = []
            forked = dropout and not self.config.sequence_parallel  # as the parent does
            with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
                for start, end in spans:
                    # [s, np, hn] -> [1, np, s, hn]
                    q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
                    outputs.append(out[0].transpose(0, 1))  # [s, np, hn]
            context = torch.cat(outputs, dim=0)
            return context.reshape(context.size(0), 1, self.hidden_size_per_partition)

    return PackedDotProductAttention


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def is_enabled() -> bool:
    return _ENABLED


def serve_missing_imports() -> None:
    """Serve stand-ins to the two unguarded Bridge importers for whichever packages are missing."""
    if any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return
    missing = {pkg for pkgs in _STANDIN_IMPORTERS.values() for pkg in pkgs if importlib.util.find_spec(pkg) is None}
    if not missing:
        return
    already = sorted(m for m in _STANDIN_IMPORTERS if m in sys.modules)
    if already:
        raise RuntimeError(f"call bridge_sft before importing megatron.bridge (already imported: {already})")
    sys.meta_path.insert(0, _StandInFinder())


def enable() -> None:
    """Run Bridge on megatron-core's local (non-TE) layers (idempotent). Imports megatron.bridge."""
    global _ENABLED
    if _ENABLED:
        return
    serve_missing_imports()
    from megatron.bridge.models import gpt_provider
    from megatron.bridge.peft import utils as peft_utils

    peft_utils.HAVE_TE = False
    gpt_provider.MCoreDotProductAttention = _packed_dot_product_attention_class()
    _ENABLED = True


# Fusions that need TE or apex kernels; Bridge's model bridges turn some on (Llama: rope, masked softmax).
TE_FUSIONS = ("apply_rope_fusion", "masked_softmax_fusion", "persist_layer_norm", "gradient_accumulation_fusion")


def configure_model(provider) -> None:
    """Local layer spec and local attention (with ``PackedDotProductAttention`` for packed batches),
    and the fusions that need TE or apex kernels off."""
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.transformer.enums import AttnBackend

    provider.transformer_layer_spec = local_layer_spec
    provider.attention_backend = AttnBackend.local
    for name in TE_FUSIONS:
        setattr(provider, name, False)
