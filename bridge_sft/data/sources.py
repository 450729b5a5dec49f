"""Data sources: user-given paths resolved into sources, and their records read with locations.

``resolve_sources(paths)`` turns paths into ``Source`` objects: local ``.jsonl``, ``.json``
(a list of records, or JSON lines), ``.parquet`` files, directories written by ``datasets``'
``save_to_disk`` (``load_from_disk``), directories of such files, and Hugging Face hub
dataset ids (``org/name`` or ``org/name:split``) when the machine is online; a path that is
none of these is a ``DataError``. ``source_fingerprint_parts`` names the files whose bytes
identify a source (the cache key hashes them).

``iter_source(source)`` yields ``(index, raw)`` per record: JSON text lines for ``.jsonl``
(1-based line numbers, blank lines skipped), parsed objects otherwise (0-based), or a
``BadLine`` where a record cannot even be read as text. ``location(source, index)`` names a
record (``file:line`` for JSON lines, ``file: record N`` otherwise); ``parse_raw`` turns a
raw record into an object, raising that record's ``RecordError`` (with its location).

Reading never ends in a traceback: text files are UTF-8, with or without a byte-order mark;
a file in UTF-16/32 is a ``DataError`` saying how to convert it; a JSON line that is not
UTF-8 (Latin-1, cp1252 ...), not JSON, nested deeper than ``MAX_DEPTH``, or holding an
unpaired surrogate escape is a ``RecordError`` of that record (``json_text``); unreadable
files are ``DataError``.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bridge_sft.data.errors import DataError, RecordError
from bridge_sft.data.json_text import _SURROGATE_ESCAPE, MAX_DEPTH, _clip, _loads, check_value

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
              b"\xfe\xff": "UTF-16"}


# --------------------------------------------------------------------------- paths -> sources


@dataclass(frozen=True)
class Source:
    """One data source. ``kind``: ``jsonl``, ``json``, ``parquet``, ``hf_disk`` or ``hf_hub``."""

    path: str
    kind: str
    split: str | None = None

    @property
    def name(self) -> str:
        return self.path if self.split is None else f"{self.path}:{self.split}"


def resolve_sources(paths: str | list[str]) -> list[Source]:
    """Expand user-given paths into sources; raise ``DataError`` for paths that cannot be read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    sources: list[Source] = []
    for raw in paths:
        path = os.path.expanduser(str(raw))
        if os.path.isdir(path):
            if _is_hf_disk_dir(path):
                sources.append(Source(path, "hf_disk"))
                continue
            files = sorted(
                str(p) for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
            )
            if not files:
                raise DataError(
                    f"{path}: the directory has no .jsonl/.json/.parquet files and is not a dataset saved with "
                    "datasets' save_to_disk()"
                )
            sources += [Source(f, _kind(f)) for f in files]
        elif os.path.isfile(path):
            sources.append(Source(path, _kind(path)))
        else:
            repo, _, split = path.partition(":")
            if _looks_like_hub_id(repo):
                sources.append(Source(repo, "hf_hub", split or "train"))
            else:
                raise DataError(f"{path}: no such file or directory")
    return sources


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .parquet")


def _is_hf_disk_dir(path: str) -> bool:
    p = Path(path)
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def source_fingerprint_parts(source: Source) -> list[str]:
    """Files whose contents identify a source (for the cache key); hub sources use their id."""
    if source.kind == "hf_hub":
        return []
    if source.kind == "hf_disk":
        return sorted(str(p) for p in Path(source.path).rglob("*") if p.is_file())
    return [source.path]


# --------------------------------------------------------------------------- sources -> raw records with locations


@dataclass(frozen=True)
class BadLine:
    """A raw record that could not even be read as text (``iter_source`` yields it in place of the
    text; ``parse_raw`` raises it as that record's ``RecordError``)."""

    reason: str
    message: str


