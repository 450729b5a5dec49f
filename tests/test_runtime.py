"""bridge_sft.runtime: inert until megatron is imported, a no-op on GPU hosts with TE, and what it changes
on the CPU and on a GPU without Transformer Engine (megatron-core's TE layers in plain torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from launch import REPO, run_python


def facts(scenario: str, env: dict | None = None) -> dict:
    if env is None:
        out = run_python("cpu_runtime_facts.py", scenario).stdout
    else:
        out = subprocess.run([sys.executable, str(REPO / "tests/drivers/cpu_runtime_facts.py"), scenario], cwd=REPO,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.split("FACTS ", 1)[1].splitlines()[0])


def fake_packages(root, *names) -> str:
    """Importable-looking (never imported) packages, so find_spec() sees them installed."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("raise RuntimeError('a test stand-in: must not be imported')\n")
    return os.pathsep.join([str(root), str(REPO)])


def test_importing_bridge_sft_installs_only_the_gate_which_acts_on_the_first_megatron_import():
    f = facts("inert")
    before, after_import, after_megatron = f["before"], f["after_import"], f["after_megatron"]
    assert not before["megatron_imported"] and not after_import["megatron_imported"]
    # import bridge_sft: one finder more, nothing else (no patch of torch.cuda, no function mode, no decision).
    assert after_import["meta_path"] == ["_MegatronImportGate", *before["meta_path"]]
    assert {k: v for k, v in after_import.items() if k != "meta_path"} == \
        {k: v for k, v in before.items() if k != "meta_path"}
    assert f["mode_before_megatron"] is None
    # Negative control: the first megatron import (no GPU here) switches the CPU runtime on.
    assert f["mode"] == "cpu" and f["enabled"]
    assert after_megatron["function_modes"] == before["function_modes"] + 1
    assert after_megatron["cuda_functions"]["current_device"] != before["cuda_functions"]["current_device"]
    assert after_megatron["meta_path"][0] == "_StandInFinder"


def test_auto_mode_is_a_no_op_on_a_gpu_host_with_transformer_engine(tmp_path):
    # The test machine has no GPU: the driver replaces torch.cuda.is_available by `lambda: True`,
    # and fake packages make Transformer Engine, nvidia-resiliency-ext and the kernel packages look installed
    # (never imported: the driver stops before megatron would import them). Every package of no_te.SERVED_KERNELS.
    from bridge_sft.runtime.no_te import SERVED_KERNELS

    pythonpath = fake_packages(tmp_path, "transformer_engine", "nvidia_resiliency_ext", *SERVED_KERNELS)
    env = {"PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from bridge_sft.runtime import maybe_enable, mode; import sys\n"
        "print('MODE', maybe_enable('auto'), mode(), [type(f).__name__ for f in sys.meta_path][:2],"
        " id(torch.cuda.current_device) == id(torch.cuda.__dict__['current_device']))")],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=True)
    line = proc.stdout.split("MODE ", 1)[1].splitlines()[0]
    assert line.startswith("False te ") and "_StandInFinder" not in line


def test_a_gpu_host_without_transformer_engine_gets_the_plain_torch_te_layers_only(tmp_path):
    f = facts("gpu", env={"PYTHONPATH": str(REPO)})
    assert f["active"] is False and f["mode"] == "no_te"
    assert f["mcore_have_te"] is True  # megatron-core's TE layer spec, on bridge_sft.runtime.te_torch
    assert f["cuda_untouched"]  # but no device redirection: the GPU is used
    assert f["bridge_fixes"]  # Bridge's bugs fixed for models built through Bridge's own API too


def test_enabled_runtime_redirects_cuda_and_serves_te_only_to_its_importers():
    f = facts("enabled")
    assert f["devices"] == ["cpu"] * 6
    assert f["type"] == "torch.cuda.FloatTensor" and f["type_with_dtype"]
    assert f["is_available"] is False and f["elapsed_ms_nonnegative"]
    # megatron-core's TE wrappers and Bridge's LoRA layers get the plain-torch TE ...
    assert f["mcore_have_te"] and f["te_linear_is_torch"] and f["lora_te_is_standin"]
    # ... and nothing else sees a transformer_engine package, nor a TE feature it does not provide.
    assert not f["te_importable"] and not f["te_in_sys_modules"] and not f["te_spec_found"]
    assert f["unserved_module_have_te"] is False and f["unprovided_import_fails"]


def test_transformer_engine_on_a_cpu_host_is_a_clear_error(tmp_path):
    fake = tmp_path / "site" / "transformer_engine"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('TE needs CUDA')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", "import bridge_sft.train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("bridge_sft.runtime.TransformerEngineOnCPUError: Transformer Engine is installed")
    assert "pip uninstall" in last_line


def test_plain_torch_te_attention_equals_megatron_cores_own_kernel():
    """te_torch.DotProductAttention (SDPA, or the sink-aware path) against megatron-core's unfused local
    attention, packed (per sequence) and unpacked, for causal GQA, a sliding window and learnable sinks:
    outputs and q/k/v/sink gradients within 1e-5 (fp32). That each packed sequence sees only itself in a
    whole model is shown end to end by tests/test_data_training.py (packed == unpacked, crosstalk control)."""
    out = run_python("te_attention.py").stdout
    cases = json.loads(out.split("FACTS ", 1)[1].splitlines()[0])
    assert set(cases) == {f"{c}/{layout}" for c in ("causal_gqa", "window", "sinks_window")
                          for layout in ("thd", "sbhd")}
    for name, f in cases.items():
        assert f["shape"] == ([40, 64] if name.endswith("thd") else [24, 2, 64]), name
        assert f["out_diff"] <= 1e-5 < f["out_scale"], (name, f)
        assert f["grad_diff"] <= 1e-5 < f["grad_scale"], (name, f)
