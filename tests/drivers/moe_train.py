"""Driver: a tiny MoE model under Bridge's real ``finetune()``, one schedule entry per iteration, lr 0.

Usage: ``moe_train.py SPEC.json`` (alone, or under torchrun). SPEC keys:

- ``hf``: tiny HF MoE model dir; ``out``: result JSON path (rank 0); ``grads``: path prefix: each rank
  writes ``{prefix}.rank{r}.pt`` = ``{iteration: {name: finalized gradient}}`` (expert parameters
  under their global expert index) for the iterations whose schedule entry has ``"grads": true``
- ``samples``: ``{"tokens", "labels", "loss_mask"[, "padding"][, "packed"]}`` lists of ``seq_length``;
  ``padding`` = number of trailing padding slots (marked in the batch's ``padding_mask``);
  ``packed`` = ``[real, padded]`` cumulative sequence boundaries of a THD pack (``cu_seqlens_q`` and
  ``cu_seqlens_q_padded``; position ids restart at each padded boundary);
  sample ``i`` of the run is ``samples[i % len(samples)]``
- ``seq_length``, ``mbs``, ``gbs``, ``tp``, ``ep``, ``etp``, ``sp`` (sequence parallel), ``cp``
  (context parallel), ``model`` (extra model-provider fields), ``record`` (rank 0 keeps every training
  micro-batch's per-token losses ``[b, seq_length]``, put back together from the CP ranks' shards)
- ``schedule``: one entry per iteration: ``step`` ("ours" = bridge_sft's forward step, "bridge" =
  Bridge's ``gpt_step.forward_step``), ``aux`` (moe_aux_loss_coeff), ``z`` (moe_z_loss_coeff or
  None), ``capacity`` (moe_expert_capacity_factor or None), ``grads``, ``router_inputs`` (rank 0
  keeps the last MoE layer's router input and padding mask of every micro-batch)
- ``health``: ``{"threshold": t, "intervals": n}`` for the run's ``RouterHealth`` callback
- ``config_errors``: ``{"dense": TINY_DENSE_DIR, "out": path}``: before training, write
  ``moe_config_errors.check_cases`` (bad MoE settings through ``check_config``) to ``out``

The weights never move (SGD, lr 0), so every iteration's gradient is taken at the same point.
Result JSON: ``losses`` {iteration: lm loss}, ``world_size``, ``health`` (``RouterHealth.history``),
``per_token`` (with ``record``: per training micro-batch, ``loss`` and ``num_tokens`` as Bridge's loss
function returned them on rank 0, and the gathered per-token losses);
``{prefix}.router_inputs.pt``:
``{iteration: [(hidden [s, b, h], padding_mask [s, b] or None), ...]}`` and the router weight.
"""

import atexit
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
from _common import Tee

from bridge_sft.recipes import sft
from bridge_sft import step as step_module
from bridge_sft.step import forward_step
from bridge_sft.train import run
from bridge_sft.moe import RouterHealth  # after bridge_sft.recipes: the CPU runtime gate
from benchmarks.moe_common import set_router_coefficients

from megatron.bridge.data.base import DatasetProvider  # noqa: E402  (after bridge_sft: CPU runtime)
from megatron.bridge.training import gpt_step  # noqa: E402
from megatron.bridge.training.callbacks import Callback  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples, length):
        self.samples, self.length = samples, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        s = self.samples[i % len(self.samples)]
        n = len(s["tokens"])
        padding = torch.zeros(n, dtype=torch.bool)
        padding[n - s.get("padding", 0):] = True
        item = {"tokens": torch.tensor(s["tokens"]), "labels": torch.tensor(s["labels"]),
                "loss_mask": torch.tensor(s["loss_mask"], dtype=torch.float32),
                "position_ids": torch.arange(n), "padding_mask": padding}
        if "packed" in s:
            real, padded = (torch.tensor(b, dtype=torch.int32) for b in s["packed"])
            for start, end in zip(padded[:-1].tolist(), padded[1:].tolist()):
                item["position_ids"][start:end] = torch.arange(end - start)
            longest = torch.diff(padded).max().reshape(1)
            item.update(cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=padded,
                        cu_seqlens_kv_padded=padded, max_seqlen_q=longest, max_seqlen_kv=longest)
        return item


