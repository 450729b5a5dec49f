"""Dynamic padding without packing: each micro-batch padded to its longest sample (rounded up to a
multiple of 64) vs every sample padded to ``seq_length`` (bridge-sft's behaviour before, and Bridge's
``pad_to_max_length``), measured side by side in one run.

1. **Supervised tokens per processed slot** (``loss_mask = 1`` over all slots of the micro-batches)
   on real data: the bundled ChatterBot dialogs, their long-conversation version
   (``benchmarks/long_conversations.py``) and, without ``quick``, the full ChatterBot set, encoded
   with the real Qwen3 tokenizer and template at seq 2048, micro-batches of 1, 4 and 8 consecutive
   samples of a shuffled epoch (``SFTDataset``'s order and ``collate_fn``).
2. **Step time on the CPU tiny model** (``bridge_sft.tiny``: Llama, hidden 64, 2 layers; seq 256,
   bundled dialogs, unpacked, micro-batches of 4, 2 per step): one training process under Bridge's
   ``finetune()`` whose iterations alternate in pairs between the two paddings of the SAME global
   batch (``benchmarks.step_overhead``'s pairing: (dynamic, padded), (padded, dynamic), ...), with
   learning rate 0 so both iterations of a pair must report the same loss (checked). The ratio is the
   median over pairs of padded / dynamic iteration time (> 1: dynamic padding is faster).

``python benchmarks/dynamic_padding.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "chatterbot_messages.jsonl"
MULTIPLE = 64
DYNAMIC, PADDED = "dynamic (longest, multiple of 64)", "pad to seq_length"


# --------------------------------------------------------------------------- 1. useful tokens per slot


def slot_efficiency(data, seq_length: int, micro_batch: int, seed: int = 1234) -> dict:
    """Supervised tokens / slots of one shuffled epoch in micro-batches of ``micro_batch``, both paddings."""
    from bridge_sft.data.datasets import SFTDataset

    dataset = SFTDataset(data, np.arange(len(data)), seq_length, seed=seed, pad_to_multiple=MULTIPLE)
    order = dataset.order.permutation(0)
    lengths = np.asarray(data.lengths)[order] - 1
    supervised = int(sum(int(data.sample(int(i))[1][1:].sum()) for i in order))
    batches = [lengths[k: k + micro_batch] for k in range(0, len(lengths), micro_batch)]
    dynamic_slots = sum(len(b) * dataset.padded_length(int(b.max())) for b in batches)
    padded_slots = len(lengths) * seq_length
    return {"supervised_tokens": supervised, "slots_dynamic": dynamic_slots, "slots_padded": padded_slots,
            "efficiency_dynamic": supervised / dynamic_slots, "efficiency_padded": supervised / padded_slots,
            "gain": padded_slots / dynamic_slots}


def efficiency_rows(quick: bool, tmp: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from benchmarks.long_conversations import build
    from benchmarks.token_efficiency import qwen3_tokenizer_dir
    from bridge_sft.data.cache import EncodeOptions, prepare
    from bridge_sft.tiny import SAMPLE_DIALOGS

    tok_dir = qwen3_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    sets = {"chatterbot (bundled)": SAMPLE_DIALOGS}
    sets["long conversations (bundled)"] = build(SAMPLE_DIALOGS, tmp / "long.jsonl")
    if not quick and SHARED.exists():
        sets["chatterbot (full)"] = SHARED
    rows = []
    for name, path in sets.items():
        data = prepare(str(path), EncodeOptions(tokenizer_path=str(tok_dir), seq_length=2048), tokenizer=tokenizer,
                       progress=False)
        for mbs in (1, 4, 8):
            rows.append({"benchmark": "dynamic_padding", "data": name, "samples": len(data), "seq_length": 2048,
                         "micro_batch_size": mbs, **slot_efficiency(data, 2048, mbs)})
    return rows


# --------------------------------------------------------------------------- 2. step time


class Batches:
    """Data iterator wrapper: remembers each micro-batch's width; with ``pad_to``, pads the micro-batch to
    that many columns (pad id, ``loss_mask`` 0, positions continuing), as ``SFTDataset(pad_to_multiple=None)``
    would have built it."""

    def __init__(self, iterator, pad_to: int | None, pad_id: int):
        self.iterator, self.pad_to, self.pad_id, self.width = iterator, pad_to, pad_id, None

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        batch = dict(next(self.iterator))
        rows, width = batch["tokens"].shape
        if self.pad_to is not None:
            extra = self.pad_to - width
            for key, fill in (("tokens", self.pad_id), ("labels", self.pad_id), ("loss_mask", 0)):
                batch[key] = torch.cat([batch[key], torch.full((rows, extra), fill, dtype=batch[key].dtype)], dim=1)
            batch["position_ids"] = torch.arange(self.pad_to).expand(rows, self.pad_to).clone()
        self.width = int(batch["tokens"].shape[1])
        return batch


def _worker(spec_path: str) -> None:
    """One training process of interleaved iterations; writes the records to spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    from benchmarks.step_overhead import OURS, _iteration_recorder_class, kind_of_iteration, paired_provider
    from bridge_sft import train
    from bridge_sft.recipes import tiny
    from bridge_sft.step import forward_step

    config = tiny(
        spec["hf_path"], output_dir=spec["output_dir"], seq_length=256, packing=False, padding="longest",
        micro_batch_size=4, global_batch_size=8, train_iters=spec["iters"], lr=0.0, min_lr=0.0, warmup_iters=0,
        eval_interval=None, eval_iters=0, save_interval=None, save_hf=False, validation_fraction=0.0,
        log_interval=spec["iters"],
    )
    config.checkpoint.save = config.checkpoint.load = config.logger.tensorboard_dir = None
    config.dataset = paired_provider(config.dataset, config.train.global_batch_size)
    widths: dict[int, list[int]] = {}

    def step(state, data_iterator, model, return_schedule_plan=False):
        iteration = state.train_state.step
        padded = kind_of_iteration(iteration) != OURS  # the padded iteration of the pair
        batches = Batches(data_iterator, 256 if padded else None, spec["pad_id"])
        out = forward_step(state, batches, model, return_schedule_plan)
        widths.setdefault(iteration, []).append(batches.width)
        return out

    recorder = _iteration_recorder_class()()
    totals = train.run(config, device="cpu", callbacks=[recorder], forward_step_func=step)
    for record in recorder.records:  # kind: step_overhead's OURS = dynamic, BRIDGE = padded
        record["slots"] = 4 * sum(widths[record["iteration"]])
    Path(spec["out"]).write_text(json.dumps({"records": recorder.records, "totals": totals}))


