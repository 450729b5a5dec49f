"""What the person sees: lines, and one live progress line on a terminal (plain periodic lines otherwise).

``Terminal`` writes to copies of the process's file descriptors 1 and 2 taken before the log
capture redirects them (``open``), so its lines reach the person while everything else the process
writes goes to the log. On a terminal it draws with ``rich``: lines above a live progress line (or
a transient spinner while Bridge sets up); without one, the progress callback's plain lines.
"""

from __future__ import annotations

import os
import sys
import time

# Without a terminal, a plain progress line at least this often (the progress callback's rule).
PLAIN_LINE_SECONDS = 60


class Terminal:
    """The console's drawing surface; ``lock`` is the session's (lines and the log keep one order)."""

    def __init__(self, lock, draws: bool, verbose: bool, rank: int):
        self._lock = lock
        self.draws = draws  # header, progress, summary (rank 0)
        self.verbose = verbose
        self.rank = rank
        self.shown: dict[str, int] = {}
        self._out = None  # until open()
        self._label_width = 12
        self._bar = None
        self._progress_task = None
        self._drawn = 0.0  # when the progress line was last redrawn

    def open(self) -> None:
        """Take copies of fds 1 and 2 (call before they are redirected)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._out = open(os.dup(1), "w", encoding="utf-8", errors="replace", buffering=1)
        self._err = open(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
        self.tty = self._out.isatty()
        same = self._err.isatty() and os.path.samestat(os.fstat(self._out.fileno()), os.fstat(self._err.fileno()))
        self._errors_to_out = same  # one terminal: warnings go through the progress display, not around it
        if self.tty:
            from rich.console import Console

            self._rich = Console(file=self._out, force_terminal=True, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._out.close()
        self._err.close()

    # ------------------------------------------------------------------ lines

    def show(self, text: str, style: str | None = None, error: bool = False) -> None:
        """One line on the console (above the progress line on a terminal); the log is the caller's."""
        if self._out is None:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)
            return
        with self._lock:
            if self.tty and (not error or self._errors_to_out):
                self._rich.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
            else:
                stream = self._err if error else self._out
                stream.write(text + "\n")
                stream.flush()

    def show_once(self, text: str, style: str | None = None, error: bool = False) -> None:
        """``show`` once per distinct text (counted in ``shown`` after that); other ranks' lines say the rank."""
        with self._lock:
            self.shown[text] = self.shown.get(text, 0) + 1
            if self.shown[text] == 1:
                self.show(text if self.rank == 0 else f"[rank {self.rank}] {text}", style=style, error=error)

    def echo(self, stream: str, text: str) -> None:
        """``verbose``: raw output as the process wrote it, to the stream it wrote it to."""
        target = self._out if stream == "stdout" else self._err
        target.write(text)
        target.flush()

    def row_text(self, label: str, value: str) -> str:
        """``  label  value``, the label aligned with the widest one of the tables so far."""
        return f"  {label.ljust(self._label_width)}  {value}"

    def widen_labels(self, labels: list[str]) -> None:
        self._label_width = max([len(label) for label in labels] + [self._label_width])

    # ------------------------------------------------------------------ progress

    def start_status(self, text: str) -> None:
        """A transient spinner with ``text`` on a terminal until the next status, progress line or stop."""
        if not self.draws or self.verbose or not self.tty:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        with self._lock:
            self.end_progress()
            self._bar = Live(Spinner("dots", text=text, style="bold"), console=self._rich, transient=True,
                             refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
            self._bar.start()

    def start_progress(self, total: int, done: int, description: str = "train") -> None:
        if not self.draws or self.verbose or not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with self._lock:
            self.end_progress()
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), console=self._rich,
                                 auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False)
            self._progress_task = self._bar.add_task(description, total=total, completed=done, stats="")
            self._bar.start()
            self._bar.refresh()

    def update_progress(self, done: int, stats: str, plain_line: str | None) -> None:
        """Move the live line to ``done`` with ``stats`` (terminal); print ``plain_line`` (no terminal)."""
        if not self.draws or self.verbose:
            return
        if self._progress_task is not None:
            with self._lock:
                self._bar.update(self._progress_task, completed=done, stats=stats)
                now = time.monotonic()
                if now - self._drawn >= 0.1 or done == self._bar.tasks[0].total:  # at most 10 redraws a second
                    self._bar.refresh()
                    self._drawn = now
        elif not self.tty and plain_line is not None:
            self.show(plain_line)

    def end_progress(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.refresh()
                self._bar.stop()
                self._bar = self._progress_task = None
