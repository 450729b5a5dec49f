"""Bridge callbacks of bridge-sft: useful-work throughput, the console's progress, a loss history, and
the tokenizer beside a LoRA adapter.

Throughput: supervised tokens/s next to padded-slot tokens/s.

Bridge logs iteration time and (with ``logger.log_throughput``) model TFLOP/s,
which count padding and prompt tokens as work. SFT users want to see how many
tokens the model actually learns from: ``count_tokens`` (called by the forward
step on every training micro-batch) adds up ``loss_mask.sum()`` (supervised
tokens) and ``loss_mask.numel()`` (slots, padding included) on the device, and
the ``TokenThroughput`` callback turns them into per-second rates every
``logger.log_interval`` iterations, summed over the data- and context-parallel
ranks. Nothing here synchronises inside a step; one small all-reduce per step.

Progress: ``Progress`` draws the console's progress line, validation results and checkpoint saves
(``bridge_sft.console``) and keeps the run's loss history; ``LossHistory`` keeps the losses alone.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import torch

from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.state import GlobalState
from megatron.core import parallel_state

from bridge_sft.console import PLAIN_LINE_SECONDS, TrainConsole, format_duration

_COUNTS = "_bridge_sft_token_counts"
_EVAL_COUNTS = "_bridge_sft_eval_token_counts"


def count_tokens(state: GlobalState, loss_mask: torch.Tensor, evaluation: bool = False) -> None:
    """Add one micro-batch's supervised tokens and slots to the running counts of the training step
    (or of the evaluation, ``evaluation=True``)."""
    name = _EVAL_COUNTS if evaluation else _COUNTS
    counts = getattr(state, name, None)
    if counts is None or counts.device != loss_mask.device:
        counts = torch.zeros(2, dtype=torch.float64, device=loss_mask.device)
        setattr(state, name, counts)
    counts[0] += loss_mask.sum()
    counts[1] += loss_mask.numel()


def _reduce_counts(state: GlobalState, name: str) -> tuple[float, float]:
    """This step's (or evaluation's) counts summed over the data- and context-parallel ranks, then zeroed
    (a collective: every rank calls it)."""
    counts = getattr(state, name, None)
    if counts is None:  # not the last pipeline stage: no loss_mask here
        counts = torch.zeros(2, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    supervised, slots = counts.tolist()
    counts.zero_()
    return supervised, slots


class TokenThroughput(Callback):
    """Logs supervised and slot tokens/s; keeps run totals in ``totals`` (read by the demo) and the latest
    step's figures in ``last_step`` (read by the console's progress line)."""

    def __init__(self) -> None:
        self.totals = {"supervised_tokens": 0.0, "slot_tokens": 0.0, "seconds": 0.0, "steps": 0}
        self._window = [0.0, 0.0, 0.0]
        self._step_start = 0.0
        self.last_step = (0.0, 0.0, 0.0)  # supervised tokens, slots, seconds of the latest step
        self.evaluations: list[tuple[int, float]] = []  # (iteration, supervised tokens) of each evaluation

    def on_eval_start(self, context) -> None:
        counts = getattr(context.state, _EVAL_COUNTS, None)
        if counts is not None:
            counts.zero_()

    def on_eval_end(self, context) -> None:
        supervised, _ = _reduce_counts(context.state, _EVAL_COUNTS)
        (supervised,) = _from_last_stage([supervised])
        self.evaluations.append((context.state.train_state.step, supervised))

    def on_train_step_start(self, context) -> None:
        self._step_start = time.perf_counter()

    def on_train_step_end(self, context) -> None:
        seconds = time.perf_counter() - self._step_start
        state = context.state
        supervised, slots = _reduce_counts(state, _COUNTS)
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


def _device() -> torch.device:
    from bridge_sft import runtime

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not \
        runtime.is_enabled() else torch.device("cpu")


def _from_last_stage(values: list[float]) -> list[float]:
    """The last pipeline stage's ``values`` (losses exist only there); one broadcast if PP > 1."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.broadcast(tensor, src=torch.distributed.get_world_size() - 1)
    return tensor.tolist()


