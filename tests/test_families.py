"""Every model family bridge-sft supports, on the CPU runtime (megatron-core's TE layer spec on
bridge_sft.runtime.te_torch): the Megatron model is numerically the HF model, trains, and exports.

One driver process checks the forward parity of all families (model after model, each a tiny model
shrunk from a flagship's published config: bridge_sft.published_configs); the HF ->
Megatron -> HF round trip of all families is tests/test_conversion.py. Training runs (a process
each) cover the families whose layers differ most from Llama's by default; the others are marked
``extended`` (``pytest -m extended`` runs them).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch import run_python
from probes import hf_logits, probe_tokens
from transformers import AutoConfig

from bridge_sft.published_configs import PUBLISHED, lost_fields
from bridge_sft.tiny import MOE_ARCHS, TINY_ARCHS, build_published_tiny_model, build_tiny_model

# custom TE spec + windows; sinks + biased MoE; MLA + MoE; Mamba-2 hybrid (its MoE variant: extended); gated-DeltaNet
# hybrid (its MoE variants, Qwen3.5 MoE and Qwen3-Next: extended)
TRAINED_BY_DEFAULT = ("gemma3", "gpt_oss", "deepseek_v3", "nemotron_h", "qwen3_5")
# Loss drop over the 8 iterations of the training test: 0.2, less for the families whose tiny models learn more
# slowly: Gemma 4 (loss 6.26 -> 6.13, falling at every step from the 4th; its export equals the trained model
# within 1e-6; its MoE variant: 6.25 -> 6.11), the Mamba-2 hybrids (measured drops: 0.21 for nemotron_h, 0.13 for
# its MoE variant, whose gradients at initialisation equal HF's).
MIN_LOSS_DROP = {"gemma4": 0.1, "gemma4_moe": 0.1, "nemotron_h": 0.1, "nemotron_h_moe": 0.1}


def test_every_family_matches_hf_through_the_forward_step(tmp_path):
    """Tiny stand-ins of every family's published flagship config (bridge_sft.published_configs: Gemma 3 1B
    and 4B, DeepSeek-V3 and Moonlight among them), only shrunk in size: per-token losses of a short dialog and
    a conversation of over 1,100 tokens (positions past 1,024, published windows crossed twice), packed in one
    THD row and one by one, through bridge_sft.step.forward_step, equal the HF model's within 1e-5
    (fp32; within HF's own fp32-vs-fp64 error where that is larger: Gemma 4). A DeepSeek-V3 whose
    group-limited routing megatron-core scores differently is refused. The tiny Falcon-H1 family rides along:
    the published Falcon-H1's LM-head multiplier (0.04) leaves random logits too flat to show a Mamba state
    leaking from one packed sample into the next (measured: under 1e-6); the tiny family's larger multipliers
    show it (0.02 measured with Bridge's layer keeping the pack from the mixer). Two Gemma 4 MoE layouts Bridge
    converts wrongly on its own ride along too: the tiny family, whose config carries a top-level ``rope_theta``
    that HF ignores and Bridge would rotate global layers with (0.41 off), and one of global layers only whose
    values are not their keys (Bridge: shape errors); and a tiny dense Gemma 4 whose vocabulary (8 rows more) is
    not a multiple of 128, which Bridge's dense Gemma 4 provider pads (shape error on load)."""
    models = [build_published_tiny_model(tmp_path / name, name) for name in PUBLISHED]
    leak_sentinel = build_tiny_model(tmp_path / "falcon_h1-tiny", "falcon_h1")
    moe = build_tiny_model(tmp_path / "gemma4_moe-tiny", "gemma4_moe")
    dense = build_tiny_model(tmp_path / "gemma4-tiny", "gemma4")
    gemma4 = [moe, _variant(moe, tmp_path / "gemma4_moe-global", attention_k_eq_v=False,
                            layer_types=["full_attention"] * AutoConfig.from_pretrained(moe).num_hidden_layers),
              _variant(dense, tmp_path / "gemma4-vocab", vocab_size=AutoConfig.from_pretrained(dense).vocab_size + 8)]
    for hf_dir in models:
        assert lost_fields(hf_dir.name, AutoConfig.from_pretrained(hf_dir)) == [], hf_dir.name
    regrouped = tmp_path / "deepseek-v3-topk4"
    shutil.copytree(tmp_path / "deepseek-v3", regrouped)
    config = json.loads((regrouped / "config.json").read_text())
    (regrouped / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 4}))
    out = tmp_path / "parity.json"
    run_python("family_parity.py", out, "--long", 1100, *models, regrouped, leak_sentinel, *gemma4, timeout=1500)
    results = json.loads(out.read_text())
    for hf_dir in gemma4:
        r = results.pop(hf_dir.name)
        assert max(r.get(k, 1.0) for k in ("packed_vs_hf", "unpacked_vs_hf", "packed_vs_unpacked")) <= 1e-5, r
    assert results.pop(regrouped.name)["error"].startswith("UnsupportedModelError: "), results
    sentinel = results.pop(leak_sentinel.name)
    assert sentinel.get("packed_vs_unpacked", 1.0) <= 1e-5 and sentinel["unpacked_vs_hf"] <= 1e-5, sentinel
    assert sentinel["loss_scale"] > 1.0 and sentinel["lengths"][1] > 1100, sentinel
    assert set(results) == set(PUBLISHED)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        # 1e-5, or HF's own fp32 rounding error where larger (Gemma 4's unscaled attention logits: ~1e-4)
        tolerance = max(1e-5, r["hf_fp32_vs_fp64"] or 0.0)
        assert r["packed_vs_hf"] <= tolerance and r["unpacked_vs_hf"] <= tolerance, (name, r)
        assert r["packed_vs_unpacked"] <= 1e-5, (name, r)
        assert r["loss_scale"] > 1.0 and r["supervised"] > 0, (name, r)
        assert len(r["lengths"]) == 2 and r["lengths"][1] > 1100 and r["lengths"][0] > 32, (name, r)


