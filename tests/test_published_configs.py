"""Tiny models built from the flagships' published configs (bridge_sft.published_configs) keep every
published field but the sizes; cheap (configs only, no weights)."""

from __future__ import annotations

import pytest
import transformers
from transformers import AutoConfig

from bridge_sft.published_configs import PUBLISHED, SIZE_FIELDS, TINY_SIZES, lost_fields, tiny_fields
from bridge_sft.tiny import TINY_ARCHS, build_tiny_tokenizer, published_tiny_config


def test_every_family_has_a_published_flagship():
    assert {family for family, _ in PUBLISHED.values()} == set(TINY_ARCHS)
    assert set(TINY_SIZES) == set(PUBLISHED)
    assert all(set(sizes) <= SIZE_FIELDS for sizes in TINY_SIZES.values())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_tiny_config_keeps_every_published_field(name, tmp_path):
    """The tiny config, saved and read back as config.json, carries every non-size published field."""
    family, fields = PUBLISHED[name]
    config = published_tiny_config(name, build_tiny_tokenizer(TINY_ARCHS[family][1]))
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is type(config)
    assert lost_fields(name, reloaded) == []
    assert reloaded.num_hidden_layers < fields["num_hidden_layers"] and reloaded.vocab_size <= 512


def test_lost_fields_sees_a_dropped_field():
    """The check itself: a tiny config built without a published field (Gemma 3 4B's linear RoPE scaling,
    its local RoPE base, Moonlight's routed scaling, Qwen3.5's layer pattern and value heads per key head) reports
    it."""
    family, fields = tiny_fields("gemma-3-4b")
    config = getattr(transformers, TINY_ARCHS[family][0])(**{**fields, "rope_scaling": None,
                                                             "rope_local_base_freq": 1e6})
    assert lost_fields("gemma-3-4b", config) == ["rope_local_base_freq", "rope_scaling"]
    family, fields = tiny_fields("moonlight-16b-a3b")
    config = getattr(transformers, TINY_ARCHS[family][0])(**{**fields, "routed_scaling_factor": 1.0})
    assert lost_fields("moonlight-16b-a3b", config) == ["routed_scaling_factor"]
    family, fields = tiny_fields("qwen3.5-27b")  # 1 attention layer in 2, 1 value head per key head
    config = getattr(transformers, TINY_ARCHS[family][0])(**{**fields, "full_attention_interval": 2,
                                                             "linear_num_value_heads": 4})
    assert lost_fields("qwen3.5-27b", config) == ["full_attention_interval",
                                                  "linear-attention value heads per key head"]

