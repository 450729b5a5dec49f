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


# multimodal architecture -> (its config class, the tiny text family whose layout its text_config takes, the
# tokenizer style, its tiny vision tower, extra multimodal-config fields). Token ids past the text vocabulary. The
# dense Qwen3.5 ties its output layer through the multimodal config only (its text_config says untied), as the
# conversion must carry over.
_MULTIMODAL = {
    "Gemma3ForConditionalGeneration": ("Gemma3Config", "gemma3", "gemma", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        dict(mm_tokens_per_image=4)),
    "Gemma4ForConditionalGeneration": ("Gemma4Config", "gemma4", "gemma4", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, position_embedding_size=64), {}),
    # text_config as published (Qwen3.5-9B): interleaved M-RoPE over the rotated quarter of each head (4
    # frequencies here: head_dim 32 x 0.25 / 2), and a multi-token-prediction layer the conversion drops
    "Qwen3_5ForConditionalGeneration": ("Qwen3_5Config", "qwen3_5", "qwen3_5", dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, out_hidden_size=64,
        num_position_embeddings=16), dict(tie_word_embeddings=True)),
    "Qwen3_5MoeForConditionalGeneration": ("Qwen3_5MoeConfig", "qwen3_5_moe", "qwen3_5", dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, out_hidden_size=64,
        num_position_embeddings=16), {}),
}


def _tiny_multimodal(architecture: str, out):
    """A random fp32 multimodal model of ``architecture`` (its text_config: the tiny family's layout), saved to
    ``out`` with its tokenizer (and, for Qwen3.5, a published-style ``mtp.*`` tensor); returns (model, tokenizer)."""
    import safetensors.torch
    import torch
    import transformers

    from bridge_sft.tiny import TINY_ARCHS, TinySizes, _randomise_constant_inits, build_tiny_tokenizer

    config_class, family, style, vision, extra = _MULTIMODAL[architecture]
    tokenizer = build_tiny_tokenizer(style)
    vocab = len(tokenizer) + 128  # room for the image/video/audio tokens; a multiple of 128, as Bridge's Gemma 4 needs
    text = {**TINY_ARCHS[family][2](TinySizes()), "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gemma4":
        text["vocab_size_per_layer_input"] = vocab
    if family.startswith("qwen3_5"):
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 1, 1], "mrope_interleaved": True}
        text["mtp_num_hidden_layers"] = 1
        extra = {**extra, "vision_start_token_id": len(tokenizer), "vision_end_token_id": len(tokenizer) + 1,
                 "video_token_id": len(tokenizer) + 3}
    token_field = "image_token_index" if family == "gemma3" else "image_token_id"
    config = getattr(transformers, config_class)(text_config=text, vision_config=vision,
                                                 **{token_field: len(tokenizer) + 2}, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    _randomise_constant_inits(model, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if family.startswith("qwen3_5"):
        weights = safetensors.torch.load_file(out / "model.safetensors")
        weights["mtp.fc.weight"] = torch.randn(64, 128)
        safetensors.torch.save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return model, tokenizer


@pytest.mark.parametrize("architecture", list(_MULTIMODAL))
def test_multimodal_to_text_only_keeps_the_language_model(architecture, tmp_path):
    """`bridge-sft convert text-only` on a (tiny, random) multimodal checkpoint: the written causal LM gives the
    multimodal model's text-only logits (Qwen3.5: with the multimodal model's own 3-row M-RoPE positions), Qwen3.5's
    MTP head is left out of weights and config, and the train command accepts the conversion where it refuses
    the multimodal checkpoint with the conversion command in its one-line error."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bridge_sft.cli import main as cli
    from bridge_sft.multimodal import TEXT_ONLY_ARCHITECTURES
    from bridge_sft.recipes.resolve import ConfigError, check_hf_checkpoint

    src, out = tmp_path / "multimodal", tmp_path / "text"
    multimodal, tokenizer = _tiny_multimodal(architecture, src)
    assert cli(["convert", "text-only", str(src), str(out)]) == 0
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted).__name__ == TEXT_ONLY_ARCHITECTURES[architecture]
    assert converted.config.tie_word_embeddings == multimodal.config.tie_word_embeddings
    assert "mtp_num_hidden_layers" not in json.loads((out / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template is not None
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if not k.startswith(("model.", "lm_head."))]

    ids = torch.tensor([tokenizer.encode("Hello there, how are you doing on this fine day? " * 3)])
    inputs = {"input_ids": ids}
    if hasattr(multimodal.model, "get_rope_index"):  # the positions the processor's mm_token_type_ids give text
        positions, _ = multimodal.model.get_rope_index(ids, mm_token_type_ids=torch.zeros_like(ids))
        assert positions.shape == (3, *ids.shape)
        inputs["position_ids"] = positions
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, multimodal(**inputs).logits, rtol=0, atol=1e-5)

    check_hf_checkpoint(str(out))
    if architecture.startswith("Qwen3_5"):
        from bridge_sft.models import UnsupportedModelError, megatron_provider

        assert not megatron_provider(str(out)).mtp_num_layers  # Bridge builds no MTP layer
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
        with pytest.raises(UnsupportedModelError, match=r"^[^\n]*no mtp.\* weights.*remove mtp_num_hidden_layers"):
            megatron_provider(str(out))  # else Bridge would build it, randomly initialised
    with pytest.raises(ConfigError, match=rf"^[^\n]*{architecture}.*convert text-only .*multimodal DIR[^\n]*$"):
        check_hf_checkpoint(str(src))
