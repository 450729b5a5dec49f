"""What the benchmarks share: median wall time, peak RSS of a region, Markdown tables, the command line.

Peak memory on the CPU is the process's resident-set high-water mark (VmHWM),
reset before each measured region through ``/proc/self/clear_refs`` (Linux),
minus the resident set at the start of the region: the extra memory the region
needed at its peak. Large tensors are mmap-allocated by glibc and return to the
OS when freed, so consecutive regions in one process do not hide each other.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]

_STATUS = "/proc/self/status"


def _status_mb(field: str) -> float:
    with open(_STATUS) as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_rss_mb(fn: Callable[[], object]) -> float:
    """Extra resident memory (MiB) ``fn()`` needs at its peak."""
    _release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - start


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table_lines(header: list[str], rows: Iterable[Iterable]) -> list[str]:
    """A Markdown table as lines: ``| h1 | h2 |``, the rule ``|---|---|``, then ``| c1 | c2 |`` per row
    (each cell ``str()``-ed as it is: format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return "\n".join(table_lines(columns, ([cell(row.get(c, "")) for c in columns] for row in rows)))


def main(doc: str, run: Callable[..., list[dict]], markdown: Callable[[list[dict]], str], *, quick_help: str | None,
         options: Iterable[tuple[str, dict]] = (), worker: Callable[[str], None] | None = None,
         argv: list[str] | None = None) -> None:
    """A benchmark's command line: prints ``markdown(run(quick=..., **options))``.

    The parser's description is ``doc``'s first line; ``--quick`` (help ``quick_help``) and each of
    ``options`` (``(flag, add_argument keywords)``) become ``run``'s keyword arguments. With ``worker``, a
    hidden ``--worker SPEC`` runs ``worker(SPEC)`` instead (a benchmark's own child process).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    if worker is not None:
        parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    spec = args.pop("worker", None)
    if spec:
        worker(spec)
        return
    print(markdown(run(**args)))


def run_worker(script: str | Path, spec: dict, spec_path: Path, what: str) -> None:
    """Write ``spec`` as JSON to ``spec_path`` and run ``python script --worker spec_path`` in a child process
    (from the repository root, the repository on ``PYTHONPATH``); a failure raises ``RuntimeError`` with
    ``f"{what} failed:"`` and the last 4,000 characters of its output."""
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), "--worker", str(spec_path)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-4000:]}")
