"""The ``bridge-sft`` command line.

Sub-commands live in one module each (``data``, ``train``, ``convert``, ``chat``, ``eval``, ``demo``)
and register themselves with ``add_parser(subparsers)``; each sets
``func(args) -> int``. Heavy imports (torch, megatron) happen inside the
handlers, so ``bridge-sft --help`` is instant.

Errors a user can fix (bad paths, bad data, bad overrides) are raised as
``UserError`` and printed as one line, ``error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("data", "train", "convert", "chat", "eval", "demo")


class UserError(Exception):
    """A problem with the user's input; printed as one line without a traceback."""


def enable_runtime(device: str = "auto") -> None:
    """``bridge_sft.runtime.maybe_enable(device)``; what it refuses (Transformer Engine on a CPU, a device
    that is not there) raised as ``UserError``."""
    from bridge_sft import runtime

    try:
        runtime.maybe_enable(device)
    except (runtime.TransformerEngineOnCPUError, RuntimeError) as exc:
        raise UserError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge-sft",
        description="Supervised fine-tuning of Hugging Face LLMs on Megatron-Bridge.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"bridge_sft.cli.{name}")
        except ModuleNotFoundError as exc:  # a sub-command not written yet
            if exc.name != f"bridge_sft.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
