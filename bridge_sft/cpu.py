"""CPU runtime: run Megatron-Bridge 0.6.2 / megatron-core 0.19.2 on a machine without CUDA.

Megatron hard-codes CUDA in hundreds of places, so patching call sites does not
scale. This module instead makes the process look like a one-GPU machine whose
"GPU" is the CPU:

1. Everything ``bridge_sft.no_te`` does to run Bridge without Transformer
   Engine: stand-ins for ``transformer_engine``/``nvidia_resiliency_ext`` served
   only to the two Bridge modules that import them unguarded,
   ``peft.utils.HAVE_TE = False``, and THD packed sequences on the local
   attention (``PackedDotProductAttention``).
2. A ``TorchFunctionMode`` that maps CUDA device arguments (``"cuda"``,
   ``"cuda:N"``, integer indices, ``torch.device("cuda")``), ``Tensor.cuda()``,
   ``Tensor.to("cuda")`` and ``pin_memory`` to the CPU, and reports CPU float
   tensors as ``torch.cuda.*Tensor`` from ``Tensor.type()`` (an assert in
   ``megatron/core/optimizer/clip_grads.py`` checks that string).
3. CPU stand-ins for the ``torch.cuda`` functions Megatron calls
   (``current_device``, ``synchronize``, ``Event`` on the wall clock, streams,
   memory statistics, nvtx, RNG state ...). ``torch.cuda.is_available()`` still
   tells the truth.
4. Megatron's CUDA RNG tracker helpers on the CPU generator.
5. Bridge fixes: ``initialize_megatron(allow_no_cuda=True)``, and
   ``temporary_distributed_context`` (single-process conversion/loading) seeding
   the RNG tracker, which Bridge does only when CUDA is available (without it a
   model forward fails: "cuda rng state model-parallel-rng is not added").
6. Checkpoint writes: megatron-core's torch_dist writer creates its results
   queue in a ``spawn`` Manager, which re-imports ``__main__`` (and megatron:
   ~10 s per process); it is created with ``fork`` instead, the start method
   Bridge itself uses for asynchronous saves.

``configure_model(provider)`` and ``configure(config)`` set what Megatron
needs on the CPU: the local layer spec and attention backend, CPU
initialisation, every CUDA fusion off, and gloo.

``enable()`` switches it on (idempotent, logs one line); ``maybe_enable(device)``
does so for ``device="cpu"``, or for ``device="auto"`` when
``torch.cuda.is_available()`` is false. On a GPU it changes nothing, except on a
host without Transformer Engine, where it enables ``bridge_sft.no_te`` (without
which Bridge cannot even be imported there). Importing this module changes nothing.

The mode is thread-local: code that Megatron runs on other threads (none on the
SFT path with ``num_workers=0`` and synchronous checkpoints) would not see it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bridge_sft import no_te

logger = logging.getLogger(__name__)

_ENABLED = False


class TransformerEngineOnCPUError(RuntimeError):
    """Transformer Engine is installed on a host where the CPU runtime must run."""


def is_enabled() -> bool:
    return _ENABLED


def maybe_enable(device: str = "auto") -> bool:
    """Enable the CPU runtime for ``device="cpu"``, or for ``"auto"`` without a GPU.

    Returns True when the CPU runtime is active afterwards. ``device="cuda"``
    (or ``"auto"`` on a GPU host) leaves torch and megatron untouched, apart from
    ``bridge_sft.no_te`` where Transformer Engine (or nvidia_resiliency_ext) is
    not installed.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'.")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        enable()
    elif not _ENABLED and not no_te.is_enabled():
        if no_te.te_installed():
            no_te.serve_missing_imports()
        else:
            logger.warning("bridge_sft: Transformer Engine is not installed: Megatron uses its local layers.")
            no_te.enable()
    return _ENABLED