def _variant(hf_dir, out, **fields):
    """The model of ``hf_dir`` with config ``fields`` changed, new random weights, written to ``out``."""
    from transformers import AutoTokenizer

    from bridge_sft.tiny import _write_random_model

    config = AutoConfig.from_pretrained(hf_dir)
    for key, value in fields.items():
        setattr(config, key, value)
    return _write_random_model(config, AutoTokenizer.from_pretrained(hf_dir), out, seed=0, randomise=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    a if a in TRAINED_BY_DEFAULT else pytest.param(a, marks=pytest.mark.extended)
    for a in TINY_ARCHS if a not in ("llama",)  # llama: tests/test_end_to_end.py
])
def test_family_trains_with_the_default_recipe_and_exports_to_hf(arch, tiny_models, tmp_path):
    """``tiny`` recipe defaults (no model-specific overrides): the loss falls, the HF checkpoint Bridge writes
    beside the last checkpoint loads in transformers and gives the trained Megatron model's logits (1e-4)."""
    hf_dir, out = tiny_models[arch], tmp_path / "run"
    out.mkdir()
    tokens = probe_tokens(hf_dir, tmp_path / "tokens.json")
    run_python("train_probe.py", out, tmp_path / "tokens.json", "tiny", f"hf_path={hf_dir}", f"output_dir={out}",
               "train_iters=8", "log_interval=1", "eval_interval=null", "save_interval=8", timeout=900)
    probe = json.loads((out / "probe.json").read_text())
    losses = {int(k): v for k, v in probe["losses"].items()}
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - MIN_LOSS_DROP.get(arch, 0.2), losses
    export = out / "checkpoints" / "iter_0000008" / "hf"
    exported = hf_logits(export, tokens)
    assert (exported - hf_logits(hf_dir, tokens)).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(exported, torch.load(out / "probe_logits.pt"), rtol=0, atol=1e-4)


