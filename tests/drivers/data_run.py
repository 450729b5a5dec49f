"""Driver: a training run configured exactly as on the command line (``bridge-sft train RECIPE_OR_YAML
key=value ...`` through ``bridge_sft.recipes.resolve.build_config``), under Bridge's real ``finetune()``
and ``bridge_sft.step.forward_step``, recording what the data pipeline fed it.

Usage: ``data_run.py SPEC.json`` (alone, or under torchrun). SPEC keys: ``recipe`` (name or YAML path),
``args`` (``key=value`` strings), ``out`` (rank r writes ``OUT.r.json``), ``hash_items`` (how many items of
the built training dataset to fingerprint; default: all that the run consumes at most).

Result per rank: ``losses`` ({iteration: lm loss}, last pipeline stage), ``evals`` (per evaluation:
``step``, ``bridge`` = Bridge's reduced ``total_loss_dict`` as floats, ``rows`` = per row of each eval
micro-batch ``[source the row's data comes from (found by content), source_id in the batch, loss sum,
supervised tokens]``), ``train_rows`` (fingerprint of every training row consumed, in order),
``widths`` (columns of every training micro-batch), ``items`` (fingerprints of the training dataset's
items, in order), ``totals`` (``run()``'s token totals), ``first_iteration``.
"""

import atexit
import hashlib
import json
import os
import sys

import numpy as np
import torch
from _common import Tee

from bridge_sft.data.mixing import SOURCE_ID
from bridge_sft.data.provider import SFTDatasetProvider
from bridge_sft.recipes.resolve import build_config
from bridge_sft.step import forward_step
from bridge_sft.train import run

from megatron.bridge.training.callbacks import Callback  # noqa: E402  (after bridge_sft: CPU runtime)

BUILT = {}


def fingerprint(tokens: torch.Tensor, loss_mask: torch.Tensor) -> str:
    """Content of a row without its padding: tokens and mask up to the last supervised position."""
    n = int(torch.nonzero(loss_mask).max()) + 1 if loss_mask.any() else 0
    data = np.asarray(tokens[:n].tolist(), dtype=np.int64).tobytes() + np.asarray(loss_mask[:n].tolist()).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def sample_owner(provider) -> dict:
    """First-sample fingerprint -> source name, for every sample of every source (validation files included)."""
    owner = {}
    for spec in provider.sources():
        for paths in [spec.paths] + ([spec.validation] if spec.validation else []):
            data = provider.prepare(list(paths), spec)
            for i in range(len(data)):
                ids, mask = data.sample(i)
                owner[bytes(np.asarray(ids[:-1], dtype=np.int64).tobytes()[:64])] = spec.name
    return owner


def main(spec_path):
    spec = json.load(open(spec_path))
    rank = int(os.environ.get("RANK", "0"))
    result = {"losses": {}, "evals": [], "train_rows": [], "widths": [], "items": []}
    pending = []

    original = SFTDatasetProvider.build_datasets

    def build_and_keep(self, context):
        datasets = original(self, context)
        BUILT["train"] = datasets[0]
        return datasets

    SFTDatasetProvider.build_datasets = build_and_keep
    config = build_config(spec["recipe"], spec["args"])
    provider = config.dataset
    owner = sample_owner(provider)

    def recording_step(state, data_iterator, model, return_schedule_plan=False):
        tee = Tee(data_iterator)
        output, loss_func = forward_step(state, tee, model)
        batch = tee.last
        if batch is None:  # a middle pipeline stage
            return output, loss_func
        if model.training:
            result["widths"].append(int(batch["tokens"].shape[-1]))
            result["train_rows"] += [fingerprint(t, m) for t, m in zip(batch["tokens"], batch["loss_mask"])]
            return output, loss_func

        def recorded(output_tensor):
            out = loss_func(output_tensor)
            per_token = output_tensor.detach().float().view(batch["loss_mask"].shape) * batch["loss_mask"]
            for r in range(per_token.shape[0]):
                first = bytes(np.asarray(batch["tokens"][r].tolist(), dtype=np.int64).tobytes()[:64])
                source_id = int(batch[SOURCE_ID][r]) if SOURCE_ID in batch else None
                pending.append([owner.get(first), source_id, float(per_token[r].sum()),
                                float(batch["loss_mask"][r].sum())])
            return out

        return output, recorded

    class Recorder(Callback):
        def on_train_step_end(self, context):
            iteration = context.state.train_state.step + 1
            if context.loss_dict and "lm loss" in context.loss_dict:
                result["losses"][iteration] = float(context.loss_dict["lm loss"])
            result.setdefault("first_iteration", iteration)

        def on_eval_end(self, context):
            bridge = {k: float(v) for k, v in (context.total_loss_dict or {}).items()}
            result["evals"].append({"step": context.state.train_state.step, "bridge": bridge, "rows": list(pending)})
            pending.clear()

    def write():
        dataset = BUILT.get("train")
        if dataset is not None:
            n = min(len(dataset), spec.get("hash_items", len(dataset)))
            result["items"] = [fingerprint(dataset[k]["tokens"], dataset[k]["loss_mask"]) for k in range(n)]
        json.dump(result, open(f"{spec['out']}.{rank}.json", "w"))

    atexit.register(write)  # also when Bridge leaves through sys.exit() at train.exit_interval
    result["totals"] = run(config, callbacks=[Recorder()], forward_step_func=recording_step)


if __name__ == "__main__":
    main(sys.argv[1])
