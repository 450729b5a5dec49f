"""Probing trained models from tests: the token rows to compare on, HF logits, and a LoRA training run.

``train_probe.py`` (tests/drivers) trains through the CLI's code path and writes the trained Megatron
model's logits on ``probe_tokens``; the tests compare them with an exported HF model's ``hf_logits``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from launch import run_python

from bridge_sft.tiny import SAMPLE_DIALOGS

# Two short dialogs, longer than the tiny models' sliding window (16) once templated.
PROBE_CHATS = [
    [{"role": "user", "content": "Do you like books? Which ones, and why do you read them at night?"},
     {"role": "assistant", "content": "I love them, mostly novels: a story helps me sleep."}],
    [{"role": "user", "content": "What is AI? Explain it to me like I am five years old."},
     {"role": "assistant", "content": "Artificial brains that learn from many examples."}],
]


def probe_tokens(hf_dir, path: Path) -> list[list[int]]:
    """``PROBE_CHATS`` through ``hf_dir``'s chat template, cut to a common length; also written to ``path``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] for chat in PROBE_CHATS]
    n = min(map(len, ids))
    tokens = [row[:n] for row in ids]
    path.write_text(json.dumps(tokens))
    return tokens


def hf_logits(hf_dir, tokens) -> torch.Tensor:
    """fp32 logits ``[rows, len, vocab]`` of the HF model in ``hf_dir`` on ``tokens``."""
    from hf_reference import fix_hf_nemotron_h_torch_path
    from transformers import AutoModelForCausalLM

    fix_hf_nemotron_h_torch_path()  # HF's Nemotron-H torch path passes chunk states wrongly (hf_reference.py)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits


def train_lora_probe(hf_dir, tmp_path: Path, train_iters: int, save_hf: bool = False
                     ) -> tuple[dict, list[list[int]], Path]:
    """LoRA (dim 8, alpha 16) with the ``tiny`` recipe on 24 dialogs, seen again every iteration (a loss a LoRA
    on a random base can visibly lower in a few steps); checkpoint at the last iteration, with the HF adapter
    export (``checkpoints/iter_N/hf``) only if ``save_hf``.
    Returns ``train_probe.py``'s report, the probe tokens and the run's output folder."""
    out = tmp_path / "lora"
    out.mkdir()
    tokens = probe_tokens(hf_dir, tmp_path / "tokens.json")
    data = tmp_path / "few.jsonl"
    data.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(keepends=True)[:24]))
    run_python("train_probe.py", out, tmp_path / "tokens.json", "tiny", f"hf_path={hf_dir}", f"data={data}",
               f"output_dir={out}", "peft=lora", "lora_dim=8", "lora_alpha=16", f"train_iters={train_iters}",
               "log_interval=1", f"save_interval={train_iters}", f"save_hf={str(save_hf).lower()}")
    return json.loads((out / "probe.json").read_text()), tokens, out
