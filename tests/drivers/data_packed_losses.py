"""Driver: per-sample, per-token losses of a tiny model over chat data through Bridge's real
``finetune()`` and ``bridge_sft.step.forward_step``, with ``SFTDatasetProvider`` packed or not.

Usage: ``data_packed_losses.py SPEC.json`` (alone, or under torchrun). SPEC keys: ``hf`` (tiny HF
model dir, also the tokenizer), ``data`` (.jsonl), ``seq_length``, ``packed`` (bool), ``tp``,
``cache_dir``, ``out``.

The learning rate is 0, so every micro-batch sees the same weights; each item (sample or
pack) is one micro-batch, in the dataset's order. Rank 0 writes ``out``: ``{"samples":
{origin: {"loss": [per-token loss of each real position], "mask": [...]}}, "pack_sizes": [...],
"crosstalk": {origin: [...]}}``; ``crosstalk`` (packed runs) holds the same pack's losses from
an extra forward pass WITHOUT ``cu_seqlens`` (causal attention across the whole pack), to show
the comparison would catch cross-sample attention.
"""

import json
import os
import sys

import torch
from _common import Tee

from bridge_sft.data.datasets import PackedSFTDataset
from bridge_sft.data.provider import SFTDatasetProvider
from bridge_sft.recipes import sft
from bridge_sft.step import forward_step
from bridge_sft.train import run

BUILT = {}


class RecordingProvider(SFTDatasetProvider):
    def build_datasets(self, context):
        datasets = super().build_datasets(context)
        BUILT["train"] = datasets[0]
        return datasets


def main(spec_path):
    spec = json.load(open(spec_path))
    provider = RecordingProvider(
        data_path=spec["data"], tokenizer_path=spec["hf"], seq_length=spec["seq_length"], packing=spec["packed"],
        train_on="assistant", pad_seq_to_mult=1, cache_dir=spec["cache_dir"], seed=7,
    )
    data = provider.prepare(provider.data_path)
    if spec["packed"]:
        from bridge_sft.data.datasets import plan_packs

        items = len(plan_packs(data, torch.arange(len(data)).numpy(), spec["seq_length"]))
    else:
        items = len(data)
    micro_batches = []

    def recording_step(state, data_iterator, model, return_schedule_plan=False):
        tee = Tee(data_iterator)
        output, loss_func = forward_step(state, tee, model)
        entry = {"loss": output.detach().float().cpu().reshape(-1).clone()}
        batch = tee.last
        if batch is not None and "cu_seqlens_q" in batch:
            with torch.no_grad():  # the same pack, attention across samples (no cu_seqlens)
                tokens = batch["tokens"].reshape(1, -1).to(output.device)
                labels = batch["labels"].reshape(1, -1).to(output.device)
                positions = batch["position_ids"].reshape(1, -1).to(output.device)
                entry["crosstalk"] = model(input_ids=tokens, position_ids=positions, attention_mask=None,
                                           labels=labels).detach().float().cpu().reshape(-1)
        micro_batches.append(entry)
        return output, loss_func

    config = sft(
        spec["hf"], dataset=provider, output_dir=spec["out"] + ".run", seq_length=spec["seq_length"],
        tensor_parallel=spec.get("tp", 1), micro_batch_size=1, global_batch_size=1, train_iters=items,
        lr=0.0, min_lr=0.0, warmup_iters=0, weight_decay=0.0, precision="fp32", distributed_optimizer=False,
        eval_interval=None, eval_iters=0, save_interval=None, log_interval=1,
    )
    config.scheduler.lr_decay_style = "constant"
    config.checkpoint.save = None
    run(config, forward_step_func=recording_step)

    if int(os.environ.get("RANK", "0")) != 0:
        return
    dataset = BUILT["train"]
    assert len(dataset) == items == len(micro_batches), (len(dataset), items, len(micro_batches))
    result = {"samples": {}, "crosstalk": {}, "pack_sizes": []}
    for k, entry in enumerate(micro_batches):
        item = dataset.order(k)
        if isinstance(dataset, PackedSFTDataset):
            members = dataset.indices[dataset.plan.pack(item)].tolist()
            result["pack_sizes"].append(len(members))
        else:
            members = [int(dataset.indices[item])]
        start = 0
        for sample in members:
            ids, mask = data.sample(sample)
            n = len(ids) - 1
            origin = data.origin(sample)
            result["samples"][origin] = {"loss": entry["loss"][start:start + n].tolist(),
                                         "mask": mask[1:].astype(int).tolist()}
            if "crosstalk" in entry:
                result["crosstalk"][origin] = entry["crosstalk"][start:start + n].tolist()
            start += n
    json.dump(result, open(spec["out"], "w"))


if __name__ == "__main__":
    main(sys.argv[1])
