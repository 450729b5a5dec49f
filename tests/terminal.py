"""Run a command on a pseudo-terminal, and read back the screen a person would see.

``run_in_pty`` gives the command a real terminal (``isatty()`` is true for its stdin,
stdout and stderr; 200 columns), so it draws what it draws on a terminal: live
progress lines, colours, spinners. ``screen`` replays that output the way a terminal
does (carriage returns, cursor-up, erase-line) and returns the lines left on the
screen: a progress line redrawn a hundred times is one line there.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

COLUMNS = 200
# What the console of a clean run must not contain: warning or error lines, tracebacks, the known-harmless
# noise of a CPU / no-TE run (which only the log holds).
ALARMING = re.compile(r"^(warning|error)\b|traceback|deprecat|experimental|Transformer Engine and", re.I | re.M)
_CONTROL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[()][A-Za-z0-9]|\r|\n|[^\x1b\r\n]+|\x1b")


def run_in_pty(argv: list[str], cwd, env: dict[str, str], timeout: float = 900) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr; return (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env={**env, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS)},
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise TimeoutError(f"{argv} ran for more than {timeout} s; output so far:\n{out.decode()[-3000:]}")
        return proc.wait(timeout=60), out.decode("utf-8", "replace")
    finally:
        os.close(master)


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after receiving ``raw`` (trailing empty lines dropped)."""
    lines, row, col = [""], 0, 0
    for match in _CONTROL.finditer(raw):
        token = match.group(0)
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif match.group(2) == "A":  # cursor up
            row = max(0, row - int(match.group(1) or 1))
        elif match.group(2) == "K":  # erase in line
            lines[row] = "" if match.group(1) == "2" else lines[row][:col] if match.group(1) in ("", "0") \
                else lines[row]
        elif token.startswith("\x1b"):  # colours, cursor visibility, ...
            continue
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.rstrip() for line in lines]
