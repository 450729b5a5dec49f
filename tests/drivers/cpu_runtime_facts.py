"""Driver: report (as JSON on stdout) what the CPU runtime does and does not change.

``cpu_runtime_facts.py inert``: state after ``import bridge_sft`` / ``bridge_sft.cpu``, then after ``enable()``.
``cpu_runtime_facts.py gpu``: ``maybe_enable("auto")`` on a host whose torch reports a GPU
(torch.cuda.is_available is replaced by ``lambda: True``: no GPU exists on the test machine);
run it with stand-in ``transformer_engine``/``nvidia_resiliency_ext`` packages on PYTHONPATH
for a GPU host that has them, without for one that has not.
``cpu_runtime_facts.py enabled``: behaviour of the enabled runtime (devices, stand-ins, megatron flags).
"""

import importlib.util
import json
import sys


def snapshot():
    import torch
    from torch.overrides import _get_current_function_mode_stack

    return {
        "megatron_imported": any(m == "megatron" or m.startswith("megatron.") for m in sys.modules),
        "cuda_functions": {n: id(getattr(torch.cuda, n)) for n in ("current_device", "synchronize", "Event",
                                                                    "get_rng_state", "manual_seed")},
        "function_modes": len(_get_current_function_mode_stack()),
        "meta_path": [type(f).__name__ for f in sys.meta_path],
    }


def inert():
    before = snapshot()  # imports torch only
    import bridge_sft  # noqa: F401
    import bridge_sft.cpu as cpu

    after_import = snapshot()
    cpu.enable()
    after_enable = snapshot()
    return {"before": before, "after_import": after_import, "after_enable": after_enable,
            "enabled": cpu.is_enabled()}


def gpu():
    import torch

    torch.cuda.is_available = lambda: True
    before = snapshot()
    import bridge_sft.cpu as cpu

    from bridge_sft import no_te

    active = cpu.maybe_enable("auto")
    after = snapshot()
    return {"active": active, "unchanged": after == before, "no_te": no_te.is_enabled(),
            "cuda_untouched": after["cuda_functions"] == before["cuda_functions"]
            and after["function_modes"] == before["function_modes"]}


def enabled():
    import torch

    import bridge_sft.cpu as cpu
    from bridge_sft import no_te

    cpu.enable()
    import megatron.bridge  # noqa: F401  (imports lora_layers and, through training, pretrain)
    import megatron.bridge.training.pretrain  # noqa: F401
    from megatron.bridge.peft import lora_layers
    from megatron.bridge.peft import utils as peft_utils
    from megatron.core.extensions import transformer_engine as mcore_te

    try:
        import transformer_engine  # noqa: F401

        te_importable = True
    except ImportError:
        te_importable = False
    x = torch.zeros(2)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    return {
        "devices": [str(t.device) for t in (torch.empty(2, device="cuda"), torch.ones(1, device=0), x.cuda(),
                                            x.to("cuda:0"), x.to(torch.device("cuda")), x.pin_memory())],
        "type": x.type(),
        "type_with_dtype": x.type(torch.float64).dtype == torch.float64,
        "is_available": torch.cuda.is_available(),
        "elapsed_ms_nonnegative": start.elapsed_time(end) >= 0,
        "te_importable": te_importable,
        "te_in_sys_modules": "transformer_engine" in sys.modules,
        "mcore_have_te": mcore_te.HAVE_TE,
        "peft_have_te": peft_utils.HAVE_TE,
        "lora_te_is_standin": isinstance(lora_layers.te, no_te._Missing),
        "te_spec_found": importlib.util.find_spec("transformer_engine") is not None,
    }


if __name__ == "__main__":
    print("FACTS " + json.dumps({"inert": inert, "gpu": gpu, "enabled": enabled}[sys.argv[1]]()))