def count_parameters(model, moe: bool) -> tuple[int, int]:
    """(total, trainable) parameters of the whole model, over every tensor/pipeline/expert shard."""
    counts = torch.zeros(4, dtype=torch.float64)  # dense total, dense trainable, expert total, trainable
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    for chunk in model:
        for param in chunk.parameters():
            if getattr(param, "shared", False):  # the copy of tied embeddings on the last pipeline stage
                continue
            expert = not getattr(param, "allreduce", True)
            if not getattr(param, "tensor_model_parallel", False) and (etp_rank if expert else tp_rank) != 0:
                continue  # replicated across tensor-parallel ranks: count it once
            counts[2 * expert] += param.numel()
            counts[2 * expert + 1] += param.numel() if param.requires_grad else 0
    counts = counts.to(_device())
    dense, experts = counts[:2].clone(), counts[2:].clone()
    torch.distributed.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    if moe:  # every rank takes part, with or without experts of its own
        group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
        torch.distributed.all_reduce(experts, group=group)
    total = dense + experts
    return int(total[0]), int(total[1])


class Progress(Callback):
    """Progress line, validation results and checkpoint saves on the console, from Bridge's callbacks.

    Per step: the loss (mean over the last ``logger.log_interval`` iterations, as Bridge's
    log line), learning rate, grad norm, supervised tokens/s over the same window (from
    ``TokenThroughput``), ETA from wall time. Without a terminal, a plain line at log
    intervals: about 20 per run, and at least one a minute. Keeps the run's loss history,
    ``train`` and ``validation`` (``{iteration: lm loss}``, the last pipeline stage's on every
    rank), and ``totals`` (as ``TokenThroughput.totals``).
    """

    def __init__(self, console: TrainConsole, throughput: TokenThroughput):
        self.console = console
        self.throughput = throughput
        self.train: dict[int, float] = {}
        self.validation: dict[int, float] = {}
        self.parameters: tuple[int, int] | None = None
        # as TokenThroughput.totals, but on every rank (the last pipeline stage's counts)
        self.totals = {"supervised_tokens": 0.0, "slot_tokens": 0.0, "seconds": 0.0, "steps": 0}
        self.skipped = 0
        self._training = False
        self.merge_command: str | None = None  # a LoRA run's: how to get the merged HF model

    def on_train_start(self, context) -> None:
        self.parameters = count_parameters(context.model, bool(getattr(context.state.cfg.model,
                                                                        "num_moe_experts", None)))
        state = context.state
        self.total = state.cfg.train.train_iters
        self.interval = state.cfg.logger.log_interval or 1
        # Plain lines (no terminal): at log intervals, about 20 per run, and at least one a minute.
        self.plain_every = self.interval * max(1, math.ceil(self.total / 20 / self.interval))
        self._last_plain = time.perf_counter()
        self.first = state.train_state.step
        self._window: deque = deque(maxlen=self.interval)
        self._clock: tuple[int, float] | None = None
        self._training = True
        total, trainable = self.parameters
        share = "all trainable" if trainable == total else f"{trainable:,} trainable, {trainable / total:.2%}"
        self.console.row("parameters", f"{total:,} ({share})")
        if self.first:
            self.console.row("resuming", f"from iteration {self.first}")
        self.console.start_progress(self.total, self.first)

    def on_train_step_end(self, context) -> None:
        iteration = context.state.train_state.step + 1  # Bridge counts the step after the callbacks
        loss = context.loss_dict.get("lm loss") if context.loss_dict else None
        supervised, slots, seconds = self.throughput.last_step
        loss, supervised, slots = _from_last_stage([math.nan if loss is None else float(loss), supervised, slots])
        for key, value in (("supervised_tokens", supervised), ("slot_tokens", slots), ("seconds", seconds)):
            self.totals[key] += value
        self.totals["steps"] += 1
        now = time.perf_counter()
        self.skipped += bool(context.skipped_iter)
        if not context.skipped_iter:
            self.train[iteration] = loss
            self._window.append((loss, supervised, seconds))
        if not self.console.draws:
            return
        if not math.isfinite(loss) and not context.skipped_iter:
            self.console.warn(f"iteration {iteration}: the loss is {loss}")
        if self._clock is None:  # ETA from the wall time after the first step (data and graph warm-up)
            self._clock = (iteration, now)
        done, start = self._clock
        eta = (self.total - iteration) * (now - start) / (iteration - done) if iteration > done else None
        lr = next((g["lr"] for g in context.optimizer.param_groups if not g.get("is_decoupled_lr")), None)
        window_loss = sum(w[0] for w in self._window) / len(self._window) if self._window else math.nan
        rate = sum(w[1] for w in self._window) / max(sum(w[2] for w in self._window), 1e-9)
        grad = context.grad_norm
        fields = [f"loss {window_loss:.4f}", f"lr {lr:.3e}" if lr is not None else "",
                  f"grad norm {grad:.3f}" if grad is not None else "", f"{rate:,.0f} supervised tokens/s"]
        if self.skipped:
            fields.append(f"{self.skipped} skipped")
        eta_text = format_duration(eta) if eta is not None else "?"
        plain = None
        due = iteration % self.plain_every == 0 or now - self._last_plain > PLAIN_LINE_SECONDS
        if iteration % self.interval == 0 and due or iteration == self.total:
            self._last_plain = now
            width = len(str(self.total))
            plain = f"iteration {iteration:>{width}}/{self.total} | " + " | ".join(filter(None, fields)) \
                + f" | ETA {eta_text}"
        stats = "  ".join(filter(None, fields)).replace("supervised tokens/s", "sup. tok/s") + f"  ETA {eta_text}"
        self.console.update_progress(iteration, stats, plain)

    def on_eval_end(self, context) -> None:
        losses = context.total_loss_dict or {}
        (loss,) = _from_last_stage([float(losses["lm loss"]) if "lm loss" in losses else math.nan])
        iteration = context.state.train_state.step
        self.validation[iteration] = loss
        if self.console.draws and not math.isnan(loss):
            when = f"at iteration {iteration}" if self._training else f"after training (iteration {iteration})"
            covered = self.throughput.evaluations[-1][1] if self.throughput.evaluations else 0
            over = f", {covered:,.0f} supervised tokens" if covered else ""
            self.console.say(f"validation {when}: loss {loss:.4f} (perplexity {math.exp(min(loss, 700)):,.1f}{over})")

    def on_checkpoint_save(self, context) -> None:
        if self.console.draws:
            state = context.state
            path = Path(state.cfg.checkpoint.save) / f"iter_{state.train_state.step:07d}"
            hf = " (with the HF export in hf/)" if state.cfg.checkpoint.also_save_hf_checkpoint else ""
            if state.cfg.peft is not None:
                hf = " (with the LoRA adapter and tokenizer in hf/)" if hf else ""
                self.merge_command = f"bridge-sft convert export {state.cfg.checkpoint.save} OUT_DIR"
            self.console.say(f"checkpoint saved at iteration {state.train_state.step}: {path}{hf}")

    def on_train_end(self, context) -> None:
        self._training = False
        self.console.end_progress()


class LossHistory(Callback):
    """Keeps ``train[iteration] = lm loss`` and ``validation[iteration] = lm loss`` (rank-local values,
    already reduced across data-parallel ranks by Bridge): the losses alone, for runs without a console
    (a console's ``Progress`` keeps the same history)."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.validation: dict[int, float] = {}
        self.evaluations: list[tuple[int, float]] = []  # every evaluation, in order (also the one after training)

    def on_train_step_end(self, context) -> None:
        if context.loss_dict and "lm loss" in context.loss_dict:
            self.train[context.state.train_state.step + 1] = float(context.loss_dict["lm loss"])

    def on_eval_end(self, context) -> None:
        if context.total_loss_dict and "lm loss" in context.total_loss_dict:
            loss = float(context.total_loss_dict["lm loss"])
            self.validation[context.state.train_state.step] = loss
            self.evaluations.append((context.state.train_state.step, loss))


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
