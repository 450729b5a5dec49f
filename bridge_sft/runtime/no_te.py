"""Megatron-Bridge without Transformer Engine: the CPU runtime's base, and GPU hosts without TE.

Bridge maps HF weights onto megatron-core's Transformer-Engine layer spec, and
several model families build their layers from TE classes directly. Without TE,
``bridge_sft.runtime.te_torch`` provides those classes in plain torch, so the
module tree (names, shapes, parallelism) is the one a TE GPU builds:

1. ``transformer_engine`` is served as ``te_torch`` to the megatron modules in
   ``SERVED_TE`` only, through a private ``__import__`` in their module globals;
   ``sys.modules`` never holds it, so every other ``import transformer_engine``
   still fails (a global stub would send all of megatron-core down TE-only code
   paths: fused kernels, fp8, TE's optimizers). ``nvidia_resiliency_ext`` is
   served as an inert placeholder to the one Bridge module that imports it
   unguarded (``training/pretrain.py``).
2. ``configure_model(provider)`` turns off what needs real TE (or apex) kernels:
   fused RoPE/softmax/cross-entropy/permutation/router, fused weight-gradient
   accumulation.

``SERVED_KERNELS``: the same for the CUDA-only kernel packages of megatron-core's Mamba layers
(``mamba_ssm``, ``causal_conv1d``: ``bridge_sft.runtime.mamba``) and gated DeltaNet layers (``fla``:
``bridge_sft.runtime.gated_delta``), served to the modules that import them.

``serve_missing_imports()`` does 1. for whichever of these packages is
not installed (before megatron is imported). Importing this module changes nothing.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

# Megatron modules that get the pure-torch Transformer Engine (when TE is not installed):
# the TE wrappers megatron-core's layer specs use, the MoE experts that check for them,
# Bridge's LoRA layers, and Bridge's model bridges that choose the TE spec by `import transformer_engine`.
SERVED_TE = (
    "megatron.core.utils",  # get_te_version(): the stand-in's version selects the TE API te_torch follows
    "megatron.core.extensions.transformer_engine",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.post_training.modelopt.layers",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs",  # gated DeltaNet hybrids' TE spec
    "megatron.bridge.peft.lora_layers",
    "megatron.bridge.models.deepseek.deepseek_v2_bridge",
    "megatron.bridge.models.deepseek.deepseek_v3_bridge",
    "megatron.bridge.models.glm.glm45_bridge",
    "megatron.bridge.models.olmoe.olmoe_provider",
)
# CUDA-only kernel packages with plain-torch stand-ins in bridge_sft.runtime: package -> (the megatron modules
# that get them, "stand-in module:its PROVIDES table"). megatron.core.utils reads versions (packed training).
SERVED_KERNELS = {
    "mamba_ssm": (("megatron.core.ssm.mamba_mixer", "megatron.core.utils"), "mamba:PROVIDES_MAMBA_SSM"),
    "causal_conv1d": (("megatron.core.ssm.mamba_mixer", "megatron.core.utils"), "mamba:PROVIDES_CAUSAL_CONV1D"),
    "fla": (("megatron.core.ssm.gated_delta_net.common",), "gated_delta:PROVIDES_FLA"),
}
# Imported unguarded by Bridge (nvrx >= 0.5 needs glibc 2.39 and 0.4.1 breaks megatron-core): a placeholder.
SERVED_PLACEHOLDER = {"megatron.bridge.training.pretrain": "nvidia_resiliency_ext"}


class _Missing(type):
    """A class standing in for any name of a package that is not installed.

    Attribute access yields further stand-ins (``te.ops.Sequential``), so
    annotations, base classes and ``isinstance`` checks work (nothing is an
    instance); instantiating one raises ImportError.
    """

    def __getattr__(cls, name: str) -> "_Missing":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{cls.__qualname__}.{name}", (), {"__module__": cls.__module__})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{cls.__qualname__} is not available: its package is not installed.")


def _placeholder_module(name: str, provides: dict[str, Any] | None = None) -> types.ModuleType:
    """A module holding ``provides``; any other public name is a ``_Missing`` placeholder."""
    module = types.ModuleType(name, f"bridge_sft stand-in for the missing package {name!r}")
    module.__dict__.update(provides or {})

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{name}.{attr}", (), {"__module__": name})

    module.__getattr__ = __getattr__
    return module


def _stand_in_modules(table: dict[str, dict[str, Any]]) -> dict[str, types.ModuleType]:
    """A package and its submodules as ``table`` (module name -> provided names) gives them, linked as attributes."""
    modules = {name: _placeholder_module(name, provides) for name, provides in table.items()}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def _import_serving(served: dict[str, types.ModuleType], placeholder: str | None):
    """An ``__import__`` that serves ``served`` modules (and a ``placeholder`` package) and delegates all else.

    ``from P import name`` of a served ``P`` raises ImportError unless ``P`` provides ``name``, so
    megatron's ``try: from transformer_engine.X import Y / except ImportError`` fallbacks still apply.
    """
    real_import = builtins.__import__

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        root = name.partition(".")[0]
        if level == 0 and root == placeholder:
            return _placeholder_module(name) if fromlist else _placeholder_module(root)
        if level == 0 and root in served:
            module = served.get(name)
            if module is None:
                raise ImportError(f"{name} is not provided by bridge_sft's plain-torch stand-in for {root}")
            for attr in fromlist or ():
                if attr != "*" and attr not in module.__dict__:
                    raise ImportError(f"cannot import {attr!r} from {name} (bridge_sft's plain-torch stand-in "
                                      f"for {root} does not provide it)")
            return module if fromlist else served[root]  # `import a.b as x` binds via getattr(a, "b")
        return real_import(name, globals, locals, fromlist, level)

    return __import__


class _ServingLoader(importlib.abc.Loader):
    """Executes a module with a private builtins dict whose ``__import__`` serves the stand-ins."""

    def __init__(self, loader: importlib.abc.Loader, importer):
        self._loader = loader
        self._import = importer

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__builtins__ = {**builtins.__dict__, "__import__": self._import}
        self._loader.exec_module(module)


class _StandInFinder(importlib.abc.MetaPathFinder):
    def __init__(self, importers: dict[str, Any]):
        self._importers = importers

    def find_spec(self, fullname, path, target=None):
        importer = self._importers.get(fullname)
        if importer is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ServingLoader(spec.loader, importer)
        return spec


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def te_installed() -> bool:
    return installed("transformer_engine")


def is_serving_te() -> bool:
    """True when megatron gets ``te_torch`` as its Transformer Engine in this process."""
    return any(isinstance(f, _StandInFinder) and "megatron.core.extensions.transformer_engine" in f._importers
               for f in sys.meta_path)


def serve_missing_imports() -> None:
    """Serve the stand-ins for whichever of transformer_engine / nvidia_resiliency_ext is not installed.

    Must run before megatron is imported (the served modules read them at import time). Idempotent.
    """
    if any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return
    served: dict[str, dict[str, types.ModuleType]] = {}  # importer -> the stand-in modules it gets
    if not te_installed():
        from bridge_sft.runtime import te_torch

        te = _stand_in_modules(te_torch.PROVIDES)
        for name in SERVED_TE:
            served.setdefault(name, {}).update(te)
    for package, (package_importers, table) in SERVED_KERNELS.items():
        if not installed(package):
            stand_in, _, name = table.partition(":")
            modules = _stand_in_modules(getattr(importlib.import_module(f"bridge_sft.runtime.{stand_in}"), name))
            for name in package_importers:
                served.setdefault(name, {}).update(modules)
    importers: dict[str, Any] = {name: _import_serving(modules, None) for name, modules in served.items()}
    for importer, package in SERVED_PLACEHOLDER.items():
        if not installed(package):
            importers[importer] = _import_serving({}, package)
    if not importers:
        return
    already = sorted(m for m in importers if m in sys.modules)
    if already:
        raise RuntimeError(f"bridge_sft's runtime must be set up before megatron is imported (already imported: "
                           f"{already}); import bridge_sft (or call bridge_sft.runtime.maybe_enable()) first")
    sys.meta_path.insert(0, _StandInFinder(importers))


# Provider settings that need Transformer Engine (or apex) kernels, turned off without TE.
TE_KERNEL_SETTINGS = (
    "apply_rope_fusion",  # TE's fused RoPE
    "masked_softmax_fusion",  # apex/TE fused softmax (local attention only)
    "persist_layer_norm",  # apex
    "gradient_accumulation_fusion",  # TE/apex fused weight-gradient accumulation
    "moe_permute_fusion",  # TE's fused token permutation
    "moe_router_fusion",  # TE's fused router top-k
    "fused_residual_rmsnorm",  # TE ops fuser
    "use_te_rng_tracker",
    "tp_comm_overlap",  # TE userbuffers
)


def configure_model(provider) -> None:
    """Turn off the provider settings that need TE kernels; the layer spec stays the family's own."""
    from megatron.core.transformer.enums import AttnBackend

    for name in TE_KERNEL_SETTINGS:
        if hasattr(provider, name):
            setattr(provider, name, False)
    # Which TE attention kernel to use (flash/fused/unfused) means nothing to te_torch; megatron writes the
    # choice into NVTE_* environment variables and asserts them, so one value for every model keeps a
    # process that builds several models (conversion, tests) consistent. (`local` would swap the layers.)
    if provider.attention_backend != AttnBackend.local:
        provider.attention_backend = AttnBackend.auto
