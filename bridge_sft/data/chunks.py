"""Records read in chunks: the unit of work of the encoding processes.

``_chunks(sources, options)`` reads every source in order (``iter_source``) and yields
``_Chunk``s of at most ``CHUNK_RECORDS`` raw records, each with the source's index, the
source, and its format: ``options.format``, or with ``"auto"`` the format of the source's
first recognisable record (``_detect``; records read before it ride in the first chunk).
While the format is unknown, every ``CHUNK_RECORDS`` records that tell nothing go out as an
``"auto"`` chunk (the encoder reports each of them) and detection goes on. Records keep
their index, for their location.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from bridge_sft.data.errors import RecordError
from bridge_sft.data.formats import apply_columns, detect_format
from bridge_sft.data.options import EncodeOptions
from bridge_sft.data.sources import Source, iter_source, parse_raw

CHUNK_RECORDS = 256


@dataclass
class _Chunk:
    source_index: int
    source: Source
    fmt: str
    items: list[tuple[int, Any]]



def _chunks(sources: list[Source], options: EncodeOptions) -> Iterator[_Chunk]:
    for s, source in enumerate(sources):
        fmt = options.format
        items: list[tuple[int, Any]] = []
        pending: list[tuple[int, Any]] = []  # records read before the format is known
        for index, raw in iter_source(source):
            if fmt == "auto":
                pending.append((index, raw))
                fmt = _detect(source, index, raw, options)
                if fmt == "auto":
                    if len(pending) >= CHUNK_RECORDS:  # nothing recognisable yet: let workers report them
                        yield _Chunk(s, source, "auto", pending)
                        pending = []
                    continue
                items, pending = pending, []
            else:
                items.append((index, raw))
            if len(items) >= CHUNK_RECORDS:
                yield _Chunk(s, source, fmt, items)
                items = []
        if pending:
            yield _Chunk(s, source, fmt, pending)
        if items:
            yield _Chunk(s, source, fmt, items)


def _detect(source: Source, index: int, raw: Any, options: EncodeOptions) -> str:
    """The format of a source from its first readable record ("auto" if this one tells nothing)."""
    try:
        record = parse_raw(raw, source, index)
    except RecordError:
        return "auto"
    if not isinstance(record, dict):
        return "auto"
    fmt = detect_format(apply_columns(record, options.columns))
    return fmt or "auto"