def enable() -> None:
    """Switch the CPU runtime on for this process (idempotent)."""
    global _ENABLED
    if _ENABLED:
        return
    if no_te.te_installed():
        raise TransformerEngineOnCPUError(
            "Transformer Engine is installed, but this process runs Megatron on the CPU. TE needs CUDA for "
            "every module and its presence makes megatron-core pick TE layers instead of the local layer "
            "spec. Remove it from this environment (pip uninstall -y transformer-engine transformer-engine-cu12 "
            "transformer-engine-torch) or run on a GPU host."
        )
    no_te.serve_missing_imports()
    _patch_torch_cuda()
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
    no_te.enable()
    _patch_megatron()
    _ENABLED = True
    logger.warning("bridge_sft: CPU runtime active (no CUDA): Megatron runs on the CPU over gloo.")


# Beyond no_te.TE_FUSIONS: fusions jit-compiled for CUDA.
_CUDA_ONLY_FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")


def configure_model(provider) -> None:
    """Model-provider settings for the CPU: local layer spec and attention, CPU init, no fusions at all."""
    no_te.configure_model(provider)
    provider.use_cpu_initialization = True
    for name in _CUDA_ONLY_FUSIONS:
        setattr(provider, name, False)


def configure(config) -> None:
    """``ConfigContainer`` settings for the CPU: ``configure_model`` plus gloo and no pinned memory."""
    configure_model(config.model)
    config.dist.distributed_backend = "gloo"
    config.dataset.pin_memory = False


# ---------------------------------------------------------------------------
# 2. Device redirection at the torch level.


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.pop("pin_memory", False):
            pass
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------
# 3. torch.cuda stand-ins.


class _Event:
    """``torch.cuda.Event`` on the wall clock; ``elapsed_time`` in milliseconds."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        event = event or _Event()
        event.record()
        return event


def _returns(value: Any):
    """A new function returning ``value``. Each stand-in must be a distinct object:
    torch._dynamo keys its trace rules by function identity."""
    return lambda *args, **kwargs: value


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stream = _Stream()
    replacements = {
        "current_device": _returns(0),
        "set_device": _returns(None),
        "device_count": _returns(1),
        "synchronize": _returns(None),
        "empty_cache": _returns(None),
        "memory_allocated": _returns(0),
        "max_memory_allocated": _returns(0),
        "memory_reserved": _returns(0),
        "max_memory_reserved": _returns(0),
        "reset_peak_memory_stats": _returns(None),
        "reset_max_memory_allocated": _returns(None),
        "memory_stats": lambda *args, **kwargs: {},
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda *a, **k: stream,
        "default_stream": lambda *a, **k: stream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator
        # directly, and let manual_seed_all do nothing (the CPU generator is already seeded).
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)) and None,
        "manual_seed_all": _returns(None),
    }
    for name, value in replacements.items():
        setattr(cuda, name, value)
    cuda.random.get_rng_state = replacements["get_rng_state"]
    cuda.random.set_rng_state = replacements["set_rng_state"]
    for name in ("range_push", "range_pop", "mark"):
        setattr(cuda.nvtx, name, _returns(None))
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


# ---------------------------------------------------------------------------
# 4./5. Megatron RNG tracker on the CPU generator, and Bridge fixes.


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # On the CPU the "CUDA" and CPU generators are one, so the tracker's fork() always sees
    # the CPU state change inside the fork and warns; the state is restored on exit all the same.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    from megatron.bridge.training import setup as bridge_setup
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue(mp_mode="fork")

    real_initialize_megatron = bridge_setup.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        return real_initialize_megatron(*args, **kwargs)

    bridge_setup.initialize_megatron = initialize_megatron

    from megatron.bridge.training import model_load_save

    real_context = model_load_save.temporary_distributed_context

    @contextlib.contextmanager
    def temporary_distributed_context(backend: str = "gloo"):
        with real_context(backend):
            mcore_random.model_parallel_cuda_manual_seed(0)
            yield

    model_load_save.temporary_distributed_context = temporary_distributed_context
