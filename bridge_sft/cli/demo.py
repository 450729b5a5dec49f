"""``bridge-sft demo``: the whole product on a CPU in a few minutes, with no downloads.

1. build a tiny Llama-architecture HF model and tokenizer (random weights);
2. look at the bundled ChatterBot dialogs through the SFT data pipeline;
3. fine-tune it with the ``tiny`` recipe under Megatron-Bridge's ``finetune()``
   (our dataset provider and forward step, packed sequences, validation, checkpoints);
4. take the HF export Bridge wrote beside the last checkpoint, reload it with
   ``transformers`` and chat with it (``bridge_sft.cli.chat.Chat``, as ``bridge-sft chat``);
5. draw the loss curve and print a summary.

Everything goes to ``--output-dir`` (default ``outputs/demo``), which is
replaced on every run; the console is ``bridge-sft train``'s (``bridge_sft.console``),
with the full log in ``OUTPUT_DIR/run/logs/rank0.log``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

PROMPTS = ["How are you?", "What is your favorite book?", "Can I ask you a question?"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny model on bundled dialogs end to end (CPU)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="replaced on every run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="training iterations (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--verbose", action="store_true", help="print everything Bridge prints, as well as the log")
    parser.set_defaults(func=main)


def main(args) -> int:
    from bridge_sft.console import TrainConsole

    console = TrainConsole("demo", verbose=args.verbose)
    with console:
        code = _demo(args, console)
    return 1 if console.failed else code


# Header rows the demo shows (the data and the outputs have their own steps and summary).
HEADER_ROWS = ("model", "training", "runtime")


def _demo(args, console) -> int:
    start = time.perf_counter()
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    log = console.open_log(out / "run" / "logs")

    def say(step: str, text: str) -> None:
        console.say(f"==> [{step}] {text}", style="bold")

    say("1/5", f"building a tiny Llama-style HF model and tokenizer in {out / 'tiny-hf'}")
    from bridge_sft.tiny import SAMPLE_DIALOGS, TinySizes, build_tiny_model

    sizes = TinySizes(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024)
    hf_dir = build_tiny_model(out / "tiny-hf", arch="llama", sizes=sizes)

    data = out / "data" / "chatterbot-english.jsonl"
    say("2/5", f"the English dialogs of the bundled ChatterBot corpus (BSD-3) -> {data}, as the model sees them")
    import json

    from transformers import AutoTokenizer

    from bridge_sft.data import encode_conversation, render_supervised

    records = [json.loads(line) for line in SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()]
    english = [r for r in records if r.get("lang") == "english"]
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in english), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    example = min((r for r in english if len(r["messages"]) >= 4),
                  key=lambda r: sum(len(m["content"]) for m in r["messages"]))
    encoded = encode_conversation(example["messages"], tokenizer)
    console.say(f"   {len(english)} dialogs; supervised tokens between [[ ]] (each assistant reply and its "
                "end-of-turn token):")
    rendered = render_supervised(encoded.input_ids, encoded.loss_mask, tokenizer)
    console.say("   " + rendered.replace("\n", "\n   "))

    say("3/5", f"fine-tuning for {args.steps} iterations under Megatron-Bridge's finetune()")
    from bridge_sft import runtime

    runtime.maybe_enable(args.device)
    from bridge_sft.console import describe_run, progress_callbacks
    from bridge_sft.recipes import tiny
    from bridge_sft.train import run

    config = tiny(str(hf_dir), str(data), output_dir=str(out / "run"), train_iters=args.steps, lr=3e-3,
                  min_lr=3e-4, eval_interval=max(args.steps // 4, 1), save_interval=args.steps,
                  log_interval=max(args.steps // 10, 1), eval_sample_tokens=24,
                  # the model's answers to 2 held-out prompts at each evaluation; a run of a few steps (a smoke
                  # test) shows none: its answers say nothing, and its evaluations come every step
                  eval_samples=2 if args.steps >= 20 else 0)
    console.configure(config)  # warnings: all to the log, the console filters
    rows = dict(describe_run(config))
    for label in HEADER_ROWS:
        console.row(label, rows[label])
    console.row("log", f"{log} (everything Bridge prints)")
    callbacks = progress_callbacks(console)
    console.start_status("Bridge is setting up: model, weights, optimizer, data loaders")
    totals = run(config, device=args.device, callbacks=callbacks)
    history = callbacks[-1]  # the Progress callback keeps the loss history

    export = Path(config.checkpoint.save) / f"iter_{args.steps:07d}" / "hf"
    say("4/5", f"chatting with the HF export {export} (as `bridge-sft chat` does)")
    from bridge_sft.cli.chat import Chat

    chat = Chat(export, args.device)
    console.say("   (a 4-layer model trained from random weights for two minutes: expect ChatterBot-flavoured\n"
                "    fragments, not answers; the point is that the exported HF model loads and generates)")
    for prompt in PROMPTS:
        reply = chat.reply([{"role": "user", "content": prompt}], max_new_tokens=24, temperature=0.0)
        console.say(f"   user: {prompt}\n   assistant: {reply}")

    say("5/5", "loss curve")
    plot = plot_losses(history, out / "loss_curve.png")
    console.say(f"   {plot}")

    train = [history.train[k] for k in sorted(history.train)]
    val = [history.validation[k] for k in sorted(history.validation)]
    rate = totals["supervised_tokens"] / max(totals["seconds"], 1e-9)
    lines = [
        "=" * 72,
        "bridge-sft demo: summary",
        f"  steps                 {totals['steps']} (global batch {config.train.global_batch_size} packs of "
        f"{config.model.seq_length} tokens)",
        f"  train loss            {train[0]:.3f} -> {train[-1]:.3f}",
    ]
    if val:
        lines.append(f"  validation loss       {val[0]:.3f} -> {val[-1]:.3f}")
    lines += [
        f"  supervised tokens/s   {rate:,.0f} ({totals['supervised_tokens']:,.0f} supervised of "
        f"{totals['slot_tokens']:,.0f} slots)",
        f"  Megatron checkpoint   {config.checkpoint.save}",
        f"  HF export             {export}",
        f"  loss curve            {plot}",
        f"  full log              {log}",
        f"  wall time             {time.perf_counter() - start:.0f} s",
        "=" * 72,
    ]
    for line in lines:
        console.say(line)
    return 0


def plot_losses(history, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(history.train), [history.train[k] for k in sorted(history.train)], label="train (lm loss)")
    if history.validation:
        steps = sorted(history.validation)
        ax.plot(steps, [history.validation[k] for k in steps], "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title("bridge-sft demo: tiny Llama on ChatterBot dialogs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
