"""``bridge-sft eval MODEL DATA``: the model answers every assistant turn of held-out chat data; text
metrics and the supervised loss of the reference answers, optionally against a baseline model.

MODEL (and ``--baseline``) is what ``bridge-sft chat`` takes: an HF directory, or a Megatron checkpoint
(a run's ``checkpoints`` folder or one ``iter_N``, exported to a temporary HF directory). DATA is chat
data in any format training reads (jsonl, json, parquet, a saved dataset; messages, sharegpt, alpaca,
prompt/completion); every record of it is held out (give your validation file). Each trainable
assistant turn is prompted with the conversation before it, rendered with the chat template as
training renders it plus the generation prompt, and answered greedily (batched, stopping at the
model's end-of-turn tokens). Reported: exact match, token F1, ROUGE-L, the share of answers that
stopped, and the loss (nats per supervised token) of the reference answers. Writes
``OUT/answers.jsonl`` (a line per turn: record, prompt, reference, answers, scores) and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

from bridge_sft.cli import UserError
from bridge_sft.cli.data import add_rendering_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="answer held-out chat data; EM / F1 / ROUGE-L and reference loss",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF directory, or Megatron checkpoint (a run's checkpoints/ or one iter_N)")
    parser.add_argument("data", nargs="+", help="held-out chat data: files, directories or saved datasets")
    parser.add_argument("--baseline", help="a second model answering the same prompts (e.g. the model before "
                                           "fine-tuning), shown side by side with the difference")
    parser.add_argument("--out", default="eval", help="directory for answers.jsonl and summary.json "
                                                      "(default: ./eval)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--hf", dest="hf_config", help="for a Megatron checkpoint MODEL: the HF model it was "
                        "trained from (default: read from its run_config.yaml)")
    parser.add_argument("--baseline-hf", dest="baseline_hf_config", help="--hf for the baseline")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the GPU if torch sees one (default)")
    add_rendering_arguments(parser)
    parser.set_defaults(func=main)


def _options(args):
    from bridge_sft.cli.data import encode_options

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be positive, not {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, not {args.temperature}")
    return encode_options(args, "", 1 << 30)  # each model renders with its own tokenizer; no length limit


def main(args) -> int:
    from bridge_sft.console import TrainConsole
    from bridge_sft.data.errors import DataError
    from bridge_sft.evaluation import evaluate

    options = _options(args)
    console = TrainConsole("eval", passthrough=(UserError,))

    def progress(label: str, total: int):
        """The (done, total) callback of one model's answers: a live line on a terminal, else a line
        every 10 s and at the end."""
        console.start_progress(total, 0, f"answering ({label})")
        started = last = time.monotonic()

        def update(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            stats = f"{done / max(now - started, 1e-9):.2f} answers/s"
            plain = None
            if done == total or now - last >= 10:
                plain, last = f"answering ({label}): {done}/{total}, {stats}", now
            console.update_progress(done, stats, plain)
            if done == total:
                console.end_progress()

        return update

    report = None
    with console:  # transformers' and Bridge's loading chatter goes to memory; a failure shows its tail
        try:
            report = evaluate(args.model, args.data, args.baseline, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, temperature=args.temperature, options=options,
                              hf_config=args.hf_config, baseline_hf_config=args.baseline_hf_config,
                              device=args.device, progress=progress,
                              say=lambda text: console.say(text, error=True))
        except DataError as exc:
            raise UserError(str(exc)) from None
    if console.failed or report is None:
        return 1
    answers, summary = report.write(args.out)
    s = report.summary
    print(f"{s['turns']} assistant turns of {s['conversations']} conversations"
          + (f" ({report.skipped.describe()})" if report.skipped.count else ""))
    print(report.table())
    print(f"answers: {answers}\nsummary: {summary}")
    return 0
