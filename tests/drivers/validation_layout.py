"""Driver: what one evaluation of a full-pass validation split covers (no training); JSON to OUT.

Usage: ``validation_layout.py HF_DIR DATA.jsonl OUT.json CACHE_DIR``. For a packed, an unpacked and a
two-source packed provider (``validation_samples=7`` of each source), with ``eval_pass_items`` as
``bridge_sft.train.plan_full_validation`` sets it for a global batch of 4: per pass (3 passes) the supervised
tokens and the held-out samples the items hold, and, for the mixture, the supervised tokens per source; and
what the held-out split holds (``expected``), computed from the prepared arrays.
"""

import json
import sys

import numpy as np

from bridge_sft.data.mixing import supervised_per_sample
from bridge_sft.data.provider import SFTDatasetProvider

from megatron.bridge.data.base import DatasetBuildContext  # noqa: E402

PASSES, BATCH = 3, 4


def sample_key(data, i):
    """A held-out sample, identified by its content (ids without the first, as the items hold them)."""
    ids, _ = data.sample(int(i))
    return tuple(int(t) for t in ids[1:])


def item_samples(item):
    """The samples an item holds (by content: labels per segment), ignoring padding segments."""
    labels, padding = item["labels"].tolist(), item["padding_mask"].tolist()
    bounds = item["cu_seqlens_q"].tolist() if "cu_seqlens_q" in item else [0, len(labels)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        real = [t for t, p in zip(labels[a:b], padding[a:b]) if not p]
        if real:
            out.append(tuple(real))
    return out


def main(hf, data, out, cache):
    facts = {}
    variants = {"packed": dict(data_path=data, packing=True), "unpacked": dict(data_path=data, packing=False),
                "mixture": dict(data_path=[f"{data}:0.7", f"{data}:0.3"], packing=True)}
    for name, kwargs in variants.items():
        provider = SFTDatasetProvider(tokenizer_path=hf, seq_length=128, validation_samples=7, cache_dir=cache,
                                      **kwargs)
        items = provider.held_out_items("validation")
        provider.eval_pass_items = -(-items // BATCH) * BATCH
        specs = provider.sources()
        parts = provider._mixture_splits(specs)["validation"] if len(specs) > 1 else \
            [provider._single_splits(specs[0])["validation"]]
        expected_tokens = [int(supervised_per_sample(d)[idx].sum()) for d, idx in parts]
        expected_samples = sorted(sample_key(d, i) for d, idx in parts for i in idx)
        _, valid, _ = provider.build_datasets(DatasetBuildContext(
            train_samples=8, valid_samples=PASSES * provider.eval_pass_items, test_samples=0))
        passes = []
        for p in range(PASSES):
            batch = [valid[i] for i in range(p * provider.eval_pass_items, (p + 1) * provider.eval_pass_items)]
            per_source = np.zeros(len(parts), dtype=np.int64)
            samples = []
            for item in batch:
                per_source[int(item.get("source_id", 0))] += int(item["loss_mask"].sum())
                if item["loss_mask"].sum() > 0:
                    samples += item_samples(item)
            passes.append({"tokens": per_source.tolist(), "samples_match": sorted(samples) == expected_samples})
        facts[name] = {"items": items, "pass_items": provider.eval_pass_items, "len": len(valid),
                       "held_out": len(expected_samples), "expected_tokens": expected_tokens, "passes": passes}
    json.dump(facts, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
