"""Driver: fine-tune a tiny HF model with Bridge's real ``finetune()`` on explicit token data.

Usage: ``train_tiny.py SPEC.json`` (alone, or under torchrun). SPEC keys:

- ``hf``: tiny HF model dir; ``out``: where rank 0 writes the result JSON
- ``samples``: list of ``{"tokens": [...], "labels": [...], "loss_mask": [...]}``
  (already shifted, all of length ``seq_length``); sample ``i`` of the run is
  ``samples[i % len(samples)]`` (Bridge's sequential "single" sampler)
- ``seq_length``, ``tp``, ``mbs``, ``gbs``, ``iters``, ``lr``, ``optimizer`` ("adam"|"sgd"),
  ``per_token`` (calculate_per_token_loss), ``clip_grad``, ``eval_interval``, ``eval_iters``,
  ``output_dir``, ``save_interval``, ``exit_interval``, ``weights`` (path: rank 0 saves the
  model's state dict after training), ``record`` (keep every micro-batch's per-token losses)

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

from bridge_sft.recipes import sft
from bridge_sft.step import forward_step
from bridge_sft.train import run

from megatron.bridge.data.base import DatasetProvider  # noqa: E402  (after bridge_sft: CPU runtime)
from megatron.bridge.training.callbacks import Callback  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples, length):
        self.samples, self.length = samples, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        s = self.samples[i % len(self.samples)]
        return {
            "tokens": torch.tensor(s["tokens"], dtype=torch.long),
            "labels": torch.tensor(s["labels"], dtype=torch.long),
            "loss_mask": torch.tensor(s["loss_mask"], dtype=torch.float32),
        }


@dataclass(kw_only=True)
class ListProvider(DatasetProvider):
    samples: list
    seq_length: int

    def build_datasets(self, context):
        valid = ListDataset(self.samples, context.valid_samples) if context.valid_samples else None
        return ListDataset(self.samples, context.train_samples), valid, None


class Recorder(Callback):
    def __init__(self, result, weights_path):
        self.result, self.weights_path = result, weights_path

    def on_train_step_end(self, context):
        iteration = context.state.train_state.step + 1  # the step counter advances after this event
        self.result["losses"][iteration] = float(context.loss_dict["lm loss"])
        self.result.setdefault("first_iteration", iteration)

    def on_eval_end(self, context):
        self.result["val_losses"][context.state.train_state.step] = float(context.total_loss_dict["lm loss"])

    def on_train_end(self, context):
        if self.weights_path and torch.distributed.get_rank() == 0:
            model = context.model[0]
            while hasattr(model, "module"):
                model = model.module
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if v is not None
                        and isinstance(v, torch.Tensor)}, self.weights_path)


def main(spec_path):
    spec = json.load(open(spec_path))
    result = {"losses": {}, "val_losses": {}, "micro_batches": []}

    def recording_forward_step(state, data_iterator, model, return_schedule_plan=False):
        output, loss_func = forward_step(state, data_iterator, model)

        def recorded_loss(output_tensor):
            loss_sum, num_tokens, report = loss_func(output_tensor)
            entry = {"loss_sum": float(loss_sum), "num_tokens": int(num_tokens), "training": model.training}
            if spec.get("record"):
                entry["per_token"] = output_tensor.detach().float().tolist()
            result["micro_batches"].append(entry)
            return loss_sum, num_tokens, report

        return output, recorded_loss

    config = sft(
        spec["hf"],
        dataset=ListProvider(samples=spec["samples"], seq_length=spec["seq_length"], dataloader_type="single",
                             num_workers=0),
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
    run(config, callbacks=[Recorder(result, spec.get("weights"))])


if __name__ == "__main__":
    main(sys.argv[1])
