"""``bridge-sft train RECIPE_OR_YAML [key=value ...]``: fine-tune under Bridge's ``finetune()``.

Runs as is on one process, or under ``torchrun --nproc-per-node N`` (multi-GPU,
multi-node): every rank runs the same command. ``--dry-run`` prints the resolved
config and exits. On a bad recipe, argument, override or data path it stops with
one line naming the problem, before anything is written; if training fails
before its first checkpoint, the output folders it created are removed again
(its log stays).

The console shows a header, one progress line (plain periodic lines without a
terminal), validation results, checkpoint saves, the warnings that matter and a
summary; ``OUTPUT_DIR/logs/rank{N}.log`` holds everything (``bridge_sft.console``).
``--verbose`` prints everything as well.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from bridge_sft.cli import UserError, enable_runtime

EPILOG = """\
recipe arguments (key without a dot): hf_path=DIR_OR_HUB_ID data=FILE_OR_DIR peft=lora seq_length=N ...
config overrides (dotted keys, Hydra syntax): train.train_iters=100 optimizer.lr=1e-5 ...
examples:
  bridge-sft train tiny hf_path=outputs/demo/tiny-hf data=chat.jsonl train.train_iters=20
  bridge-sft train qwen3_0p6b hf_path=/models/Qwen3-0.6B data=chat.jsonl peft=lora --dry-run
  torchrun --nproc-per-node 8 -m bridge_sft.cli train recipes/qwen3_8b.yaml data=chat.jsonl
"""


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "train", help="fine-tune an HF model with a recipe", description=__doc__.splitlines()[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe name (sft, tiny, llama32_1b, qwen3_8b, ...) or a recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe arguments and config overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU runtime when torch sees no GPU (default)")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything Bridge prints, as well as writing it to OUTPUT_DIR/logs/rank*.log")
    parser.set_defaults(func=main)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(args) -> int:
    from bridge_sft.console import TrainConsole

    console = TrainConsole("train", verbose=args.verbose, passthrough=(UserError,))
    with console:
        code = _train(args, console)
    return 1 if console.failed else code


def _train(args, console) -> int:
    enable_runtime(args.device)
    from bridge_sft.recipes.resolve import ConfigError, build_config
    from bridge_sft.train import check_config, run

    try:
        config = build_config(args.recipe, args.overrides)
        check_config(config, world_size=None if args.dry_run else int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, ValueError) as exc:
        raise UserError(str(exc)) from None

    if args.dry_run:
        console.stop()  # the YAML goes to stdout as it is
        if _rank() == 0:
            config.print_yaml()
        return 0

    from bridge_sft.console import describe_run, log_dir, progress_callbacks, summary_rows
    from bridge_sft.data import DataError

    outputs = [p for p in (config.checkpoint.save, config.logger.tensorboard_dir,
                           getattr(config.dataset, "cache_dir", None)) if p and not Path(p).exists()]
    try:
        prepared = None
        if hasattr(config.dataset, "prepare"):  # read, check and cache the data before Bridge starts
            console.start_status("reading and tokenising the data (cached for later runs)")
            prepared = config.dataset.prepare(config.dataset.data_path)
        log = console.open_log(log_dir(config))
        console.table(f"bridge-sft train {args.recipe}",
                      describe_run(config, None if prepared is None else [p.summary for p in prepared]
                                   if isinstance(prepared, list) else prepared.summary)
                      + [("log", f"{log} (everything Bridge prints; one file per rank)")])
        console.configure(config)  # warnings: all to the log, the console filters
        callbacks = progress_callbacks(console)
        console.start_status("Bridge is setting up: model, weights, optimizer, data loaders")
        try:
            run(config, device=args.device, callbacks=callbacks)
        except Exception as exc:  # a dead peer: say so and how to resume, instead of gloo's or NCCL's words
            lost = lost_rank_error(exc, config.checkpoint.save)
            if lost is None:
                raise
            raise lost from exc
        progress = callbacks[-1]
        console.table(f"done: {progress.totals['steps']} iterations", summary_rows(progress, console))
    except DataError as exc:
        if _rank() == 0:
            _remove_unfinished(outputs, config.checkpoint.save, console.log_path)
        raise UserError(str(exc)) from None
    except BaseException:
        if _rank() == 0:
            _remove_unfinished(outputs, config.checkpoint.save, console.log_path)
        raise
    return 0


def _remove_unfinished(created: list[str], checkpoint_dir: str | None, log: Path | None) -> None:
    """Remove the folders this run created, unless it got as far as saving a checkpoint (the log stays)."""
    if checkpoint_dir and Path(checkpoint_dir, "latest_checkpointed_iteration.txt").exists():
        return
    for path in created:
        shutil.rmtree(path, ignore_errors=True)
        parent = Path(path).parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
    if created:
        kept = f" (its log stays: {log})" if log is not None else ""
        print(f"bridge-sft: stopped before the first checkpoint; removed the folders this run had created{kept}.",
              file=sys.stderr)


class LostRankError(RuntimeError):
    """Another rank of the job died or stopped answering in a collective (a node lost, a process killed)."""


# What gloo and NCCL raise on the ranks that survive a dead peer. A peer process that dies while its machine
# lives closes its sockets, and gloo fails at once ("Connection closed by peer [ADDR]:PORT", "Read error
# [ADDR]:PORT: Connection reset by peer"); a peer that stops answering (machine down, network partition,
# frozen process) is only noticed when the collective's timeout, Bridge's ``dist.distributed_timeout_minutes``,
# runs out ("Timed out waiting ...", NCCL's watchdog).
_LOST_PEER = re.compile(
    r"Connection (?:closed|reset) by peer|Timed out waiting \d+ms for \w+ operation"
    r"|NCCL communicator was aborted|Watchdog caught collective operation timeout"
    r"|remote process exited or there was a network error"
)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")  # gloo's "[127.0.0.1]:20708"


def lost_rank_error(exc: BaseException, checkpoint_dir: str | None) -> LostRankError | None:
    """A ``LostRankError`` saying what was lost and how to go on, if ``exc`` (or an exception it was raised
    from) is a collective failing because of a dead or silent peer; else None.

    Which rank died is not known here: gloo names the peer's address (its node), NCCL nothing; the dead
    rank's own console and ``logs/rank{N}.log`` stop where it died."""
    seen = exc
    while seen is not None:
        found = _LOST_PEER.search(str(seen))
        if found:
            address = _PEER_ADDRESS.search(str(seen))
            peer = f" {address.group(1)}:{address.group(2)}" if address and "by peer" in found.group(0) else ""
            return LostRankError(
                f"another rank of this job died or stopped answering ({found.group(0)}{peer}; "
                f"{os.environ.get('WORLD_SIZE', '1')} ranks). Rerun the same command on every node: "
                f"{_resume_point(checkpoint_dir)}."
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _resume_point(checkpoint_dir: str | None) -> str:
    """Where a rerun starts, from Bridge's ``latest_checkpointed_iteration.txt``."""
    marker = Path(checkpoint_dir, "latest_checkpointed_iteration.txt") if checkpoint_dir else None
    if marker is not None and marker.is_file():
        return f"it resumes from the last checkpoint (iteration {marker.read_text().strip()} in {checkpoint_dir})"
    return "no checkpoint was saved yet, so it starts from the beginning"