@dataclass(kw_only=True)
class ListProvider(DatasetProvider):
    samples: list
    seq_length: int

    def build_datasets(self, context):
        return ListDataset(self.samples, context.train_samples), None, None


LAST_BATCH = []  # the micro-batch get_batch read last (before its CP split)


def recording_get_batch(data_iterator, *args, **kwargs):
    """``bridge_sft.step``'s ``get_batch`` (Bridge's), keeping the whole micro-batch it reads. (The MoE forward
    step reads a step's micro-batches ahead, keyed by the data iterator: a wrapper there would break it.)"""
    tee = Tee(data_iterator)
    out = gpt_step.get_batch(tee, *args, **kwargs)
    LAST_BATCH[:] = [tee.last]
    return out


def gather_context_parallel(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """This CP rank's per-token losses ``[b, s / CP]`` back in sequence order ``[b, s]`` (all ranks call it)."""
    from megatron.bridge.training.utils.packed_seq_utils import get_thd_cp_partition_indices
    from megatron.core.utils import get_batch_on_this_cp_rank

    group = parallel_state.get_context_parallel_group()
    size, s = group.size(), batch["tokens"].size(-1)
    if size == 1:
        return per_token
    if "cu_seqlens_q_padded" in batch:  # the split Bridge's get_batch applies to packed batches
        index = get_thd_cp_partition_indices(batch["cu_seqlens_q_padded"].reshape(-1), total_tokens=s,
                                             cp_group=group, device=per_token.device).long()
    else:
        index = get_batch_on_this_cp_rank({"i": torch.arange(s).unsqueeze(0), "cu_seqlens": None},
                                          is_hybrid_cp=False, cp_group=group)["i"][0]
    shards = [torch.empty_like(per_token) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    torch.distributed.all_gather(shards, per_token.contiguous(), group=group)
    torch.distributed.all_gather(indices, index, group=group)
    full = per_token.new_zeros(per_token.size(0), s)
    for shard, idx in zip(shards, indices):
        full[:, idx] = shard
    return full


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def routers(model):
    return [m for chunk in model for m in unwrap(chunk).modules() if isinstance(m, TopKRouter)]


def global_name(name, num_experts):
    """Local expert j on expert-parallel rank r is global expert r * (E / EP) + j: in ``SequentialMLP``'s
    ``experts.local_experts.j.*`` names and in ``TEGroupedMLP``'s ``experts.linear_fc*.weightj``."""
    if not num_experts:  # a dense model
        return name
    offset = parallel_state.get_expert_model_parallel_rank() * (
        num_experts // parallel_state.get_expert_model_parallel_world_size())
    marker = ".experts.local_experts."
    if marker in name:
        head, tail = name.split(marker)
        local, rest = tail.split(".", 1)
        return f"{head}{marker}{offset + int(local)}.{rest}"
    grouped = re.fullmatch(r"(.*\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)", name)
    return f"{grouped.group(1)}{offset + int(grouped.group(2))}" if grouped else name


class Schedule(Callback):
    def __init__(self, spec, result):
        self.spec, self.result = spec, result
        self.grads, self.inputs, self.hooks = {}, {}, []

    def entry(self, context):
        return self.spec["schedule"][context.state.train_state.step]

    def on_train_step_start(self, context):
        entry = self.entry(context)
        set_router_coefficients(context, aux=entry.get("aux", 0.0), z=entry.get("z"), capacity=entry.get("capacity"))
        if entry.get("router_inputs") and torch.distributed.get_rank() == 0:
            kept = self.inputs.setdefault(context.state.train_state.step + 1, [])
            last = max(routers(context.model), key=lambda r: r.layer_number)
            self.inputs["weight"] = last.weight.detach().clone()

            def keep(module, args):
                if torch.is_grad_enabled():
                    mask = args[1] if len(args) > 1 else None
                    kept.append((args[0].detach().clone(), None if mask is None else mask.clone()))

            self.hooks.append(last.register_forward_pre_hook(keep))

    def on_train_step_end(self, context):
        iteration = context.state.train_state.step + 1
        self.result["losses"][iteration] = float(context.loss_dict["lm loss"])
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.entry(context).get("grads"):
            num_experts = context.state.cfg.model.num_moe_experts
            self.grads[iteration] = {
                global_name(name, num_experts): p.main_grad.detach().clone()
                for name, p in unwrap(context.model[0]).named_parameters()
            }

    def on_train_end(self, context):
        prefix = self.spec.get("grads")
        if prefix:
            torch.save(self.grads, f"{prefix}.rank{torch.distributed.get_rank()}.pt")
            if torch.distributed.get_rank() == 0 and self.inputs:
                torch.save(self.inputs, f"{prefix}.router_inputs.pt")


def main(spec_path):
    spec = json.load(open(spec_path))
    if spec.get("config_errors") and int(os.environ.get("RANK", "0")) == 0:
        from moe_config_errors import check_cases

        errors = check_cases(spec["hf"], spec["config_errors"]["dense"])
        json.dump(errors, open(spec["config_errors"]["out"], "w"))
    result = {"losses": {}, "per_token": []}
    if spec.get("record"):
        step_module.get_batch = recording_get_batch
    schedule = spec["schedule"]

    def scheduled_forward_step(state, data_iterator, model, return_schedule_plan=False):
        step = schedule[state.train_state.step]["step"] if model.training else "ours"
        if step == "bridge":
            return gpt_step.forward_step(state, data_iterator, model, return_schedule_plan)
        if not (spec.get("record") and model.training):
            return forward_step(state, data_iterator, model, return_schedule_plan)
        output, loss_func = forward_step(state, data_iterator, model, return_schedule_plan)
        batch = LAST_BATCH.pop()

        def recorded_loss(output_tensor):
            loss_sum, num_tokens, report = loss_func(output_tensor)
            full = gather_context_parallel(output_tensor.detach().float(), batch)
            result["per_token"].append({"loss_sum": float(loss_sum), "num_tokens": int(num_tokens),
                                        "per_token": full.tolist()})
            return loss_sum, num_tokens, report

        return output, recorded_loss

    config = sft(
        spec["hf"],
        dataset=ListProvider(samples=spec["samples"], seq_length=spec["seq_length"], dataloader_type="single",
                             num_workers=0),
        output_dir=spec["out"] + ".run",
        seq_length=spec["seq_length"],
        tensor_parallel=spec.get("tp", 1),
        sequence_parallel=spec.get("sp", False),
        context_parallel=spec.get("cp", 1),
        micro_batch_size=spec.get("mbs", 1),
        global_batch_size=spec.get("gbs", 4),
        train_iters=len(schedule),
        lr=0.0, min_lr=0.0, warmup_iters=0, weight_decay=0.0, clip_grad=0.0,
        precision="fp32", distributed_optimizer=False,
        eval_interval=None, eval_iters=0, save_interval=None, log_interval=1,
    )
    config.optimizer.optimizer = "sgd"
    config.optimizer.sgd_momentum = 0.0
    config.scheduler.lr_decay_style = "constant"
    config.checkpoint.save = None
    config.model.expert_model_parallel_size = spec.get("ep", 1)
    config.model.expert_tensor_parallel_size = spec.get("etp", 1)
    for key, value in spec.get("model", {}).items():
        setattr(config.model, key, value)
    health = RouterHealth(spec.get("health", {}).get("threshold", 3.0), spec.get("health", {}).get("intervals", 5))
    if int(os.environ.get("RANK", "0")) == 0:
        result["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        atexit.register(lambda: json.dump({**result, "health": health.history}, open(spec["out"], "w")))
    callbacks = [Schedule(spec, result)] + ([health] if config.model.num_moe_experts else [])  # dense: no routers
    run(config, callbacks=callbacks, forward_step_func=scheduled_forward_step)


if __name__ == "__main__":
    main(sys.argv[1])
