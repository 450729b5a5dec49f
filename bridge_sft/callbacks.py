"""Bridge callbacks of bridge-sft: useful-work throughput and a loss history.

Throughput: supervised tokens/s next to padded-slot tokens/s.

Bridge logs iteration time and (with ``logger.log_throughput``) model TFLOP/s,
which count padding and prompt tokens as work. SFT users want to see how many
tokens the model actually learns from: ``count_tokens`` (called by the forward
step on every training micro-batch) adds up ``loss_mask.sum()`` (supervised
tokens) and ``loss_mask.numel()`` (slots, padding included) on the device, and
the ``TokenThroughput`` callback turns them into per-second rates every
``logger.log_interval`` iterations, summed over the data- and context-parallel
ranks. Nothing here synchronises inside a step; one small all-reduce per step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.state import GlobalState
from megatron.core import parallel_state

_COUNTS = "_bridge_sft_token_counts"


def count_tokens(state: GlobalState, loss_mask: torch.Tensor) -> None:
    """Add one micro-batch's supervised tokens and slots to the step's running counts."""
    counts = getattr(state, _COUNTS, None)
    if counts is None or counts.device != loss_mask.device:
        counts = torch.zeros(2, dtype=torch.float64, device=loss_mask.device)
        setattr(state, _COUNTS, counts)
    counts[0] += loss_mask.sum()
    counts[1] += loss_mask.numel()


class TokenThroughput(Callback):
    """Logs supervised and slot tokens/s; keeps run totals in ``totals`` (read by the demo) and the latest
    step's figures in ``last_step`` (read by the console's progress line)."""

    def __init__(self) -> None:
        self.totals = {"supervised_tokens": 0.0, "slot_tokens": 0.0, "seconds": 0.0, "steps": 0}
        self._window = [0.0, 0.0, 0.0]
        self._step_start = 0.0
        self.last_step = (0.0, 0.0, 0.0)  # supervised tokens, slots, seconds of the latest step

    def on_train_step_start(self, context) -> None:
        self._step_start = time.perf_counter()

    def on_train_step_end(self, context) -> None:
        seconds = time.perf_counter() - self._step_start
        state = context.state
        counts = getattr(state, _COUNTS, None)
        if counts is None:  # not the last pipeline stage: no loss_mask here
            counts = torch.zeros(2, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        supervised, slots = counts.tolist()
        counts.zero_()
        for key, value in (("supervised_tokens", supervised), ("slot_tokens", slots), ("seconds", seconds)):
            self.totals[key] += value
        self.totals["steps"] += 1
        self.last_step = (supervised, slots, seconds)
        self._window = [self._window[0] + supervised, self._window[1] + slots, self._window[2] + seconds]

        iteration = state.train_state.step + 1
        interval = state.cfg.logger.log_interval or 1
        if iteration % interval == 0 and self._window[2] > 0:
            sup_rate, slot_rate = self._window[0] / self._window[2], self._window[1] / self._window[2]
            share = self._window[0] / max(self._window[1], 1.0)
            if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                print(f" [bridge-sft] iteration {iteration:>8} | supervised tokens/s: {sup_rate:,.0f} | "
                      f"slot tokens/s: {slot_rate:,.0f} | supervised share of slots: {share:.1%}", flush=True)
            writer = state.tensorboard_logger
            if writer is not None:
                writer.add_scalar("throughput/supervised_tokens_per_sec", sup_rate, iteration)
                writer.add_scalar("throughput/slot_tokens_per_sec", slot_rate, iteration)
            self._window = [0.0, 0.0, 0.0]


class LossHistory(Callback):
    """Keeps ``train[iteration] = lm loss`` and ``validation[iteration] = lm loss`` (rank-local values,
    already reduced across data-parallel ranks by Bridge)."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.validation: dict[int, float] = {}

    def on_train_step_end(self, context) -> None:
        if context.loss_dict and "lm loss" in context.loss_dict:
            self.train[context.state.train_state.step + 1] = float(context.loss_dict["lm loss"])

    def on_eval_end(self, context) -> None:
        if context.total_loss_dict and "lm loss" in context.total_loss_dict:
            self.validation[context.state.train_state.step] = float(context.total_loss_dict["lm loss"])


class AdapterTokenizer(Callback):
    """With LoRA and ``save_hf=true``, Bridge writes only the HF PEFT adapter to ``checkpoints/iter_N/hf``
    (``adapter_config.json``, ``adapter_model.safetensors``): ``AutoTokenizer.from_pretrained`` fails on it.
    After each save this writes the run's tokenizer (with the chat template the data was rendered with)
    beside the adapter, so the folder is self-contained next to its base model. The merged model:
    ``bridge-sft convert export CHECKPOINTS OUT``. Does nothing for full fine-tunes (Bridge's HF export
    already has the tokenizer) or without ``save_hf``."""

    def __init__(self) -> None:
        self._tokenizer = None

    def on_checkpoint_save(self, context) -> None:
        cfg = context.state.cfg
        if cfg.peft is None or not cfg.checkpoint.also_save_hf_checkpoint:
            return
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        hf_dir = Path(cfg.checkpoint.save) / f"iter_{context.state.train_state.step:07d}" / "hf"
        if hf_dir.is_dir():
            self.tokenizer(cfg).save_pretrained(str(hf_dir))

    def tokenizer(self, cfg):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from bridge_sft.data.encoding import load_chat_template

            source = (getattr(cfg.dataset, "tokenizer_path", None) or cfg.tokenizer.tokenizer_model
                      or cfg.checkpoint.pretrained_checkpoint)
            self._tokenizer = AutoTokenizer.from_pretrained(str(source))
            template = load_chat_template(getattr(cfg.dataset, "chat_template", None))
            if template is not None:
                self._tokenizer.chat_template = template
        return self._tokenizer
