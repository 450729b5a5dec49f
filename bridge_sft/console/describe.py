"""The run described in tables: the header before training (``describe_run``, ``describe_data``)
and the summary after it (``summary_rows``), as ``(label, text)`` rows for ``TrainConsole.table``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge_sft.console.session import TrainConsole


def describe_run(config, data_summary: dict | list[dict] | None = None,
                 hf_path: str | None = None) -> list[tuple[str, str]]:
    """Header rows (label, text) of a training run: model, data, training, parallelism, runtime, outputs."""
    model = config.model
    source = hf_path or config.checkpoint.pretrained_checkpoint or "?"
    arch = _architecture(source) or type(model).__name__
    shape = (f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
             f"({model.num_query_groups or model.num_attention_heads} kv), vocab {model.vocab_size:,}")
    rows = [("model", f"{arch} ({shape}) from {source}")]
    if config.peft is not None:
        peft = config.peft
        targets = ", ".join(getattr(peft, "target_modules", []))
        rows.append(("fine-tuning", f"{type(peft).__name__} (dim {getattr(peft, 'dim', '?')}, alpha "
                                    f"{getattr(peft, 'alpha', '?')}) on {targets}"))
    if data_summary is not None:
        rows.append(("data", describe_data(data_summary, config.dataset)))
    train, dataset = config.train, config.dataset
    unit = "packs" if getattr(dataset, "packing", False) else "samples"
    sched = config.scheduler
    iterations = f"{train.train_iters:,}" if train.train_iters else "?"
    optimizer = config.optimizer
    rows.append(("training", f"{iterations} iterations x {train.global_batch_size} {unit} of {model.seq_length} "
                             f"tokens (micro-batch {train.micro_batch_size}); lr {optimizer.lr} "
                             f"{sched.lr_decay_style} to {optimizer.min_lr}, {sched.lr_warmup_iters} warm-up"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp, cp = model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.context_parallel_size
    extras = [name for name, on in (("sequence parallel", model.sequence_parallel),
                                    ("distributed optimizer", config.ddp.use_distributed_optimizer)) if on]
    rows.append(("parallelism", f"{world} process{'es' if world > 1 else ''}: TP {tp}, PP {pp}, CP {cp}, "
                                f"DP {max(world // (tp * pp * cp), 1)}" + "".join(f", {e}" for e in extras)))
    precision = "bf16-mixed" if model.bf16 else "fp16-mixed" if model.fp16 else "fp32"
    rows.append(("runtime", f"{precision}; {runtime_description()}"))
    checkpoint = config.checkpoint
    if checkpoint.save:
        hf = "" if not checkpoint.also_save_hf_checkpoint else \
            ", HF export beside each" if config.peft is None else ", LoRA adapter (HF PEFT) and tokenizer beside each"
        every = f"every {checkpoint.save_interval} iterations and " if checkpoint.save_interval else ""
        rows.append(("checkpoints", f"{checkpoint.save} ({every}at the end{hf})"))
    if config.logger.tensorboard_dir:
        rows.append(("TensorBoard", config.logger.tensorboard_dir))
    return rows


def describe_data(summary: dict | list[dict], dataset=None) -> str:
    """One line: sources, samples, tokens, supervised tokens, and what was cut or skipped.
    ``summary``: the data's, or one per source of a mixture (added up; the sources named)."""
    mixture = isinstance(summary, list)
    if mixture:
        names = ", ".join(spec.name for spec in dataset.sources()) if hasattr(dataset, "sources") else "data"
        summary = _add_summaries(summary)
    else:
        paths = getattr(dataset, "data_path", None)
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        names = ", ".join(Path(p).name for p in paths) or "data"
    text = (f"{names}: {summary.get('samples', 0):,} samples, {summary.get('tokens', 0):,} tokens "
            f"({summary.get('supervised_tokens', 0):,} supervised)")
    cut = {"truncated": summary.get("truncated", 0), "dropped": summary.get("dropped_too_long", 0)
           + summary.get("dropped_no_supervised_after_truncation", 0),
           "bad records skipped": sum((summary.get("skipped") or {}).values())}
    text += "".join(f", {n:,} {what}" for what, n in cut.items() if n)
    validation = getattr(dataset, "validation_path", None)
    fraction = getattr(dataset, "validation_fraction", 0)
    samples = getattr(dataset, "validation_samples", 0)
    if validation:
        text += f"; validation: {validation}"
    elif fraction:
        text += f"; {fraction:.0%} held out for validation"
    elif samples:
        from bridge_sft.data.provider import held_out_count

        held = f"up to {samples:,} samples of each source" if mixture else \
            f"{held_out_count(summary.get('samples', 0), samples):,} samples"
        text += f"; {held} held out for validation (all of them at every evaluation)"
    return text


def _add_summaries(summaries: list[dict]) -> dict:
    """The counts ``describe_data`` shows, added up over the sources of a mixture."""
    total: dict = {"skipped": {}}
    for summary in summaries:
        summary = getattr(summary, "summary", summary)
        for key in ("samples", "tokens", "supervised_tokens", "truncated", "dropped_too_long",
                    "dropped_no_supervised_after_truncation"):
            total[key] = total.get(key, 0) + summary.get(key, 0)
        for reason, n in (summary.get("skipped") or {}).items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return total


def runtime_description() -> str:
    """Device and layer implementation, e.g. ``CPU (gloo), no Transformer Engine: its layers in plain torch``."""
    import importlib.util

    import torch

    from bridge_sft import runtime

    if runtime.is_enabled():
        device = "CPU (gloo)"
    elif torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} per node"
    else:
        device = "CPU"
    has_te = importlib.util.find_spec("transformer_engine") is not None
    return f"{device}, " + ("Transformer Engine" if has_te else "no Transformer Engine: its layers in plain torch")


def _architecture(source: str) -> str | None:
    import json

    config = Path(source) / "config.json"
    try:
        return json.loads(config.read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_rows(progress, console: TrainConsole) -> list[tuple[str, str]]:
    """The summary's rows after ``run()``: losses, throughput, the log (and how much it held back)."""
    rows, totals = [], progress.totals
    train = [progress.train[k] for k in sorted(progress.train)]
    if train:
        rows.append(("train loss", f"{train[0]:.4f} -> {train[-1]:.4f} (per iteration)"))
    validation = [progress.validation[k] for k in sorted(progress.validation)]
    if validation:
        rows.append(("validation loss", f"{validation[0]:.4f} -> {validation[-1]:.4f}"))
    if totals.get("seconds"):
        rows.append(("supervised tokens/s", f"{totals['supervised_tokens'] / totals['seconds']:,.0f} "
                     f"({totals['supervised_tokens']:,.0f} supervised tokens of {totals['slot_tokens']:,.0f} slots)"))
    if getattr(progress, "merge_command", None):
        rows.append(("merged model", f"{progress.merge_command} (the LoRA adapters merged into the base weights, "
                                     "as an HF checkpoint)"))
    if console.log_path is not None:
        held = f" ({console.hidden} known-harmless warnings not shown)" if console.hidden else ""
        rows.append(("full log", f"{console.log_path}{held}"))
    return rows
