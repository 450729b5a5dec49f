"""Measurement helpers shared by the benchmarks: median wall time, peak RSS of a region, tables.

Peak memory on the CPU is the process's resident-set high-water mark (VmHWM),
reset before each measured region through ``/proc/self/clear_refs`` (Linux),
minus the resident set at the start of the region: the extra memory the region
needed at its peak. Large tensors are mmap-allocated by glibc and return to the
OS when freed, so consecutive regions in one process do not hide each other.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from typing import Callable

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


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
