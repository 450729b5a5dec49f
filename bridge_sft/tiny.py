"""Tiny HF models and tokenizers, built locally with no downloads (tests, demo, notebooks).

``build_tiny_model(out_dir, arch="llama")`` writes a directory that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
and ``AutoBridge.from_hf_pretrained`` all accept: ``config.json``, random
weights in ``model.safetensors`` and a small byte-level BPE tokenizer trained
on the bundled ChatterBot dialogs, with a chat template in the style of the
architecture (Llama 3 headers for ``llama``, ChatML for ``qwen2``/``qwen3``).
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DIALOGS = Path(__file__).parent / "data" / "samples" / "chatterbot.jsonl"

# Llama 3 style: header tokens around the role, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML (Qwen2.5 style): <|im_start|>role\n ... <|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = {
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


@dataclass(frozen=True)
class TinySizes:
    """Shape of a tiny model; the defaults train in milliseconds per step on a CPU."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512  # tokenizer vocabulary, specials included
    max_position_embeddings: int = 2048


def _dialog_texts(path: Path = SAMPLE_DIALOGS) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                texts.append(message["content"])
    return texts


def build_tiny_tokenizer(style: str = "chatml", vocab_size: int = 512):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with a chat template.

    ``style`` is ``"llama"`` (Llama 3 headers, BOS ``<|begin_of_text|>``, turns end
    with ``<|eot_id|>``) or ``"chatml"`` (Qwen style, turns end with ``<|im_end|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in _SPECIALS:
        raise ValueError(f"style must be one of {sorted(_SPECIALS)}, not {style!r}")
    specials = _SPECIALS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_dialog_texts(), trainer=trainer)
    if style == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    sizes: TinySizes = TinySizes(),
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random-weight HF causal LM and its tokenizer to ``out_dir``; return the path.

    ``arch``: ``"llama"`` (LlamaForCausalLM), ``"qwen2"`` (Qwen2ForCausalLM, q/k/v
    biases) or ``"qwen3"`` (Qwen3ForCausalLM, q/k RMSNorm). Weights are fp32.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    configs = {"llama": (LlamaConfig, "llama"), "qwen2": (Qwen2Config, "chatml"), "qwen3": (Qwen3Config, "chatml")}
    if arch not in configs:
        raise ValueError(f"arch must be one of {sorted(configs)}, not {arch!r}")
    config_cls, style = configs[arch]
    tokenizer = build_tiny_tokenizer(style, sizes.vocab_size)
    extra = {"head_dim": sizes.hidden_size // sizes.num_attention_heads} if arch == "qwen3" else {}
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