def test_moe_families_under_tensor_and_expert_parallelism(tiny_models, tmp_path):
    """Forward losses of each MoE family with TP=2 and with EP=2 (2 ranks on gloo) equal the 1-process ones."""
    out = tmp_path / "moe_parallel.json"
    from launch import run_torchrun

    run_torchrun("family_parallel.py", out, *(tiny_models[a] for a in MOE_ARCHS), timeout=1200)
    results = json.loads(out.read_text())
    arch_of = {tiny_models[a].name: a for a in MOE_ARCHS}
    assert set(results) == set(arch_of)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        for layout in ("tp2", "ep2"):
            if arch_of[name] == "olmoe" and layout == "tp2":  # Bridge's OLMoE q/k norms span all heads: refused
                assert r[layout].startswith("unsupported: model.tensor_model_parallel_size=2"), r
                continue
            assert r[layout] <= 1e-5, (name, layout, r)
    assert results[tiny_models["qwen3_moe"].name]["scale"] > 1.0


@pytest.mark.parametrize("model_type, fields, named", [
    ("falcon_h1", {"mamba_proj_bias": True}, "mamba_proj_bias=True"),
    ("falcon_h1", {"mamba_conv_bias": False}, "mamba_conv_bias=False"),
    ("nemotron_h", {"mamba_hidden_act": "gelu"}, "mamba_hidden_act='gelu'"),
    ("nemotron_h", {"time_step_limit": (0.0, 0.1)}, "time_step_limit=(0.0, 0.1)"),
    ("nemotron_h", {"mamba_proj_bias": True}, "mamba_proj_bias=True"),
    ("qwen3_next", {"mlp_only_layers": [0, 3]}, "mlp_only_layers=[0, 3]"),
    ("qwen3_next", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen3_next", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("glm_moe_dsa", {}, "DeepSeek sparse attention"),
])
def test_hybrids_megatron_cannot_build_are_refused_in_one_line(model_type, fields, named):
    """What megatron-core's Mamba mixer cannot build (Nemotron-H's or Falcon-H1's), or Bridge's Qwen3-Next bridge
    does not map, or GLM-5's sparse attention, is refused by name."""
    from transformers import FalconH1Config, GlmMoeDsaConfig, NemotronHConfig, Qwen3NextConfig

    from bridge_sft.models import UnsupportedModelError, _check_hf_config

    config = {"falcon_h1": FalconH1Config, "nemotron_h": NemotronHConfig,
              "qwen3_next": Qwen3NextConfig, "glm_moe_dsa": GlmMoeDsaConfig}[model_type](**fields)
    with pytest.raises(UnsupportedModelError) as refused:
        _check_hf_config("some/model", config)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("some/model: ") and named in message, message
    _check_hf_config("some/model", NemotronHConfig())  # the published defaults pass
    _check_hf_config("some/model", FalconH1Config())
    _check_hf_config("some/model", Qwen3NextConfig())


def test_gemma4_moe_layer_layouts_bridge_cannot_build_are_refused_in_one_line():
    """Bridge's Gemma 4 MoE model repeats k sliding-window layers then one global layer; other layer_types (HF
    makes the last layer global: 8 layers of the published 5:1 end 5:1, 1:1) are refused at config time."""
    from transformers import Gemma4TextConfig

    from bridge_sft.models import UnsupportedModelError, _check_hf_config

    published = PUBLISHED["gemma-4-26b-a4b"][1]
    _check_hf_config("some/model", Gemma4TextConfig(**published))
    with pytest.raises(UnsupportedModelError) as refused:
        _check_hf_config("some/model", Gemma4TextConfig(**{**published, "num_hidden_layers": 8,
                                                            "layer_types": published["layer_types"][:8]}))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("some/model: Gemma 4 MoE layer_types "), message


def test_mamba_groups_tensor_parallelism_cannot_split_is_refused_in_one_line():
    """Falcon-H1's single Mamba group cannot be split over 2 tensor-parallel ranks (megatron-core asserts while
    building the model): refused at config time, by name."""
    from types import SimpleNamespace

    from bridge_sft.models import UnsupportedModelError, check_provider

    with pytest.raises(UnsupportedModelError) as refused:
        check_provider(SimpleNamespace(mamba_num_groups=1, tensor_model_parallel_size=2))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("model.tensor_model_parallel_size=2: ") and "1 group" in message
