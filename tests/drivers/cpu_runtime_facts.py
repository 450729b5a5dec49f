"""Driver: report (as JSON on stdout) what bridge_sft's runtime does and does not change.

``cpu_runtime_facts.py inert``: state after ``import bridge_sft`` / ``bridge_sft.runtime``, then after
the first ``import megatron.core`` (the import gate switches the CPU runtime on, this host has no GPU).
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
    import bridge_sft.runtime as runtime

    after_import = snapshot()
    mode_before_megatron = runtime.mode()
    import megatron.core  # noqa: F401  (the gate decides the runtime here)

    after_megatron = snapshot()
    return {"before": before, "after_import": after_import, "after_megatron": after_megatron,
            "mode_before_megatron": mode_before_megatron, "mode": runtime.mode(), "enabled": runtime.is_enabled()}


def gpu():
    import torch

    torch.cuda.is_available = lambda: True
    before = snapshot()
    from bridge_sft import runtime

    active = runtime.maybe_enable("auto")
    after = snapshot()
    from megatron.core.extensions import transformer_engine as mcore_te

    facts = {"active": active, "mode": runtime.mode(), "mcore_have_te": mcore_te.HAVE_TE,
             "cuda_untouched": after["cuda_functions"] == before["cuda_functions"]
             and after["function_modes"] == before["function_modes"]}
    import megatron.bridge  # noqa: F401  (the gate applies bridge_sft.bridge_fixes here, on every host)
    from megatron.bridge.models.common import te_layers

    facts["bridge_fixes"] = getattr(te_layers.TERowParallelLinearLayerNorm, "_bridge_sft_fixed_eps", False)
    return facts


def enabled():
    import torch

    from bridge_sft import runtime
    from bridge_sft.runtime import te_torch

    runtime.enable()
    import megatron.bridge  # noqa: F401  (imports lora_layers and, through training, pretrain)
    import megatron.bridge.training.pretrain  # noqa: F401
    from megatron.bridge.peft import lora_layers
    from megatron.core.extensions import transformer_engine as mcore_te
    from megatron.core.transformer import mlp as mcore_mlp

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
        "te_spec_found": importlib.util.find_spec("transformer_engine") is not None,
        "mcore_have_te": mcore_te.HAVE_TE,
        "te_linear_is_torch": issubclass(mcore_te.TELayerNormColumnParallelLinear, te_torch.LayerNormLinear),
        "lora_te_is_standin": lora_layers.te.Linear is te_torch.Linear,
        "unserved_module_have_te": mcore_mlp.HAVE_TE,  # imports transformer_engine itself: not served
        "unprovided_import_fails": mcore_te.fused_permute is None,  # TE's fused permutation is not provided
    }


if __name__ == "__main__":
    print("FACTS " + json.dumps({"inert": inert, "gpu": gpu, "enabled": enabled}[sys.argv[1]]()))
