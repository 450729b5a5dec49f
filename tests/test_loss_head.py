"""The fused loss head (bridge_sft.loss_head) computes what megatron-core's loss path computes.

- per-token losses and gradients (hidden states, output weight, every model parameter) against
  megatron-core's ``output_layer`` + ``compute_language_model_loss`` on real GPTModels (CPU runtime):
  fp32, bf16, tied embeddings, packed sequences (THD), all-masked, the ``main_grad`` protocol, and
  under torchrun on gloo TP=2 (vocabulary-parallel, with and without sequence parallel) and PP=2
  (megatron-core's 1F1B schedule, the head on the last stage);
- the fallback: one log line per model where the head cannot apply (soft-capping, MTP ...);
- Bridge's ``finetune()`` with the fused head on and off in one run (the GPU suite's dry run): the same
  losses on the same batches and weights. (The recipes' default is on, so every other training test of the
  suite, e.g. tests/test_step.py's HF parity of losses and weight updates, runs through the fused head too.)

Tolerances: fp32 per-token losses 1e-6 absolute (measured: identical), gradients 1e-5 absolute
(measured <= 2.4e-6 on gradients of magnitude ~5: summation order); bf16: the per-token losses and
hidden-state gradients within 1e-6 of megatron-core's, the weight gradient within one bf16 ulp of it,
and each no further from the fp64 result than 1.5x megatron-core's own error (measured on the CPU: all
three identical to megatron-core's).
"""

from __future__ import annotations

import json

import pytest
from launch import REPO, run_python, run_torchrun

FP32_LOSS_TOL, FP32_GRAD_TOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss-head") / "tp1.json"
    run_python("loss_head_parity.py", out, timeout=600)
    return json.loads(out.read_text())


def _check_fp32(case: dict, name: str) -> None:
    print(name, {k: v for k, v in case.items() if "diff" in k})
    assert case["loss_diff"] <= FP32_LOSS_TOL, name
    for key in ("hidden_grad_diff", "weight_grad_diff", "grad_diff"):
        if key in case:
            assert case[key] <= FP32_GRAD_TOL, (name, key)


def test_fp32_losses_and_gradients_equal_megatron_core(parity):
    head = parity["head_fp32"]
    _check_fp32(head, "head_fp32")
    assert head["loss_dtype"] == head["ref_loss_dtype"] == "torch.float32"
    assert head["hidden_grad_scale"] > 1e-2 and head["weight_grad_scale"] > 1  # gradients that can differ
    for name in ("model_tied", "model_packed"):  # whole model: every parameter's gradient
        case = parity[name]
        _check_fp32(case, name)
        assert case["params_with_grads"] >= 8 and case["grad_scale"] > 1
    assert parity["model_packed"]["shape"] == [1, 40] and parity["model_tied"]["shape"] == [2, 40]


def test_all_masked_micro_batch_gives_zero_gradients(parity):
    for name in ("all_masked", "model_all_masked"):
        case = parity[name]
        assert case["loss_diff"] <= FP32_LOSS_TOL and case["loss_scale"] > 1  # losses still computed
        assert case.get("hidden_grad_diff", 0.0) == case.get("weight_grad_diff", 0.0) == 0.0
        assert case.get("hidden_grad_scale", 0.0) == case.get("weight_grad_scale", 0.0) == 0.0
    assert parity["model_all_masked"]["grad_diff"] == parity["model_all_masked"]["max_abs_grad"] == 0.0


def test_bf16_within_megatron_cores_own_accuracy(parity):
    case = parity["head_bf16"]
    print({k: v for k, v in case.items() if "err" in k or "diff" in k})
    assert case["hidden_grad_dtype"] == case["weight_grad_dtype"] == "torch.bfloat16"
    assert case["loss_dtype"] == "torch.float32"
    assert case["loss_diff"] <= 1e-6 and case["hidden_grad_diff"] <= 1e-6 * case["hidden_grad_scale"] + 1e-9
    assert case["weight_grad_diff"] <= 2**-8 * case["weight_grad_scale"]  # one bf16 ulp at the largest value
    for name in ("loss", "hidden_grad", "weight_grad"):
        assert case[f"{name}_err_vs_fp64"] <= 1.5 * case[f"ref_{name}_err_vs_fp64"] + 1e-9, name


def test_main_grad_protocol(parity):
    case = parity["main_grad"]
    assert case["main_grad_diff"] <= FP32_GRAD_TOL and case["scale"] > 1
    assert case["flagged"] and case["dummy_grad_shape"] == [1000, 64]


