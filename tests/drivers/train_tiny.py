"""Driver: fine-tune a tiny HF model with Bridge's real ``finetune()`` on explicit token data.

Usage: ``train_tiny.py SPEC.json`` (alone, or under torchrun). SPEC keys:

- ``hf``: tiny HF model dir; ``out``: where rank 0 writes the result JSON
- ``samples``: list of ``{"tokens": [...], "labels": [...], "loss_mask": [...]}``
  (already shifted, all of length ``seq_length``); sample ``i`` of the run is
  ``samples[i % len(samples)]`` (Bridge's sequential "single" sampler)
- ``seq_length``, ``tp``, ``mbs``, ``gbs``, ``iters``, ``lr``, ``optimizer`` ("adam"|"sgd"),
  ``per_token`` (calculate_per_token_loss), ``clip_grad``, ``eval_interval``, ``eval_iters``,
  ``output_dir``, ``save_interval``, ``exit_interval``, ``weights`` (path: rank 0 saves the
  model's state dict after training), ``record`` (keep every micro-batch's per-token losses),
  ``hf_labels`` (the dataset marks unsupervised positions with label -100 and sends no
  loss_mask), ``manual`` (also compute each micro-batch's loss the "manual" way: logits,
  shift, ``F.cross_entropy(reduction="none")``, mask, sum and count; TP=1 only),
  ``finite`` (the dataset has only ``len(samples)`` samples instead of what Bridge asks for),
  ``weights_before`` (path: rank 0 saves the state dict before the first step)

Result JSON: ``losses`` ({iteration: lm loss}), ``val_losses``, ``micro_batches``
(per micro-batch ``loss_sum``, ``num_tokens`` and, with ``record``, ``per_token``),
``first_iteration``, ``world_size``.
"""

import atexit
import json
import os
import sys
from dataclasses import dataclass

import torch
from _common import Tee

from bridge_sft.recipes import sft
from bridge_sft.step import forward_step
from bridge_sft.train import run

from megatron.bridge.data.base import DatasetProvider  # noqa: E402  (after bridge_sft: CPU runtime)
from megatron.bridge.training.callbacks import Callback  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples, length, hf_labels):
        self.samples, self.length, self.hf_labels = samples, length, hf_labels

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        s = self.samples[i % len(self.samples)]
        tokens = torch.tensor(s["tokens"], dtype=torch.long)
        labels = torch.tensor(s["labels"], dtype=torch.long)
        loss_mask = torch.tensor(s["loss_mask"], dtype=torch.float32)
        if self.hf_labels:
            return {"tokens": tokens, "labels": labels.masked_fill(loss_mask == 0, -100)}
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


@dataclass(kw_only=True)
class ListProvider(DatasetProvider):
    samples: list
    seq_length: int
    hf_labels: bool = False
    finite: bool = False

    def build_datasets(self, context):
        def dataset(n):
            n = len(self.samples) if self.finite else n
            return ListDataset(self.samples, n, self.hf_labels) if n else None

        return dataset(context.train_samples), dataset(context.valid_samples), None


def manual_loss(model, batch):
    """The pre-bridge-sft loss path: full logits, shift, cross-entropy per token, mask, sum and count."""
    tokens, labels = batch["tokens"], batch["labels"]
    loss_mask = batch["loss_mask"] if "loss_mask" in batch else (labels != -100).float()
    input_ids = torch.cat([tokens, labels[:, -1:].clamp(min=0)], dim=1)  # the unshifted sequence
    positions = torch.arange(input_ids.size(1)).expand_as(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=None)  # [b, s+1, V]
    shift_logits = logits[:, :-1, :].contiguous()
    shift_labels = labels.clamp(min=0).contiguous()  # == input_ids[:, 1:] where supervised
    per_token = torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)).float(), shift_labels.view(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).float()
    return float((per_token * mask).sum()), int(mask.sum())


def save_weights(context, path):
    if path and torch.distributed.get_rank() == 0:
        model = context.model[0]
        while hasattr(model, "module"):
            model = model.module
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, path)


class Recorder(Callback):
    def __init__(self, result, spec):
        self.result, self.spec = result, spec

    def on_train_start(self, context):
        save_weights(context, self.spec.get("weights_before"))

    def on_train_step_end(self, context):
        iteration = context.state.train_state.step + 1  # the step counter advances after this event
        self.result["losses"][iteration] = float(context.loss_dict["lm loss"])
        self.result.setdefault("first_iteration", iteration)

    def on_eval_end(self, context):
        self.result["val_losses"][context.state.train_state.step] = float(context.total_loss_dict["lm loss"])

    def on_train_end(self, context):
        save_weights(context, self.spec.get("weights"))


def main(spec_path):
    spec = json.load(open(spec_path))
    result = {"losses": {}, "val_losses": {}, "micro_batches": []}

    def recording_forward_step(state, data_iterator, model, return_schedule_plan=False):
        tee = Tee(data_iterator)
        output, loss_func = forward_step(state, tee, model)
        entry = {"training": model.training}
        if spec.get("manual"):
            entry["manual_loss_sum"], entry["manual_num_tokens"] = manual_loss(model, tee.last)

        def recorded_loss(output_tensor):
            loss_sum, num_tokens, report = loss_func(output_tensor)
            entry.update(loss_sum=float(loss_sum), num_tokens=int(num_tokens))
            if spec.get("record"):
                entry["per_token"] = output_tensor.detach().float().tolist()
            result["micro_batches"].append(entry)
            return loss_sum, num_tokens, report

        return output, recorded_loss

    config = sft(
        spec["hf"],
        dataset=ListProvider(samples=spec["samples"], seq_length=spec["seq_length"],
                             hf_labels=spec.get("hf_labels", False), finite=spec.get("finite", False),
                             dataloader_type="single", num_workers=0),
        output_dir=spec.get("output_dir", spec["out"] + ".run"),
        seq_length=spec["seq_length"],
        tensor_parallel=spec.get("tp", 1),
        micro_batch_size=spec.get("mbs", 1),
        global_batch_size=spec.get("gbs", 4),
        train_iters=spec.get("iters", 3),
        lr=spec.get("lr", 1e-3),
        min_lr=spec.get("lr", 1e-3),
        warmup_iters=0,
        weight_decay=0.0,
        clip_grad=spec.get("clip_grad", 1.0),
        precision="fp32",
        distributed_optimizer=False,
        eval_interval=spec.get("eval_interval"),
        eval_iters=spec.get("eval_iters", 0),
        save_interval=spec.get("save_interval"),
        log_interval=1,
    )
    config.optimizer.optimizer = spec.get("optimizer", "adam")
    config.optimizer.sgd_momentum = 0.0
    config.scheduler.lr_decay_style = "constant"
    if not spec.get("save_interval"):
        config.checkpoint.save = None
    config.train.exit_interval = spec.get("exit_interval")
    if not spec.get("per_token", True):
        config.model.calculate_per_token_loss = False
    if int(os.environ.get("RANK", "0")) == 0:
        # atexit: with train.exit_interval Bridge leaves through sys.exit() after its checkpoint.
        result["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        atexit.register(lambda: json.dump(result, open(spec["out"], "w")))
    run(config, callbacks=[Recorder(result, spec)], forward_step_func=recording_forward_step)


if __name__ == "__main__":
    main(sys.argv[1])
