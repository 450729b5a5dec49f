"""The two errors every data problem is reported as.

``DataError``: bad input data or settings; the message names the file or record and the fix.
It ends a run (``bridge-sft data prepare`` exits 2 with that one line). ``RecordError``: one
bad record, a ``DataError`` with a short ``reason`` (the category ``on_bad_record="skip"``
counts it under), the ``detail`` without the location, and the ``location`` once known
(``at`` adds it). Both are importable from ``bridge_sft.data`` and ``bridge_sft.data.formats``.

This module imports neither torch nor megatron.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or settings; the message names the file/record and the fix."""


class RecordError(DataError):
    """One bad record. ``reason`` is a short category used to count skipped records."""

    def __init__(self, reason: str, message: str, location: str | None = None):
        self.reason = reason
        self.detail = message
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)

    def at(self, location: str) -> "RecordError":
        return RecordError(self.reason, self.detail, location)
