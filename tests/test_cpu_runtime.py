"""The CPU runtime (bridge_sft/cpu.py): inert until switched on, a no-op on GPU hosts, and what it changes."""

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


def test_importing_bridge_sft_changes_nothing_until_enabled():
    f = facts("inert")
    assert f["after_import"] == f["before"]
    assert not f["before"]["megatron_imported"]
    # Negative control: enable() does change exactly these things (so the comparison above can fail).
    assert f["enabled"]
    assert f["after_enable"]["function_modes"] == f["before"]["function_modes"] + 1
    assert f["after_enable"]["cuda_functions"]["current_device"] != f["before"]["cuda_functions"]["current_device"]
    assert f["after_enable"]["meta_path"][0] == "_StandInFinder"


def test_auto_mode_is_a_no_op_on_a_gpu_host(tmp_path):
    # The test machine has no GPU: the driver replaces torch.cuda.is_available by `lambda: True`,
    # and fake packages make Transformer Engine and nvidia-resiliency-ext look installed.
    pythonpath = fake_packages(tmp_path, "transformer_engine", "nvidia_resiliency_ext")
    f = facts("gpu", env={"PYTHONPATH": pythonpath})
    assert f == {"active": False, "unchanged": True, "no_te": False, "cuda_untouched": True}


def test_a_gpu_host_without_transformer_engine_gets_local_layers_only(tmp_path):
    f = facts("gpu", env={"PYTHONPATH": str(REPO)})
    assert f["active"] is False and f["no_te"] is True  # Bridge importable, local layer spec
    assert f["cuda_untouched"]  # but no device redirection: the GPU is used


def test_enabled_runtime_redirects_cuda_and_serves_stand_ins_only_to_their_importers():
    f = facts("enabled")
    assert f["devices"] == ["cpu"] * 6
    assert f["type"] == "torch.cuda.FloatTensor" and f["type_with_dtype"]
    assert f["is_available"] is False and f["elapsed_ms_nonnegative"]
    # Bridge's lora_layers got the TE stand-in, but nothing else sees a transformer_engine package:
    assert f["lora_te_is_standin"]
    assert not f["te_importable"] and not f["te_in_sys_modules"] and not f["te_spec_found"]
    assert f["mcore_have_te"] is False and f["peft_have_te"] is False


def test_transformer_engine_on_a_cpu_host_is_a_clear_error(tmp_path):
    fake = tmp_path / "site" / "transformer_engine"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('TE needs CUDA')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", "import bridge_sft.train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("bridge_sft.cpu.TransformerEngineOnCPUError: Transformer Engine is installed")
    assert "pip uninstall" in last_line


def test_packed_attention_sdpa_path_equals_the_local_unfused_kernel():
    """THD packs without TE: torch SDPA per sequence == megatron-core's own kernel per sequence
    (fp32, GQA, trailing padding); forward and q/k/v gradients, abs 1e-5. That each sequence sees only
    itself is shown end to end by tests/test_data_training.py (packed == unpacked, and a crosstalk control)."""
    out = run_python("packed_attention.py").stdout
    f = json.loads(out.split("FACTS ", 1)[1].splitlines()[0])
    assert f["shape"] == [40, 1, 64]
    assert f["out_diff"] <= 1e-5 < f["out_scale"] and f["grad_diff"] <= 1e-5 < f["grad_scale"]
