"""What a person sees while bridge-sft trains, and the complete log behind it.

``TrainConsole`` (``session.py``) is used by ``bridge-sft train``, ``demo`` and ``chat``:

- **The log file** (``OUTPUT_DIR/logs/rank{RANK}.log``, one per rank; ``capture.py``) receives
  everything the process writes, complete and unfiltered: file descriptors 1 and 2 are redirected
  into pipes that a thread copies to the file (so Bridge's and megatron-core's prints, C++ messages
  and child processes land there too), and Python warnings and logging records are written to it
  as they are emitted. Output produced before the log's path is known (imports, recipe
  resolution) is kept in memory and written first.
- **The console** (``terminal.py``) shows a header (``describe_run``, ``describe.py``), one live
  progress line on a terminal (plain periodic lines otherwise), validation results, checkpoint
  saves, the warnings and errors that matter, and a summary. The progress figures come from
  Bridge callbacks (``bridge_sft.callbacks.Progress``), not from parsing the log.
- **What reaches the console** (``harmless.py``; on rank 0; other ranks show only errors and the
  rerun state machine's reports): every ERROR/CRITICAL record, every Python warning and WARNING
  record, every line a library writes to stderr, and every stdout line that calls itself a warning
  or error, UNLESS it matches ``HARMLESS``, the allow-list of messages known to be harmless (each
  with the reason). Anything not on that list is shown: a new warning is never hidden by default.
  Each distinct message is shown once.
- **A failure** prints the last lines of the rank's log (the traceback included) and the log's
  path, on whichever rank failed.
- ``verbose=True`` shows everything as before (and still writes the log).

Only the process that created the console reads the pipes; forked children write into them and
their output reaches the log through the parent. Nothing here imports Bridge.
"""

from bridge_sft.console.capture import _ANSI, FAILURE_TAIL_LINES, LogCapture, log_dir
from bridge_sft.console.describe import (
    _add_summaries,
    _architecture,
    describe_data,
    describe_run,
    format_duration,
    runtime_description,
    summary_rows,
)
from bridge_sft.console.harmless import (
    _DIAGNOSTIC_LINE,
    _ERROR_LINE,
    _EVERY_RANK_WARNINGS,
    _HARMLESS,
    HARMLESS,
    LineFilter,
    is_harmless,
)
from bridge_sft.console.session import TrainConsole, _RecordHandler, _short, progress_callbacks
from bridge_sft.console.terminal import PLAIN_LINE_SECONDS, Terminal

__all__ = [
    "FAILURE_TAIL_LINES", "HARMLESS", "PLAIN_LINE_SECONDS", "LineFilter", "LogCapture", "Terminal", "TrainConsole",
    "describe_data", "describe_run", "format_duration", "is_harmless", "log_dir", "progress_callbacks",
    "runtime_description", "summary_rows",
    "_ANSI", "_DIAGNOSTIC_LINE", "_ERROR_LINE", "_EVERY_RANK_WARNINGS", "_HARMLESS", "_RecordHandler",
    "_add_summaries", "_architecture", "_short",
]
