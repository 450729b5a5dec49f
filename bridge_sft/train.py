"""Run SFT under Megatron-Bridge's standard ``finetune()`` loop with our forward step.

``run(config)`` is the one entry point the CLI, the demo, the notebooks and the
tests share: it switches the CPU runtime on where needed, applies the Bridge
fixes, checks the config (averaging flags, sequence lengths) and calls
``finetune(config, forward_step)``.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.finetune import finetune

from bridge_sft import bridge_fixes, moe, runtime
from bridge_sft.models import check_model
from bridge_sft.step import forward_step
from bridge_sft.callbacks import AdapterTokenizer, TokenThroughput

logger = logging.getLogger(__name__)

MEAN_OF_MEANS_WARNING = (
    "model.calculate_per_token_loss=False: Megatron divides each micro-batch's loss by that micro-batch's "
    "own number of supervised tokens and then averages the micro-batches (a mean of means). A short answer "
    "then weighs as much as a long one, and the gradient changes with micro_batch_size, the number of "
    "micro-batches and the data-parallel size. The logged 'lm loss' is a token mean either way, so loss "
    "curves do not show it. Set model.calculate_per_token_loss=True and ddp.average_in_collective=False "
    "(bridge-sft's default) for a true per-token mean over the global batch."
)


def use_per_token_loss(config: ConfigContainer) -> ConfigContainer:
    """Average the loss over the supervised tokens of the whole global batch (our default).

    With ``calculate_per_token_loss=True`` every micro-batch returns its loss
    sum and token count, and Megatron scales the gradients by the total token
    count over all micro-batches and DP x CP ranks; that requires
    ``ddp.average_in_collective=False`` (a sum, not a mean, in the all-reduce).
    """
    config.model.calculate_per_token_loss = True
    config.ddp.average_in_collective = False
    return config


def check_config(config: ConfigContainer, world_size: int | None = None) -> None:
    """Reject configs that cannot train correctly; warn about ones that train differently.
    ``world_size``: the number of processes of the run, when known (checked against the parallelism)."""
    moe.check_moe_config(config, world_size)
    if not config.model.calculate_per_token_loss:
        warnings.warn(MEAN_OF_MEANS_WARNING, stacklevel=2)
    elif config.ddp.average_in_collective:
        raise ValueError(
            "model.calculate_per_token_loss=True needs ddp.average_in_collective=False: the gradient all-reduce "
            "must sum, and Megatron divides by the global supervised-token count itself. "
            "Set ddp.average_in_collective=False."
        )
    if getattr(config.dataset, "packing", False) and config.train.micro_batch_size != 1:
        raise ValueError(
            f"packed sequences need train.micro_batch_size=1 (got {config.train.micro_batch_size}): a pack already "
            "holds seq_length tokens of several samples. Set train.micro_batch_size=1 (raise "
            "train.global_batch_size instead), or packing=false."
        )
    check_model(config)
    model, dataset = config.model, config.dataset
    if (getattr(model, "pipeline_model_parallel_size", 1) > 1 and not getattr(dataset, "packing", True)
            and getattr(dataset, "padding", None) == "longest" and not getattr(model, "variable_seq_lengths", False)
            and not getattr(model, "_enable_in_batch_packing", False)):  # see recipes/sft.py
        raise ValueError(
            "dataset.padding='longest' gives micro-batches of different lengths, which pipeline stages can only "
            "exchange with variable sequence lengths: give packing=false as a recipe argument (it turns them on), "
            "or set dataset.padding=seq_length."
        )
    data_seq_length = getattr(config.dataset, "seq_length", None)
    if data_seq_length is not None and data_seq_length != config.model.seq_length:
        raise ValueError(
            f"dataset.seq_length={data_seq_length} but model.seq_length={config.model.seq_length}: samples are "
            "packed/padded to the dataset's length and the model is built for its own. Set both to the same "
            f"value (e.g. dataset.seq_length={config.model.seq_length})."
        )
    lr, min_lr = config.optimizer.lr, config.optimizer.min_lr
    if lr is not None and min_lr is not None and min_lr > lr:  # megatron-core asserts with no message
        raise ValueError(f"optimizer.min_lr={min_lr} is above optimizer.lr={lr}: the schedule decays from lr down to "
                         f"min_lr. Lower min_lr (recipe argument min_lr=...; e.g. min_lr={lr / 10:g}) or raise lr.")


def run(config: ConfigContainer, device: str = "auto", callbacks=None, forward_step_func=forward_step) -> dict:
    """Fine-tune with Bridge's ``finetune()`` and ``bridge_sft.step.forward_step``.

    ``device``: ``"auto"`` (CPU runtime when torch sees no GPU), ``"cpu"`` or ``"cuda"``.
    On the CPU runtime the model and distributed settings are switched to their
    CPU forms, and on a GPU without Transformer Engine TE's kernels are turned off
    (``bridge_sft.runtime.configure``).
    ``callbacks``: Bridge ``Callback``s, run after our ``TokenThroughput``
    (supervised and slot tokens/s in the log) and ``AdapterTokenizer`` (the tokenizer beside
    a LoRA run's HF adapter); a ``TokenThroughput`` among them is used as that one (the
    console's progress line reads it).
    ``forward_step_func``: another forward step (benchmarks and tests wrap ours).
    Returns the run's token totals: supervised tokens, slot tokens, seconds, steps.
    """
    runtime.maybe_enable(device)
    runtime.configure(config)
    _single_process_rendezvous()
    bridge_fixes.apply()
    check_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    callbacks = list(callbacks or [])
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None) or TokenThroughput()
    callbacks = [throughput, AdapterTokenizer(), *moe.callbacks_for(config, callbacks),
                 *(c for c in callbacks if c is not throughput)]
    finetune(config, forward_step_func, callbacks=callbacks)
    return throughput.totals


def _single_process_rendezvous() -> None:
    """Outside torchrun, give torch.distributed a free local port instead of Bridge's fixed default
    29500, so that two single-process runs on one machine do not collide."""
    if "MASTER_PORT" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
