"""Running Megatron-Bridge where it was not built to run: without CUDA, or without Transformer Engine.

Three kinds of host, decided once per process (``mode()``):

- ``"te"``: a GPU with Transformer Engine. Nothing is changed (beyond serving a
  placeholder for ``nvidia_resiliency_ext`` to Bridge if it is missing, and the
  Bridge bug fixes every host needs, below).
- ``"no_te"``: a GPU without TE. megatron-core builds its TE layer spec from
  ``te_torch``, plain-torch versions of the TE layers (``no_te``), so every model
  family Bridge maps builds the same module tree as on a TE GPU.
- ``"cpu"``: no usable GPU (or ``device="cpu"``). ``no_te`` plus the CPU runtime
  (``cpu``): CUDA device arguments and ``torch.cuda`` functions redirected to the
  CPU, megatron's RNG tracker on the CPU generator, a few Bridge fixes.

The decision is taken by whichever comes first:

1. an entry point calling ``maybe_enable(device)`` (``device`` ``"auto"``,
   ``"cpu"`` or ``"cuda"``; the CLI's ``--device``), or
2. the import gate that ``import bridge_sft`` installs: the first import of
   ``megatron.core`` or ``megatron.bridge`` in the process calls
   ``maybe_enable("auto")`` first. This is the one place where bridge-sft's
   modules get the runtime they need; none of them switches it on itself.

The part that needs torch only (stand-ins served to megatron's importers, device
redirection) happens before megatron is imported; the part that patches megatron
and Bridge happens right after ``megatron.bridge`` is imported (or at once, when
``maybe_enable`` is called on the CPU). That part includes, on every kind of host,
``bridge_sft.bridge_fixes`` (Megatron-Bridge / megatron-core bugs that change a model's
numerics, e.g. Gemma 3's post-norm epsilon): a model built through Bridge's own API
(``AutoBridge.to_megatron_provider``, ``load_megatron_model``) in a process that imported
bridge_sft is then the same model our entry points build. Importing this package
imports nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

logger = logging.getLogger(__name__)

_MODES = ("te", "no_te", "cpu")
_mode: str | None = None
_megatron_patched = False


class TransformerEngineOnCPUError(RuntimeError):
    """Transformer Engine is installed on a host where the CPU runtime must run."""


def mode() -> str | None:
    """``"te"``, ``"no_te"`` or ``"cpu"`` once decided; None before."""
    return _mode


def is_enabled() -> bool:
    """True when the CPU runtime is active in this process."""
    return _mode == "cpu"


def maybe_enable(device: str = "auto") -> bool:
    """Decide this process's runtime for ``device`` and switch it on; True when it is the CPU runtime.

    ``"cpu"``: the CPU runtime. ``"auto"``: the CPU runtime when torch sees no GPU, else
    the GPU as it is (``no_te`` where Transformer Engine is missing). ``"cuda"``: the GPU,
    an error without one. Idempotent; a later call asking for another device than the
    one decided is an error.
    """
    _prepare(device)
    if _mode == "cpu" or "megatron.bridge" in sys.modules:
        _patch_megatron()
    return _mode == "cpu"


def enable() -> None:
    """Switch the CPU runtime on for this process (idempotent)."""
    maybe_enable("cpu")


def configure_model(provider) -> None:
    """Provider settings this host needs: CPU initialisation and no fused kernels on the CPU,
    no TE kernels without TE; nothing on a TE GPU."""
    from bridge_sft.runtime import cpu, no_te

    if _mode == "cpu":
        cpu.configure_model(provider)
    elif _mode == "no_te":
        no_te.configure_model(provider)


def configure(config) -> None:
    """``ConfigContainer`` settings this host needs (``configure_model``, and gloo on the CPU)."""
    from bridge_sft.runtime import cpu

    if _mode == "cpu":
        cpu.configure(config)
    else:
        configure_model(config.model)


def _prepare(device: str) -> None:
    """The torch-level part: decide the mode, serve stand-ins, redirect devices. Imports no megatron."""
    global _mode
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'.")
    from bridge_sft.runtime import no_te

    wanted = "cpu" if device == "cpu" or not torch.cuda.is_available() else ("te" if no_te.te_installed() else "no_te")
    if _mode is not None:
        if device != "auto" and wanted != _mode:
            raise RuntimeError(f"this process already runs Megatron with the {_mode!r} runtime; device={device!r} "
                               "must be chosen before megatron is first imported")
        return
    if wanted == "cpu":
        if no_te.te_installed():
            raise TransformerEngineOnCPUError(
                "Transformer Engine is installed, but this process runs Megatron on the CPU. TE needs CUDA for "
                "every module and its presence makes megatron-core pick TE kernels. Remove it from this "
                "environment (pip uninstall -y transformer-engine transformer-engine-cu12 "
                "transformer-engine-torch) or run on a GPU host."
            )
        from bridge_sft.runtime import cpu

        no_te.serve_missing_imports()
        cpu.patch_torch()
        logger.warning("bridge_sft: CPU runtime active (no CUDA): Megatron runs on the CPU over gloo.")
    else:
        no_te.serve_missing_imports()
        if wanted == "no_te":
            logger.warning("bridge_sft: Transformer Engine is not installed: megatron-core's TE layers run on "
                           "bridge_sft's plain-torch implementation (no fused kernels, no fp8).")
    _mode = wanted


def _patch_megatron() -> None:
    """The megatron-level part: the CPU runtime's patches (CPU only), then the Bridge bug fixes
    (every host); imports megatron.bridge."""
    global _megatron_patched
    if _mode is not None and not _megatron_patched:
        _megatron_patched = True
        if _mode == "cpu":
            from bridge_sft.runtime import cpu

            cpu.patch_megatron()
        from bridge_sft import bridge_fixes

        bridge_fixes.apply()


class _PatchAfterLoading(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_megatron()


class _MegatronImportGate(importlib.abc.MetaPathFinder):
    """Decides the runtime (``maybe_enable("auto")``'s two parts) around the first import of megatron."""

    # It stays on sys.meta_path (removing a finder while Python iterates the list would skip the next one).
    def find_spec(self, fullname, path, target=None):
        if fullname not in ("megatron.core", "megatron.bridge"):
            return None
        _prepare("auto")
        if fullname != "megatron.bridge" or _megatron_patched:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchAfterLoading(spec.loader)
        return spec


def install_import_gate() -> None:
    """Install the gate (``import bridge_sft`` does; idempotent, and nothing once megatron is imported)."""
    if "megatron.bridge" in sys.modules or any(isinstance(f, _MegatronImportGate) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronImportGate())
