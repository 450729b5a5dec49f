"""``TrainConsole``: the console session of one process, tying the log, the filter and the terminal.

Inside the session, everything the process writes goes to its log (``capture.LogCapture``);
Python warnings and logging records are written to the log as they are emitted and, with the
raw output lines, filtered (``harmless``) onto the console (``terminal.Terminal``). A failure
prints the last lines of the log and its path, on whichever rank failed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path

from bridge_sft.console.capture import FAILURE_TAIL_LINES, LogCapture
from bridge_sft.console.harmless import _EVERY_RANK_WARNINGS, LineFilter, is_harmless
from bridge_sft.console.terminal import Terminal


class _RecordHandler(logging.Handler):
    """The root logger's only handler during a session: every record to the log, some to the console."""

    def __init__(self, console: "TrainConsole"):
        super().__init__(logging.NOTSET)
        self.console = console
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))  # Bridge's format: LEVEL:name:message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 (logging's own contract)
            self.handleError(record)
            return
        self.console._on_record(record, text)


class TrainConsole:
    """The console session of one process (see ``bridge_sft.console``).

    Use as a context manager around the whole command; ``open_log(directory)`` once the
    run's output folder is known. On an exception other than ``passthrough`` (user errors,
    Ctrl-C, ``SystemExit``) the console prints the failure report, swallows the exception
    and sets ``failed``; the command then exits with status 1.
    """

    def __init__(self, command: str = "train", verbose: bool = False, rank: int | None = None,
                 passthrough: tuple[type[BaseException], ...] = ()):
        self.command = command
        self.verbose = verbose
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.draws = self.rank == 0  # header, progress, summary
        self.passthrough = (KeyboardInterrupt, SystemExit, *passthrough)
        self.failed = False
        self.hidden = 0  # known-harmless messages not shown
        self._lock = threading.RLock()
        self.terminal = Terminal(self._lock, self.draws, verbose, self.rank)
        self._filter = LineFilter(self.rank)
        self._capture = LogCapture(self._lock, self._raw_line, echo=self.terminal.echo if verbose else None)

    @property
    def log_path(self) -> Path | None:
        return self._capture.log_path

    @property
    def shown(self) -> dict[str, int]:
        return self.terminal.shown

    # ------------------------------------------------------------------ session

    def __enter__(self) -> "TrainConsole":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None or issubclass(exc_type, self.passthrough):
                self.stop()
                return False
            self._capture.write("".join(traceback.format_exception(exc_type, exc, tb)))
            self.stop()
            if self.verbose:
                return False  # Python prints the traceback as it always did; the log has it too
            self.failed = True
            self._failure_report(exc_type, exc)
            return True
        finally:
            self.terminal.close()

    def start(self) -> None:
        """Redirect fds 1 and 2 into the log (and, filtered, the console); install the hooks."""
        self.terminal.open()
        self._capture.start()
        if not self.verbose:
            self._saved_showwarning = warnings.showwarning
            warnings.showwarning = self._on_warning
            root = logging.getLogger()
            self._saved_root = (root.handlers[:], root.level)
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            self._handler = _RecordHandler(self)
            root.addHandler(self._handler)  # megatron's later logging.basicConfig(...) is then a no-op
            root.setLevel(logging.INFO)  # as that basicConfig would

    def stop(self) -> None:
        """Stop the progress line, drain the pipes into the log, restore the process's fds and hooks."""
        if not self._capture.active:
            return
        self.end_progress()
        self._capture.release()
        if not self.verbose:
            warnings.showwarning = self._saved_showwarning
            root = logging.getLogger()
            root.removeHandler(self._handler)
            handlers, level = self._saved_root
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)
        self._capture.close()

    def configure(self, config) -> None:
        """Bridge settings for a console session: keep WARNING records (Bridge's ``logger.filter_warnings``
        drops them all; here every warning goes to the log and the allow-list decides what is shown)."""
        if not self.verbose:
            config.logger.filter_warnings = False

    def open_log(self, directory: str | Path) -> Path:
        """Write the log to ``directory/rank{RANK}.log`` (appended: a resumed run keeps its history)."""
        return self._capture.open_log(directory, self.command, self.rank)

    # ------------------------------------------------------------------ what the person sees

    def say(self, text: str = "", style: str | None = None, error: bool = False) -> None:
        """Print a line on the console (above the progress line on a terminal); also to the log."""
        self._capture.write(text + "\n")
        self.terminal.show(text, style=style, error=error)

    def warn(self, text: str) -> None:
        """A warning line on the console, shown once per distinct text (counted after that)."""
        self.terminal.show_once(text, style="yellow", error=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """``title`` and aligned ``label  value`` lines (the header, the summary)."""
        if not self.draws:
            return
        self.say(title, style="bold")
        self.terminal.widen_labels([label for label, _ in rows])
        for label, value in rows:
            self.row(label, value)

    def row(self, label: str, value: str) -> None:
        """One ``label  value`` line, aligned with the last ``table``."""
        if self.draws:
            self.say(self.terminal.row_text(label, value))

    def start_status(self, text: str) -> None:
        """A transient spinner with ``text`` on a terminal until the next status, progress line or stop."""
        self.terminal.start_status(text)

    def start_progress(self, total: int, done: int, description: str = "train") -> None:
        self.terminal.start_progress(total, done, description)

    def update_progress(self, done: int, stats: str, plain_line: str | None) -> None:
        """Move the live line to ``done`` with ``stats`` (terminal); print ``plain_line`` (no terminal)."""
        self.terminal.update_progress(done, stats, plain_line)

    def end_progress(self) -> None:
        self.terminal.end_progress()

    # ------------------------------------------------------------------ the filters

    def _raw_line(self, stream: str, line: str) -> None:
        """A raw output line (already in the log): to the console if the filter says so."""
        if self.verbose or not line.strip():
            return
        show = self._filter.decide(stream, line)
        if show is False:
            self.hidden += 1
        elif show:
            self.terminal.show(line, error=True)

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """``warnings.showwarning`` during a session."""
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if os.getpid() != self._capture.pid:
            sys.stderr.write(text)
            return
        self._capture.write(text)
        if is_harmless(str(message)):
            self.hidden += 1
        elif self.rank == 0:
            self.terminal.show_once(f"warning: {category.__name__}: {message} ({_short(filename)}:{lineno})",
                                    style="yellow", error=True)

    def _on_record(self, record: logging.LogRecord, text: str) -> None:
        if os.getpid() != self._capture.pid:
            sys.stderr.write(text + "\n")
            return
        self._capture.write(text + "\n")
        if record.levelno >= logging.ERROR:
            where = " (traceback in the log)" if record.exc_info else ""
            self.terminal.show_once(f"{record.levelname.lower()}: {record.getMessage()}{where}", style="bold red",
                                    error=True)
        elif record.levelno >= logging.WARNING:
            if is_harmless(record.getMessage()):
                self.hidden += 1
            elif self.rank == 0 or record.name.startswith(_EVERY_RANK_WARNINGS):
                self.terminal.show_once(f"warning ({record.name}): {record.getMessage()}", style="yellow",
                                        error=True)

    # ------------------------------------------------------------------ failure

    def tail(self, n: int = FAILURE_TAIL_LINES) -> list[str]:
        """The last ``n`` lines of this rank's log (what is kept in memory if there is no log file)."""
        return self._capture.tail(n)

    def _failure_report(self, exc_type, exc) -> None:
        show = self.terminal.show
        where = f"rank {self.rank}" + (f" (pid {os.getpid()})" if self.rank == 0 else "")
        show(f"bridge-sft {self.command} failed on {where}: {exc_type.__name__}: {exc}", style="bold red", error=True)
        lines = self.tail()
        source = self.log_path or "this process's output"
        show(f"last {len(lines)} lines of {source}:", error=True)
        for line in lines:
            show(f"  | {line}", error=True)
        if self.log_path is not None:
            show(f"full log: {self.log_path}", style="bold", error=True)


def _short(path: str) -> str:
    """``site-packages/x/y.py`` -> ``x/y.py``."""
    return path.split("site-packages/", 1)[-1]


def progress_callbacks(console: TrainConsole) -> list:
    """``[TokenThroughput, Progress]`` for ``bridge_sft.train.run(callbacks=...)``; the Progress is last."""
    from bridge_sft.callbacks import Progress, TokenThroughput

    throughput = TokenThroughput()
    return [throughput, Progress(console, throughput)]