def iter_source(source: Source) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, raw)`` for each record: raw JSON text lines for ``.jsonl``
    (index = 1-based line number; blank lines are skipped; a line that is not UTF-8
    is a ``BadLine``), dicts otherwise (0-based). Unreadable files raise ``DataError``."""
    try:
        if source.kind == "jsonl":
            yield from _iter_jsonl(source.path)
        elif source.kind == "json":
            yield from _iter_json(source.path)
        elif source.kind == "parquet":
            yield from _iter_parquet(source.path)
        elif source.kind == "hf_disk":
            yield from enumerate(_load_from_disk(source.path))
        elif source.kind == "hf_hub":
            yield from enumerate(_load_hub(source))
        else:  # pragma: no cover - resolve_sources only makes the kinds above
            raise DataError(f"{source.path}: unknown source kind {source.kind}")
    except OSError as exc:
        raise DataError(f"{source.path}: cannot read the file ({exc.strerror or exc})") from None


def location(source: Source, index: int) -> str:
    """Human-readable place of a record, for error messages."""
    if source.kind == "jsonl":
        return f"{source.name}:{index}"
    return f"{source.name}: record {index}"


def parse_raw(raw: Any, source: Source, index: int) -> Any:
    """A raw JSON-lines text becomes an object (``RecordError`` if it is not JSON, nested deeper
    than ``MAX_DEPTH`` or holds unpaired surrogate escapes); a ``BadLine`` raises its error."""
    if isinstance(raw, BadLine):
        raise RecordError(raw.reason, raw.message, location(source, index))
    if not isinstance(raw, str):
        return raw
    try:
        value = _loads(raw)
    except RecordError as exc:
        raise exc.at(location(source, index)) from None
    return value


def _check_text_encoding(path: str, head: bytes) -> None:
    """Reject UTF-16/32 files (by byte-order mark, or by the NUL bytes of ASCII text in them)."""
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {name} (it starts with a {name} byte-order mark); bridge-sft "
                            f"reads UTF-8 (with or without a byte-order mark). Convert it, e.g. "
                            f"iconv -f {name} -t UTF-8 {path} > converted{Path(path).suffix}")
    if head.count(b"\x00") > len(head) // 4:
        raise DataError(f"{path}: the file looks like UTF-16 or UTF-32 text without a byte-order mark (a quarter "
                        f"of its first bytes are NUL); bridge-sft reads UTF-8. Convert it, e.g. "
                        f"iconv -f UTF-16LE -t UTF-8 {path} > converted{Path(path).suffix}")


def _not_utf8(path: str, data: bytes, exc: UnicodeDecodeError) -> str:
    column = len(data[: exc.start].decode("utf-8", errors="replace")) + 1
    return (f"the text is not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); the file is probably "
            "in another encoding (Latin-1, Windows-1252 ...): convert it to UTF-8, e.g. iconv -f WINDOWS-1252 "
            f"-t UTF-8 {path} > converted{Path(path).suffix}")


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096)
        _check_text_encoding(path, head)
        f.seek(len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0)
        for lineno, data in enumerate(f, 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, BadLine("not_utf8", _not_utf8(path, data, exc))
                continue
            if line.strip():
                yield lineno, line


def _iter_json(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        raw = f.read()
    _check_text_encoding(path, raw[:4096])
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        lineno = raw.count(b"\n", 0, exc.start) + 1
        line = raw[line_start: raw.find(b"\n", exc.start) if b"\n" in raw[exc.start:] else len(raw)]
        shifted = UnicodeDecodeError(exc.encoding, line, exc.start - line_start, exc.end - line_start, exc.reason)
        raise DataError(f"{path}:{lineno}: {_not_utf8(path, line, shifted)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file holding JSON lines is common: read it as such if every line parses.
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                data = [_loads(line) for line in lines]
            except RecordError:
                data = None
            if data is not None:
                yield from enumerate(data)
                return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested deeper than Python can read; records need < {MAX_DEPTH} "
                        "levels") from None
    except ValueError as exc:
        raise DataError(f"{path}: the JSON cannot be read: {_clip(str(exc))}") from None
    if isinstance(data, dict):
        for key in ("data", "train", "records", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
    check_text = _SURROGATE_ESCAPE.search(text) is not None or text.count("[") + text.count("{") > MAX_DEPTH
    for index, record in enumerate(data):
        if check_text:
            try:
                check_value(record)
            except RecordError as exc:
                yield index, BadLine(exc.reason, exc.detail)
                continue
        yield index, record


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read the Parquet file ({_clip(str(exc))})") from None
    index = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except Exception as exc:  # a corrupt row group, an unsupported type ...
        raise DataError(f"{path}: cannot read the Parquet file after record {index} "
                        f"({type(exc).__name__}: {_clip(str(exc))})") from None


def _load_from_disk(path: str):
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:  # missing/corrupt arrow files, incompatible versions ...
        raise DataError(f"{path}: cannot load the saved dataset ({type(exc).__name__}: {_clip(str(exc))})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(
                f"{path}: the saved DatasetDict has no 'train' split (splits: {', '.join(data)}); "
                "point at the split's own directory"
            )
        data = data["train"]
    return data


def _load_hub(source: Source):
    import datasets

    try:
        return datasets.load_dataset(source.path, split=source.split)
    except Exception as exc:  # offline, missing dataset, missing split ...
        raise DataError(
            f"{source.path}: not a local file or directory, and loading it as a Hugging Face hub dataset "
            f"(split {source.split!r}) failed: {type(exc).__name__}: {exc}"
        ) from None

