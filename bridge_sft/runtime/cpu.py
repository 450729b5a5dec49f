"""CPU runtime: run Megatron-Bridge 0.6.2 / megatron-core 0.19.2 on a machine without CUDA.

Megatron hard-codes CUDA in hundreds of places, so patching call sites does not
scale. This module instead makes the process look like a one-GPU machine whose
"GPU" is the CPU (on top of ``bridge_sft.runtime.no_te``, which stands in for
Transformer Engine):

1. A ``TorchFunctionMode`` that maps CUDA device arguments (``"cuda"``,
   ``"cuda:N"``, integer indices, ``torch.device("cuda")``), ``Tensor.cuda()``,
   ``Tensor.to("cuda")`` and ``pin_memory`` to the CPU, and reports CPU float
   tensors as ``torch.cuda.*Tensor`` from ``Tensor.type()`` (an assert in
   ``megatron/core/optimizer/clip_grads.py`` checks that string). It also hands
   ``all_to_all_single`` the split sizes of megatron's MoE token dispatcher as
   lists (on CUDA megatron makes them numpy arrays; gloo has the collective).
2. CPU stand-ins for the ``torch.cuda`` functions Megatron calls
   (``current_device``, ``synchronize``, ``Event`` on the wall clock, streams,
   memory statistics, nvtx, RNG state ...). ``torch.cuda.is_available()`` still
   tells the truth.
3. Megatron's CUDA RNG tracker helpers on the CPU generator.
4. Bridge fixes: ``initialize_megatron(allow_no_cuda=True)``, and
   ``temporary_distributed_context`` (single-process conversion/loading) seeding
   the RNG tracker, which Bridge does only when CUDA is available (without it a
   model forward fails: "cuda rng state model-parallel-rng is not added").
5. Checkpoint writes: megatron-core's torch_dist writer creates its results
   queue in a ``spawn`` Manager, which re-imports ``__main__`` (and megatron:
   ~10 s per process); it is created with ``fork`` instead, the start method
   Bridge itself uses for asynchronous saves.

1 and 2 (``patch_torch``) need only torch and happen before megatron is imported;
3 to 5 (``patch_megatron``) import megatron. ``configure_model(provider)`` and
``configure(config)`` set what Megatron needs on the CPU: CPU initialisation, every
CUDA fusion off, and gloo. ``bridge_sft.runtime`` decides when all this is switched on.

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

from bridge_sft.runtime import no_te

logger = logging.getLogger(__name__)


# Beyond no_te.TE_KERNEL_SETTINGS: fusions jit-compiled for CUDA.
_CUDA_ONLY_FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")


def configure_model(provider) -> None:
    """Model-provider settings for the CPU: CPU initialisation and no fused kernels at all."""
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
# 1. Device redirection at the torch level.


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
        if func is torch.distributed.all_to_all_single:
            _split_sizes_as_lists(kwargs)
        return func(*args, **kwargs)


def _split_sizes_as_lists(kwargs: dict) -> None:
    """megatron's MoE alltoall dispatcher moves its split sizes to host memory as numpy arrays, but only
    from a CUDA tensor (``moe_utils.maybe_move_tensor_to_cpu``); on the CPU they stay tensors, which
    ``all_to_all_single`` rejects. Give it lists (expert parallelism over gloo)."""
    for key in ("output_split_sizes", "input_split_sizes"):
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].tolist()


# ---------------------------------------------------------------------------
# 2. torch.cuda stand-ins.


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


def patch_torch() -> None:
    """Device redirection (1.) and the torch.cuda stand-ins (2.); needs torch only."""
    _patch_torch_cuda()
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process


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
# 3.-5. Megatron RNG tracker on the CPU generator, Bridge fixes, checkpoint writes.


def patch_megatron() -> None:
    """3. to 5.: megatron's RNG tracker on the CPU generator, Bridge fixes, fork for checkpoint writes."""
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