def test_fallback_logs_one_line_and_uses_megatron_core(parity):
    fallback = parity["fallback"]
    plain = fallback["plain"]
    assert plain["reason"] is None and plain["processor"]
    assert [level for level, _ in plain["log"]] == ["INFO"] and "fused loss head on" in plain["log"][0][1]
    expected = {"gemma2_softcap": "soft-capping", "replaced_output_layer": "Gemma2OutputLayer.forward",
                "mtp": "multi-token prediction"}
    for name, words in expected.items():
        case = fallback[name]
        assert words in case["reason"] and not case["processor"] and case["same_every_call"], name
        assert len(case["log"]) == 1, (name, case["log"])  # one line for three micro-batches
        level, message = case["log"][0]
        assert level == "WARNING" and words in message and "megatron-core" in message
    off = fallback["off"]
    assert not off["processor"] and off["reason"] is None and "off" in off["log"][0][1]
    assert parity["recipe"] == {"default": True, "off": False, "train_iters": 3}


def test_tensor_parallel_2_with_and_without_sequence_parallel_and_pipeline_parallel_2(tmp_path):
    out = tmp_path / "tp2.json"
    run_torchrun("loss_head_parity.py", out, nproc=2, timeout=600)
    result = json.loads(out.read_text())
    assert result["tp"] == 2
    for name in ("head_tp", "head_tp_sp", "model_tp", "model_tp_tied", "model_tp_packed"):
        _check_fp32(result[name], name)
    assert result["head_tp_sp"]["hidden_grad_scale"] > 1e-2
    pipeline = result["model_pp"]  # PP=2, 1F1B over two micro-batches, tied embeddings
    print("model_pp", pipeline)
    assert pipeline["loss_diff"] <= FP32_LOSS_TOL and pipeline["grad_diff"] <= FP32_GRAD_TOL
    assert pipeline["grad_scale"] > 1e-2  # both stages' gradients (the first's via the head's hidden gradient)
    assert pipeline["losses_on_last_stage"] == 2 and pipeline["processor_on_last_stage"] is True
    assert all(n > 0 for n in pipeline["stage_params_with_grads"])


@pytest.mark.slow
def test_finetune_run_with_fused_head_on_and_off_gives_the_same_losses(tmp_path):
    """``benchmarks/gpu_check.py --suite --dry-run`` (the GPU suite's code on the CPU, tiny sizes): one Bridge
    finetune() run of the bridge-sft recipe (bf16, packed long conversations, real Llama 3.2 tokenizer, a
    Gemma-3-sized vocabulary of 262,144) whose iterations alternate between the fused loss head, megatron-core's
    loss path and the unfused packed attention, on identical batches and weights (learning rate 0)."""
    run_python(REPO / "benchmarks" / "gpu_check.py", "--suite", "--dry-run", "--cases", "gemma-4096",
               "--rounds", "2", "--out", tmp_path, timeout=600)
    suite = json.loads((tmp_path / "gpu_check_suite.json").read_text())
    case = suite["cases"]["gemma-4096"]
    variants = ["default", "megatron-core loss", "unfused attention"]
    assert case["settings"]["vocab"] == 262_144 and case["settings"]["variants"] == variants
    kinds = [r["kind"] for r in case["records"]]
    assert kinds == variants + variants[1:] + variants[:1]  # rounds of 3, the order rotating
    used = {r["kind"]: [] for r in case["records"]}
    for r in case["records"]:
        used[r["kind"]].append(r["fused_loss_head_used"])
    assert used == {"default": [True, True], "megatron-core loss": [False, False], "unfused attention": [True, True]}
    checks = case["checks"]
    assert checks["same_supervised_tokens_in_every_round"] and checks["same_flops_in_every_round"]
    assert checks["max_round_loss_rel_diff"]["loss head: fused / megatron-core"] <= 1e-5
    assert checks["max_round_loss_rel_diff"]["packed attention: SDPA / unfused (+ core-attention recompute)"] < 1e-2
    assert 0 < checks["supervised_share_of_slots"] < 1
    for figures in case["per_variant"].values():
        assert figures["timed_iterations"] == 1 and figures["supervised_tokens_per_s_per_gpu"] > 0
    assert set(case["comparisons"]) == set(checks["max_round_loss_rel_diff"])
    report = (tmp_path / "gpu_check_suite.md").read_text()
    assert "DRY RUN" in report and "| megatron-core loss |" in report and "loss head: fused / megatron-core" in report