def step_time_rows(quick: bool, tmp: Path, warmup: int = 4) -> list[dict]:
    from transformers import AutoTokenizer

    from benchmarks.step_overhead import OURS, _quantiles, median_ci95, pair_ratios
    from bridge_sft.tiny import build_tiny_model

    iters = 40 if quick else 80
    hf_path = build_tiny_model(tmp / "tiny-llama", arch="llama")
    pad_id = AutoTokenizer.from_pretrained(str(hf_path)).pad_token_id or 0
    spec = {"hf_path": str(hf_path), "output_dir": str(tmp / "run"), "iters": iters, "out": str(tmp / "steps.json"),
            "pad_id": int(pad_id)}
    common.run_worker(__file__, spec, tmp / "spec.json", "dynamic_padding worker")
    records = json.loads(Path(spec["out"]).read_text())["records"]
    for record in records:
        record["kind"] = DYNAMIC if record["kind"] == OURS else PADDED
    ratios = [1.0 / r for r in pair_ratios(records, warmup, ours=DYNAMIC, baseline=PADDED)]  # padded / dynamic
    losses = {r["iteration"]: r["loss"] for r in records}
    loss_diffs = [abs(losses[i] - losses[i + 1]) / abs(losses[i]) for i in range(0, max(losses), 2) if i + 1 in losses]
    timed = [r for r in records if r["iteration"] >= warmup]
    slots = {k: sum(r["slots"] for r in timed if r["kind"] == k) for k in (DYNAMIC, PADDED)}
    p25, median, p75 = _quantiles(ratios)
    low, high = median_ci95(ratios)
    return [{
        "benchmark": "dynamic_padding", "summary": True, "model": "tiny llama (hidden 64, 2 layers), CPU",
        "seq_length": 256, "micro_batch_size": 4, "global_batch_size": 8, "pairs": len(ratios),
        "dynamic_ms": 1e3 * statistics.median(r["seconds"] for r in timed if r["kind"] == DYNAMIC),
        "padded_ms": 1e3 * statistics.median(r["seconds"] for r in timed if r["kind"] == PADDED),
        "speedup (padded/dynamic)": median, "ratio_ci95_low": low, "ratio_ci95_high": high,
        "ratio_p25": p25, "ratio_p75": p75, "slots_dynamic": slots[DYNAMIC], "slots_padded": slots[PADDED],
        "max_pair_loss_rel_diff": max(loss_diffs, default=float("nan")),
    }]


def run(quick: bool = False) -> list[dict]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-dynpad-") as tmp:
        return efficiency_rows(quick, Path(tmp)) + step_time_rows(quick, Path(tmp))


def markdown(rows: list[dict]) -> str:
    lines = common.table_lines(
        ["data", "seq", "micro-batch", "supervised / slot, padded", "supervised / slot, dynamic", "gain"],
        ([r["data"], r["seq_length"], r["micro_batch_size"], f"{r['efficiency_padded']:.4f}",
          f"{r['efficiency_dynamic']:.4f}", f"{r['gain']:.2f}x"] for r in rows if "gain" in r))
    for r in rows:
        if r.get("summary"):
            lines.append(
                f"\nStep time, {r['model']}, seq {r['seq_length']}, micro-batches of {r['micro_batch_size']}: "
                f"padded {r['padded_ms']:.1f} ms vs dynamic {r['dynamic_ms']:.1f} ms per iteration; padded / dynamic "
                f"{r['speedup (padded/dynamic)']:.3f} over {r['pairs']} interleaved pairs (95% CI of the median "
                f"{r['ratio_ci95_low']:.3f}-{r['ratio_ci95_high']:.3f}); slots {r['slots_padded']:,} vs "
                f"{r['slots_dynamic']:,}; max pair loss difference {r['max_pair_loss_rel_diff']:.2e} (lr 0: "
                "the same batch must give the same loss).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, markdown, quick_help="bundled data only, 40 iterations", worker=_worker, argv=argv)


if __name__ == "__main__":
    main()
