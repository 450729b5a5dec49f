"""Token-level training samples for the training-loop tests (real dialog text, tiny tokenizers)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bridge_sft.tiny import SAMPLE_DIALOGS

# One tool in OpenAI's format, for the encoding tests' tool-call conversations.
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}}]


def dialog_token_samples(
    tokenizer_dir: str | Path,
    count: int,
    seq_length: int,
    *,
    supervised: list[int] | None = None,
    seed: int = 0,
) -> list[dict]:
    """``count`` shifted samples of ``seq_length`` slots cut from the bundled dialogs.

    Each sample is ``{"tokens", "labels", "loss_mask"}`` (lists; ``labels`` = tokens
    shifted by one). ``supervised[i]`` (default: all ``seq_length``) is how many of
    sample ``i``'s leading positions have ``loss_mask=1``, so tests can build
    micro-batches with unequal (or zero) supervised-token counts.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    lines = SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()
    rng.shuffle(lines)
    stream: list[int] = []
    for line in lines:
        for message in json.loads(line)["messages"]:
            stream += tokenizer(message["content"])["input_ids"]
        if len(stream) > count * (seq_length + 1):
            break
    samples = []
    for i in range(count):
        ids = stream[i * (seq_length + 1) : (i + 1) * (seq_length + 1)]
        n = seq_length if supervised is None else supervised[i]
        samples.append({"tokens": ids[:-1], "labels": ids[1:], "loss_mask": [1] * n + [0] * (seq_length - n)})
    return samples
