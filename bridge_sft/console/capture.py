"""The per-rank log: everything the process writes, complete and unfiltered.

``LogCapture`` redirects file descriptors 1 and 2 into pipes that a reader thread copies to
``OUTPUT_DIR/logs/rank{RANK}.log`` (so Bridge's and megatron-core's prints, C++ messages and
forked children's output land there too), and hands each complete line to the console's filter.
Output produced before the log's path is known (imports, recipe resolution) is kept in memory
and written first. Only the process that started the capture reads the pipes.
"""

from __future__ import annotations

import os
import re
import select
import sys
import threading
import time
from collections import deque
from pathlib import Path

FAILURE_TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def log_dir(config) -> Path:
    """``OUTPUT_DIR/logs``: beside the run's checkpoints (or TensorBoard logs)."""
    anchor = config.checkpoint.save or config.logger.tensorboard_dir
    return Path(anchor).parent / "logs" if anchor else Path("bridge-sft-logs")


class LogCapture:
    """fds 1 and 2 -> pipes -> the log; ``on_line(stream, line)`` for each line (ANSI codes and
    carriage-return redraws removed), ``echo(stream, text)`` for raw output when set (``verbose``).
    ``lock`` is the session's: the log keeps the order in which things were written."""

    def __init__(self, lock, on_line, echo=None):
        self._lock = lock
        self._on_line = on_line
        self._echo = echo
        self.log_path: Path | None = None
        self.pid = os.getpid()
        self._buffer = bytearray()  # log content before the log file is open
        self._recent: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)  # when there is no log file
        self._log = None
        self._pipes: dict[int, str] = {}
        self._partial = {"stdout": "", "stderr": ""}
        self.active = False
        self._finished = False

    def start(self) -> None:
        """Redirect fds 1 and 2 into pipes and start the reader thread."""
        self._saved_fds = {1: os.dup(1), 2: os.dup(2)}
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.dup2(write, fd)
            os.close(write)
            self._pipes[read] = stream
        self._line_buffering = getattr(sys.stdout, "line_buffering", None)
        if self._line_buffering is False:
            sys.stdout.reconfigure(line_buffering=True)  # prints reach the log (and a failure's tail) at once
        self.active = True
        self._reader = threading.Thread(target=self._pump, name="bridge-sft-console", daemon=True)
        self._reader.start()

    def release(self) -> None:
        """Restore fds 1 and 2 and drain the pipes into the log (which stays open until ``close``)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.active = False  # the reader drains what is left and stops
        self._reader.join(timeout=5)
        with self._lock:
            for read in list(self._pipes):
                os.close(read)
            self._pipes.clear()
            for stream, rest in self._partial.items():
                if rest:
                    self._line(stream, rest)
                    self._partial[stream] = ""
        if self._line_buffering is False:
            sys.stdout.reconfigure(line_buffering=False)

    def close(self) -> None:
        """Nothing more is written to the log; close it."""
        with self._lock:
            self._finished = True
            if self._log is not None:
                self._log.close()
                self._log = None

    def open_log(self, directory: str | Path, command: str, rank: int) -> Path:
        """Write the log to ``directory/rank{rank}.log`` (appended: a resumed run keeps its history)."""
        with self._lock:
            path = Path(directory) / f"rank{rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "ab", buffering=0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._log.write(f"===== bridge-sft {command}, rank {rank}, pid {os.getpid()}, {stamp} =====\n".encode())
            self._log.write(bytes(self._buffer))
            self._buffer.clear()
            self.log_path = path
        return path

    def write(self, text: str) -> None:
        """Append ``text`` to the log after whatever the pipes already hold (so the order is kept)."""
        if os.getpid() != self.pid:  # a forked child: through the pipe, to the parent's reader
            sys.stderr.write(text)
            return
        with self._lock:
            if self.active:
                self._drain()
            self._write_log(text.encode("utf-8", "replace"))

    def tail(self, n: int = FAILURE_TAIL_LINES) -> list[str]:
        """The last ``n`` lines of this rank's log (what is kept in memory if there is no log file)."""
        if self.log_path is None or not self.log_path.exists():
            return list(self._recent)[-n:]
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))
            text = f.read().decode("utf-8", "replace")
        lines = [_ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in text.splitlines()]
        return lines[-n:]

    # ------------------------------------------------------------------ the reader

    def _write_log(self, data: bytes) -> None:
        if self._finished:
            return
        if self._log is not None:
            self._log.write(data)
        else:
            self._buffer += data
            if len(self._buffer) > 64 << 20:  # imports never print this much; keep the newest part
                del self._buffer[: len(self._buffer) - (32 << 20)]

    def _pump(self) -> None:
        """Reader thread: copy the pipes to the log and pass their lines on."""
        while True:
            with self._lock:
                pipes = list(self._pipes)
            if not pipes:
                return
            try:
                ready, _, _ = select.select(pipes, [], [], 0.1)
            except (OSError, ValueError):  # closed by release() after its timeout
                return
            with self._lock:
                got = self._drain(ready)
            if not got and not self.active:
                return

    def _drain(self, ready: list[int] | None = None) -> bool:
        """Read what the pipes hold now (caller holds the lock). True if anything was read."""
        got = False
        for read in list(ready if ready is not None else self._pipes):
            if read not in self._pipes:
                continue
            while True:
                try:
                    data = os.read(read, 1 << 16)
                except BlockingIOError:
                    break
                if not data:  # every writer closed it
                    break
                got = True
                self._write_log(data)
                if self._echo is not None:
                    self._echo(self._pipes[read], data.decode("utf-8", "replace"))
                self._lines(self._pipes[read], data.decode("utf-8", "replace"))
        return got

    def _lines(self, stream: str, text: str) -> None:
        text = self._partial[stream] + text
        *lines, self._partial[stream] = text.split("\n")
        for line in lines:
            self._line(stream, line)

    def _line(self, stream: str, line: str) -> None:
        line = _ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])  # the last redraw of a \r progress line
        self._recent.append(line)
        self._on_line(stream, line)
