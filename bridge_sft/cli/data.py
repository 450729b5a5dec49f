"""``bridge-sft data preview|prepare``: look at how chat data is tokenised and masked; build the cache.

    bridge-sft data preview FILE --tokenizer DIR [-n 3] [--json]
    bridge-sft data prepare FILE... --tokenizer DIR --seq-length 2048 --cache-dir DIR
    bridge-sft data prepare chat.jsonl:0.7 code.jsonl:0.3 --tokenizer DIR --seq-length 2048

``preview`` prints records with the supervised tokens highlighted (green, or
between ``[[`` and ``]]`` when the output is not a terminal); ``--json`` prints
``{"input_ids": [...], "loss_mask": [...]}`` per record. ``prepare`` encodes
the data into the cache a training run with the same settings will reuse, packs
it, and prints the summary; several sources with weights (``PATH:WEIGHT``) or
epochs (``PATH:Nx``) are each encoded, and the mixture of ``--train-samples``
items is planned and shown per source (see ``bridge_sft.data.mixing``). Neither
imports torch or megatron. Bad data ends in one line naming the file, the
line/record and the fix (exit 2), never in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from bridge_sft.cli import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="preview and prepare chat data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    preview = sub.add_parser("preview", help="show records with their supervised tokens highlighted")
    preview.add_argument("file", help="a .jsonl/.json/.parquet file, a saved datasets directory, or a hub id")
    _common(preview)
    preview.add_argument("-n", "--num-records", type=int, default=3, help="records to show (default 3)")
    preview.add_argument("--start", type=int, default=0, help="skip this many records first")
    preview.add_argument("--json", action="store_true",
                         help='print {"input_ids": [...], "loss_mask": [...]} per record')
    preview.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    preview.set_defaults(func=run_preview)

    prep = sub.add_parser("prepare", help="encode (and pack) data into the cache; print the summary")
    prep.add_argument("files", nargs="+", help="data files/directories/hub ids (one source), or sources with "
                                               "weights PATH:0.7 or epochs PATH:2x (a mixture)")
    _common(prep)
    prep.add_argument("--seq-length", type=int, required=True, help="tokens per sample/pack (the model's seq_length)")
    prep.add_argument("--cache-dir", default="data_cache",
                      help="cache directory (default ./data_cache); a training run with the same data and "
                           "settings reuses it when its dataset.cache_dir is the same (<output_dir>/data_cache)")
    prep.add_argument("--no-packing", action="store_true", help="do not report packing")
    prep.add_argument("--pad-seq-to-mult", type=int, default=1, help="pad packed samples to a multiple (2 x CP size)")
    prep.add_argument("--truncation", choices=("split", "truncate", "drop", "error"), default="truncate")
    prep.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    prep.add_argument("--num-proc", type=int, default=None, help="encoding processes (default: automatic)")
    prep.add_argument("--seed", type=int, default=1234, help="shuffling seed (the provider's seed)")
    prep.add_argument("--mix-by", choices=("samples", "tokens"), default="samples",
                      help="what mixture weights count (default samples)")
    prep.add_argument("--train-samples", type=int, default=None,
                      help="items of the mixture to plan (train_iters x global_batch_size; default: as many as "
                           "the sources hold together)")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=run_prepare)


def _common(parser) -> None:
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory (or hub id)")
    add_rendering_arguments(parser)
    parser.add_argument("--train-on", choices=("assistant", "last_assistant", "all"), default="assistant")
    parser.add_argument("--empty-think", choices=("mask", "train"), default="mask")


def add_rendering_arguments(parser) -> None:
    """The flags that say how records are read and rendered (``data`` and ``eval`` share them)."""
    parser.add_argument("--format", default="auto",
                        choices=("auto", "messages", "sharegpt", "alpaca", "prompt_completion"))
    parser.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE",
                        help="use source column SOURCE as NAME (e.g. messages=dialog); repeatable")
    parser.add_argument("--chat-template", default=None, help="a .jinja file overriding the tokenizer's template")
    parser.add_argument("--template-kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="template variable, VALUE parsed as JSON if it can be (enable_thinking=false)")
    parser.add_argument("--system-prompt", default=None, help="system message for conversations without one")


def _pairs(items: list[str], what: str, parse_json: bool = False) -> dict | None:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r} must look like KEY=VALUE")
        if parse_json:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out or None


def _options(args, seq_length: int):
    return encode_options(args, args.tokenizer, seq_length)


def encode_options(args, tokenizer_path: str, seq_length: int):
    """``EncodeOptions`` from the command's flags (those it lacks keep their defaults), validated;
    a bad value is a ``UserError``."""
    from bridge_sft.data.cache import EncodeOptions
    from bridge_sft.data.formats import DataError

    options = EncodeOptions(
        tokenizer_path=tokenizer_path,
        seq_length=seq_length,
        train_on=getattr(args, "train_on", "assistant"),
        format=args.format,
        columns=_pairs(args.column, "--column"),
        chat_template=args.chat_template,
        template_kwargs=_pairs(args.template_kwarg, "--template-kwarg", parse_json=True),
        empty_think=getattr(args, "empty_think", "mask"),
        truncation=getattr(args, "truncation", "truncate"),
        on_bad_record=getattr(args, "on_bad_record", "error"),
        system_prompt=args.system_prompt,
    )
    try:
        options.validate()
    except DataError as exc:
        raise UserError(str(exc)) from None
    return options


def run_preview(args) -> int:
    from bridge_sft.data.cache import _load_tokenizer, make_encoder
    from bridge_sft.data.formats import (
        DataError,
        RecordError,
        detect_format,
        apply_columns,
        iter_source,
        location,
        parse_raw,
        resolve_sources,
        to_conversation,
    )

    options = _options(args, seq_length=1 << 30)
    try:
        sources = resolve_sources(args.file)
        tokenizer = _load_tokenizer(args.tokenizer)
        encoder = make_encoder(options, tokenizer)
    except DataError as exc:
        raise UserError(str(exc)) from None
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    shown, failures, seen = 0, 0, 0
    for source in sources:
        fmt = options.format
        try:
            for index, raw in iter_source(source):
                if shown >= args.num_records:
                    break
                seen += 1
                if seen <= args.start:
                    continue
                where = location(source, index)
                try:
                    record = parse_raw(raw, source, index)
                    if fmt == "auto" and isinstance(record, dict):
                        fmt = detect_format(apply_columns(record, options.columns)) or "auto"
                    conv = to_conversation(record, fmt, options.columns, require_assistant=options.train_on != "all")
                    ids, mask = encoder.encode(conv)
                except RecordError as exc:
                    failures += 1
                    shown += 1
                    print(f"{where}: bad record ({exc.reason}): {exc.detail}", file=sys.stderr)
                    continue
                shown += 1
                if args.json:
                    print(json.dumps({"input_ids": ids.tolist(), "loss_mask": mask.tolist()}))
                else:
                    _show(where, ids.tolist(), mask.tolist(), tokenizer, color)
        except DataError as exc:
            raise UserError(str(exc)) from None
    if shown == 0:
        raise UserError(f"{args.file}: no records to show")
    return 1 if failures else 0


def _show(where: str, ids: list[int], mask: list[int], tokenizer, color: bool) -> None:
    from bridge_sft.data import render_supervised

    supervised = sum(mask[1:])  # the first token is never a label
    print(f"=== {where}: {len(ids)} tokens, {supervised} supervised ===")
    print(render_supervised(ids, mask, tokenizer, color=color))
    print()


def run_prepare(args) -> int:
    import numpy as np

    from bridge_sft.data.cache import format_summary, prepare
    from bridge_sft.data.formats import DataError
    from bridge_sft.data.mixing import format_mixture, is_mixture, parse_sources, plan_sources, source_options
    from bridge_sft.data.packing import packing_efficiency

    if args.seq_length < 1:
        raise UserError(f"--seq-length must be positive, not {args.seq_length}")
    if args.pad_seq_to_mult < 1 or args.seq_length % args.pad_seq_to_mult:
        raise UserError(
            f"--seq-length {args.seq_length} must be a multiple of --pad-seq-to-mult {args.pad_seq_to_mult}"
        )
    if args.train_samples is not None and args.train_samples < 1:
        raise UserError(f"--train-samples must be positive, not {args.train_samples}")
    options = _options(args, args.seq_length)
    packing = not args.no_packing
    try:
        specs = parse_sources(args.files)
        prepared = []
        for spec in specs:
            prepared.append(prepare(list(spec.paths), source_options(options, spec), cache_dir=args.cache_dir,
                                    num_proc=args.num_proc, progress=not args.no_progress))
        items, plan = plan_sources(specs, prepared, seq_length=args.seq_length, packing=packing,
                                   pad_seq_to_mult=args.pad_seq_to_mult, mix_by=args.mix_by,
                                   num_items=args.train_samples if is_mixture(specs) else 1, seed=args.seed)
    except DataError as exc:
        raise UserError(str(exc)) from None
    for spec, data, item in zip(specs, prepared, items):
        summary = dict(data.summary)
        if packing:
            lengths = np.asarray(data.lengths)
            summary["packing"] = {
                "samples": len(lengths),
                "packs": len(item.samples),
                "capacity": args.seq_length,
                "efficiency": packing_efficiency(int((lengths - 1).sum()), len(item.samples), args.seq_length),
            }
        if is_mixture(specs):
            print(f"source {spec.name}:")
        print(format_summary(summary))
    if is_mixture(specs):
        stats = [{"records": int(d.summary["records"]), "samples": len(d), "supervised_tokens": int(i.tokens.sum())}
                 for d, i in zip(prepared, items)]
        print(format_mixture("train", [s.name for s in specs], plan, stats, [len(i.samples) for i in items],
                             packing, "--train-samples" if args.train_samples else "as many as the sources hold"))
    return 0

