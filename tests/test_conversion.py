"""HF <-> Megatron conversion through AutoBridge on the CPU runtime (megatron-core's TE layer spec)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch import REPO, run_python

from bridge_sft.tiny import TINY_ARCHS


def test_hf_megatron_hf_round_trip_is_bit_exact_for_every_family(tiny_models, tmp_path):
    dirs = [tiny_models[arch] for arch in TINY_ARCHS]
    out = run_python("roundtrip.py", tmp_path, *dirs, timeout=1500).stdout
    verdicts = json.loads(out.split("ROUNDTRIP ", 1)[1].splitlines()[0])
    assert set(verdicts) == {d.name for d in dirs}
    for name, verdict in verdicts.items():
        assert verdict["same_names"], name
        assert len(verdict["bit_exact"]) == verdict["tensors"] > 10, (name, verdict)


def test_multimodal_gemma3_to_text_only_keeps_the_language_model(tmp_path):
    """`bridge-sft convert text-only` on a (tiny, random) Gemma3ForConditionalGeneration: the written
    Gemma3ForCausalLM gives the multimodal model's text-only logits, and the train command accepts it
    where it refuses the multimodal checkpoint with the conversion command in its one-line error."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

    from bridge_sft.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("gemma")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer) + 8, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    multimodal = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                             mm_tokens_per_image=4, image_token_index=len(tokenizer)))
    src = tmp_path / "gemma3-mm"
    multimodal.save_pretrained(src)
    tokenizer.save_pretrained(src)

    out = tmp_path / "gemma3-text"
    proc = subprocess.run([sys.executable, "-m", "bridge_sft.cli", "convert", "text-only", str(src), str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted).__name__ == "Gemma3ForCausalLM"
    ids = torch.tensor([tokenizer.encode("Hello there, how are you doing on this fine day?")])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, multimodal.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)

    from bridge_sft.recipes.resolve import ConfigError, check_hf_checkpoint

    check_hf_checkpoint(str(out))
    with pytest.raises(ConfigError, match=r"convert text-only .*gemma3-mm DIR"):
        check_hf_checkpoint(str(src))
