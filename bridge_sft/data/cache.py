"""Preprocessing: read chat data, encode it (in parallel), apply the truncation
policy, and store the result as memory-mapped arrays keyed by a content hash.

``prepare(paths, options, cache_dir=...)`` returns ``PreparedData``: all samples'
token ids concatenated (``input_ids``, uint32), their unshifted 0/1
``loss_mask`` (uint8), ``offsets`` (int64 ``[num_samples + 1]``) and ``origins``
(int64 ``[num_samples, 2]``: source index, line/record index), plus a
``summary`` dict. With a ``cache_dir`` the arrays live in
``cache_dir/<name>-<key>/`` and later runs memory-map them; the key hashes the
data files' bytes, the tokenizer files, the chat template and every option
that changes the result (``cache_key``). Concurrent builders (all ranks of a
job call it) are serialised by a file lock; the directory appears atomically.

Bad records: ``on_bad_record="error"`` stops at the first one with its
location and the fix; ``"skip"`` skips it and counts it by reason
(``summary["skipped"]``). Too-long samples (more than ``seq_length + 1`` ids):
``truncation="drop"`` drops and counts them, ``"truncate"`` cuts them to
``seq_length + 1`` ids (and drops, counted, those left with no supervised
label), ``"error"`` stops, ``"split"`` cuts a long conversation at turn
boundaries into several samples that each fit, every assistant turn trained once
(``ChatEncoder.split_long``; a single exchange longer than ``seq_length + 1`` is
truncated, counted). Nothing is dropped without being counted. The summary reports
the supervised tokens each truncation policy would keep (``supervised_by_truncation``)
and the reasoning tokens each ``reasoning_history`` policy trains (``reasoning_tokens``).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bridge_sft.data.encoding import (
    EMPTY_THINK,
    REASONING_HISTORY,
    TRAIN_ON,
    ChatEncoder,
    TokenizerSpec,
    load_chat_template,
    load_tools,
)
from bridge_sft.data.formats import (
    FORMATS,
    Conversation,
    DataError,
    RecordError,
    Source,
    detect_format,
    apply_columns,
    iter_source,
    location,
    parse_raw,
    resolve_sources,
    source_fingerprint_parts,
    to_conversation,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the encoding rules change
TRUNCATION = ("split", "truncate", "drop", "error")
ON_BAD_RECORD = ("error", "skip")
CHUNK_RECORDS = 256
_FIX_SKIP = "fix the record, or set on_bad_record='skip' to skip and count bad records"
_TOKENIZER_FILES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".vocab")


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that decides the encoded samples (all plain values, part of the cache key)."""

    tokenizer_path: str
    seq_length: int
    train_on: str = "assistant"
    format: str = "auto"
    columns: dict[str, str] | None = None
    chat_template: str | None = None
    template_kwargs: dict[str, Any] | None = None
    empty_think: str = "mask"
    truncation: str = "truncate"
    on_bad_record: str = "error"
    train_reasoning: bool = True
    reasoning_history: str = "split"
    tools: list[dict[str, Any]] | str | None = None  # for records without their own 'tools' (list or JSON file)
    system_prompt: str | None = None  # put first in conversations without a system message

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.train_on not in TRAIN_ON:
            raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {self.train_on!r}")
        if self.empty_think not in EMPTY_THINK:
            raise DataError(f"empty_think must be one of {', '.join(EMPTY_THINK)}, not {self.empty_think!r}")
        if self.truncation not in TRUNCATION:
            raise DataError(f"truncation must be one of {', '.join(TRUNCATION)}, not {self.truncation!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise DataError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, not {self.on_bad_record!r}")
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise DataError(f"seq_length must be a positive integer, not {self.seq_length!r}")
        if self.reasoning_history not in REASONING_HISTORY:
            raise DataError(f"reasoning_history must be one of {', '.join(REASONING_HISTORY)}, "
                            f"not {self.reasoning_history!r}")
        if not isinstance(self.train_reasoning, bool):
            raise DataError(f"train_reasoning must be true or false, not {self.train_reasoning!r}")
        load_tools(self.tools)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise DataError(f"system_prompt must be a string, not {type(self.system_prompt).__name__}")


@dataclass
class PreparedData:
    """Encoded samples (see the module docstring); arrays may be memory-mapped."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    origins: np.ndarray
    sources: list[str]
    summary: dict[str, Any]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.loss_mask[a:b]

    def origin(self, i: int) -> str:
        src, index = (int(x) for x in self.origins[i])
        name = self.sources[src]
        return f"{name}:{index}" if name.endswith(".jsonl") else f"{name}: record {index}"


# --------------------------------------------------------------------------- cache key


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(sources: list[Source], options: EncodeOptions) -> str:
    """Hex digest over the data bytes, tokenizer files, template and options."""
    h = hashlib.blake2b(digest_size=16)
    # Paths are not part of the key, contents are: a relative and an absolute path to the same
    # tokenizer (or a template file and its text) give the same cache.
    keyed = asdict(options)
    keyed.pop("chat_template")
    tok = Path(options.tokenizer_path).expanduser()
    if tok.is_dir():
        keyed.pop("tokenizer_path")
    h.update(json.dumps({"version": CACHE_VERSION, "options": keyed}, sort_keys=True).encode())
    for source in sources:
        h.update(f"\0source {source.kind} {source.split}\0".encode())
        parts = source_fingerprint_parts(source)
        if not parts:
            h.update(source.path.encode())
        for part in parts:
            h.update(f"\0{os.path.basename(part)}\0".encode())
            _hash_file(h, part)
    if tok.is_dir():
        for p in sorted(tok.iterdir()):
            if p.is_file() and p.suffix in _TOKENIZER_FILES and p.name != "config.json":
                h.update(f"\0tokenizer {p.name}\0".encode())
                _hash_file(h, str(p))
    else:
        h.update(f"\0tokenizer id {options.tokenizer_path}\0".encode())
    template = load_chat_template(options.chat_template)
    h.update(f"\0template\0{template}".encode())
    if isinstance(options.tools, str):  # a file: its contents are part of the key
        h.update(json.dumps(load_tools(options.tools), sort_keys=True).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise DataError(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None


def make_encoder(options: EncodeOptions, tokenizer=None, templates: dict[str, str] | None = None) -> ChatEncoder:
    """The ``ChatEncoder`` these options describe (loads the tokenizer unless given, as an
    HF tokenizer or a ``TokenizerSpec``). ``templates``: the templates another encoder of
    these options chose (``ChatEncoder.templates``), used as they are."""
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(options.tokenizer_path)
    return ChatEncoder(
        tokenizer,
        chat_template=templates if templates is not None else load_chat_template(options.chat_template),
        template_kwargs=options.template_kwargs,
        train_on=options.train_on,
        empty_think=options.empty_think,
        train_reasoning=options.train_reasoning,
        reasoning_history=options.reasoning_history,
        name=options.tokenizer_path,
    )


def _init_worker(options: EncodeOptions, spec: TokenizerSpec, templates: dict[str, str]) -> None:
    """A worker's encoder, with the templates the main process chose (and announced)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["options"] = options
    _WORKER["encoder"] = make_encoder(options, spec, templates)


@dataclass
class _Chunk:
    source_index: int
    source: Source
    fmt: str
    items: list[tuple[int, Any]]


@dataclass
class _ChunkResult:
    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    origins: np.ndarray
    records: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_at: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    pad_id: int = 0
    # Counts of the samples/policies (see EncodedRecord): supervised labels kept by each
    # truncation policy, reasoning tokens trained by each reasoning_history policy.
    counts: dict[str, int] = field(default_factory=dict)


def _encode_chunk(
    chunk: _Chunk, options: EncodeOptions | None = None, encoder: ChatEncoder | None = None
) -> _ChunkResult:
    """Parse, validate, encode and truncate one chunk (in a worker, with its global encoder)."""
    options = options or _WORKER["options"]
    encoder = encoder or _WORKER["encoder"]
    max_ids = options.seq_length + 1
    empty = (np.empty(0, np.uint32), np.empty(0, np.uint8), np.empty(0, np.int64), np.empty((0, 2), np.int64))
    result = _ChunkResult(*empty)
    result.pad_id = encoder.spec.pad_id

    def bad(reason: str, where: str, message: str, fix: str) -> bool:
        """Record a bad record; return True if processing must stop."""
        if options.on_bad_record == "error":
            result.error = f"{where}: {message} ({fix})"
            return True
        result.skipped[reason] = result.skipped.get(reason, 0) + 1
        result.first_at.setdefault(reason, where)
        return False

    convs: list[tuple[int, Conversation]] = []
    default_tools = None  # options.tools, read once, at the first record without tools of its own
    for index, raw in chunk.items:
        result.records += 1
        where = location(chunk.source, index)
        try:
            record = parse_raw(raw, chunk.source, index)
            conv = to_conversation(record, chunk.fmt, options.columns, require_assistant=options.train_on != "all",
                                   system_prompt=options.system_prompt)
            if conv.tools is None and options.tools:
                if default_tools is None:
                    default_tools = load_tools(options.tools)
                conv.tools = default_tools
            convs.append((index, conv))
        except RecordError as exc:
            if bad(exc.reason, where, exc.detail, _FIX_SKIP):
                return result
        except DataError:
            raise
        except Exception as exc:  # a case the checks above do not know: still this record's error
            if bad("unexpected_error", where, _unexpected(exc), _FIX_SKIP):
                return result
    kept = _Samples(options, result, bad, chunk.source_index)
    split = options.truncation == "split"
    records = _encode_guarded(encoder, [c for _, c in convs], max_ids, split)
    for (index, _), record in zip(convs, records):
        where = location(chunk.source, index)
        if isinstance(record, RecordError):
            if bad(record.reason, where, record.detail, _FIX_SKIP):
                return result
            continue
        _count(result.counts, record)
        for ids, mask in record.samples:
            if _keep_sample(kept, ids, mask, where, index):
                return result
    if kept.ids:
        result.ids = np.concatenate(kept.ids).astype(np.uint32)
        result.mask = np.concatenate(kept.mask).astype(np.uint8)
        result.lengths = np.asarray(kept.lengths, dtype=np.int64)
        result.origins = np.asarray(kept.origins, dtype=np.int64).reshape(-1, 2)
    return result


def _count(counts: dict[str, int], record) -> None:
    for key in ("supervised_full", "supervised_truncate", "supervised_drop", "reasoning_trained",
                "reasoning_template", "reasoning_split", "split_long"):
        counts[key] = counts.get(key, 0) + getattr(record, key)
    counts["reasoning_pieces"] = counts.get("reasoning_pieces", 0) + record.split_pieces - 1
    if record.supervised_split is not None:
        counts["supervised_split"] = counts.get("supervised_split", 0) + record.supervised_split


@dataclass
class _Samples:
    """Where the samples of a chunk go: ``options``' length policy applied, losses counted in
    ``result``, bad records reported through ``bad`` (True: processing must stop), the kept
    samples and their origins (``source_index``, record index) gathered."""

    options: EncodeOptions
    result: _ChunkResult
    bad: Callable[[str, str, str, str], bool]
    source_index: int
    ids: list[np.ndarray] = field(default_factory=list)
    mask: list[np.ndarray] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)


def _keep_sample(samples: _Samples, ids: np.ndarray, mask: np.ndarray, where: str, index: int) -> bool:
    """Apply the length policy to one sample of record ``index`` and keep it; True if processing must stop."""
    options, result, bad = samples.options, samples.result, samples.bad
    max_ids = options.seq_length + 1
    if len(ids) < 2:
        if bad("too_short", where, "the conversation renders to fewer than 2 tokens", _FIX_SKIP):
            return True
        return False
    if len(ids) > max_ids:
        if options.truncation == "error":
            result.error = (
                f"{where}: the conversation is {len(ids)} tokens, more than seq_length + 1 = {max_ids} "
                "(raise seq_length, or set truncation='truncate' to cut long samples, 'split' to cut long "
                "conversations at turn boundaries or 'drop' to skip them)"
            )
            return True
        if options.truncation == "drop":
            result.dropped_too_long += 1
            result.first_at.setdefault("dropped_too_long", where)
            return False
        ids, mask = ids[:max_ids], mask[:max_ids]
        if not mask[1:].any():
            result.dropped_no_supervised += 1
            result.first_at.setdefault("dropped_no_supervised", where)
            return False
        result.truncated += 1
    if not mask[1:].any():
        if bad("no_supervised_tokens", where, "no token of the conversation is supervised", _FIX_SKIP):
            return True
        return False
    samples.ids.append(ids)
    samples.mask.append(mask)
    samples.lengths.append(len(ids))
    samples.origins.append((samples.source_index, index))
    return False
def _unexpected(exc: BaseException) -> str:
    text = str(exc)
    text = text if len(text) <= 200 else text[:197] + "..."
    return (f"unexpected {type(exc).__name__} while reading this record ({text}); please report it with the "
            "record")


def _encode_guarded(encoder: ChatEncoder, convs: list[Conversation], max_ids: int, split_long: bool) -> list:
    """``encoder.encode_records``; if it raises anything but a ``DataError`` (a tokenizer panic on odd
    text ...), each conversation is encoded alone so that only the culprits get a
    ``RecordError("unexpected_error")``. No input makes the whole run end in a traceback."""
    try:
        return encoder.encode_records(convs, max_ids, split_long=split_long)
    except DataError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # pyo3's PanicException derives from BaseException
        pass
    out = []
    for conv in convs:
        try:
            out.append(encoder.encode_records([conv], max_ids, split_long=split_long)[0])
        except RecordError as exc:
            out.append(exc)
        except DataError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            out.append(RecordError("unexpected_error", _unexpected(exc)))
    return out


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- prepare


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def default_num_proc() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def prepare(
    paths: str | list[str],
    options: EncodeOptions,
    *,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    tokenizer=None,
) -> PreparedData:
    """Encode the chat data at ``paths`` (or load it from the cache); see the module docstring.

    ``num_proc``: encoding processes (default: one for inputs under 16 MB, where
    starting workers costs more than it saves; else all cores, at most 16). ``tokenizer``: an already loaded
    tokenizer for in-process encoding (must match ``options.tokenizer_path``).
    """
    options.validate()
    sources = resolve_sources(paths)
    if cache_dir is None:
        return _build(sources, options, num_proc, progress, tokenizer)
    t0 = time.perf_counter()
    key = cache_key(sources, options)
    cache_root = Path(cache_dir).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    name = Path(sources[0].path).stem.replace(":", "_")[:40] or "data"
    final = cache_root / f"{name}-{key[:20]}"
    if (final / "meta.json").exists():
        return _load(final, time.perf_counter() - t0)
    with open(cache_root / f".{name}-{key[:20]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "meta.json").exists():  # another process built it while we waited
            return _load(final, time.perf_counter() - t0)
        data = _build(sources, options, num_proc, progress, tokenizer)
        data.summary["cache"] = str(final)
        _save(data, final)
    return _load(final, time.perf_counter() - t0, built=data.summary)


def _build(sources, options, num_proc, progress, tokenizer) -> PreparedData:
    t0 = time.perf_counter()
    if num_proc is None:
        size = sum(os.path.getsize(p) for s in sources for p in source_fingerprint_parts(s) if os.path.isfile(p))
        # A spawned worker needs a few seconds to start (imports, tokenizer); one process
        # encodes roughly 1 MB of chat JSON per second, so small inputs stay in-process.
        num_proc = 1 if size < 16_000_000 else default_num_proc()
    num_proc = max(1, int(num_proc))
    chunks = _chunks(sources, options)
    results: list[_ChunkResult] = []
    bar = _progress_bar(progress and _rank() == 0)
    try:
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(options.tokenizer_path)
        encoder = make_encoder(options, tokenizer)  # fails fast on a missing chat template
        if num_proc == 1:
            for chunk in chunks:
                results.append(_check(_encode_chunk(chunk, options, encoder)))
                bar.update(results[-1].records)
        else:
            ctx = multiprocessing.get_context("spawn")
            initargs = (options, encoder.spec, encoder.templates)  # the templates chosen (and announced) here
            with ctx.Pool(num_proc, initializer=_init_worker, initargs=initargs) as pool:
                inflight: deque = deque()
                for chunk in chunks:
                    inflight.append(pool.apply_async(_encode_chunk, (chunk,)))
                    while len(inflight) > 4 * num_proc:
                        results.append(_check(inflight.popleft().get()))
                        bar.update(results[-1].records)
                while inflight:
                    results.append(_check(inflight.popleft().get()))
                    bar.update(results[-1].records)
    finally:
        bar.close()
    lengths = np.concatenate([r.lengths for r in results]) if results else np.empty(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([r.ids for r in results]) if results else np.empty(0, np.uint32)
    mask = np.concatenate([r.mask for r in results]) if results else np.empty(0, np.uint8)
    origins = np.concatenate([r.origins for r in results]) if results else np.empty((0, 2), np.int64)
    skipped: dict[str, int] = {}
    first_at: dict[str, str] = {}
    for r in results:
        for reason, count in r.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        for reason, where in r.first_at.items():
            first_at.setdefault(reason, where)
    # Supervised labels: mask shifted by one inside each sample (position 0 is never a label).
    starts = offsets[:-1]
    supervised = int(mask.sum(dtype=np.int64)) - int(mask[starts].sum(dtype=np.int64)) if len(starts) else 0
    summary = {
        "sources": [s.name for s in sources],
        "records": sum(r.records for r in results),
        "samples": len(lengths),
        "tokens": int(lengths.sum()),
        "supervised_tokens": supervised,
        "truncated": sum(r.truncated for r in results),
        "dropped_too_long": sum(r.dropped_too_long for r in results),
        "dropped_no_supervised_after_truncation": sum(r.dropped_no_supervised for r in results),
        "skipped": skipped,
        "first_location": first_at,
        **_policy_summary(results, options),
        "max_length": int(lengths.max()) if len(lengths) else 0,
        "seq_length": options.seq_length,
        "pad_id": results[0].pad_id if results else 0,
        "num_proc": num_proc,
        "encode_seconds": round(time.perf_counter() - t0, 3),
    }
    if not len(lengths):
        raise DataError(
            f"{', '.join(s.name for s in sources)}: no usable samples ({_describe_losses(summary)})"
        )
    return PreparedData(ids, mask, offsets, origins, [s.name for s in sources], summary)


def _policy_summary(results: list[_ChunkResult], options: EncodeOptions) -> dict[str, Any]:
    """What each truncation and reasoning policy keeps (supervised labels / reasoning tokens)."""
    counts: dict[str, int] = {}
    for r in results:
        for key, n in r.counts.items():
            counts[key] = counts.get(key, 0) + n
    by_truncation = {
        "untruncated": counts.get("supervised_full", 0),
        "truncate": counts.get("supervised_truncate", 0),
        "drop": counts.get("supervised_drop", 0),
    }
    if "supervised_split" in counts:
        by_truncation["split"] = counts["supervised_split"]
    return {
        "truncation": options.truncation,
        "supervised_by_truncation": by_truncation,
        "split_samples": counts.get("split_long", 0),
        "reasoning_tokens": {
            "reasoning_history": options.reasoning_history,
            "train_reasoning": options.train_reasoning,
            "trained": counts.get("reasoning_trained", 0),
            "template": counts.get("reasoning_template", 0),
            "split": counts.get("reasoning_split", 0),
            "split_samples": counts.get("reasoning_pieces", 0),
        },
    }


def _check(result: _ChunkResult) -> _ChunkResult:
    if result.error:
        raise DataError(result.error)
    return result


def _describe_losses(summary: dict) -> str:
    parts = [f"{n} skipped as {reason}" for reason, n in summary["skipped"].items()]
    if summary["dropped_too_long"]:
        parts.append(f"{summary['dropped_too_long']} longer than seq_length + 1")
    if summary["dropped_no_supervised_after_truncation"]:
        parts.append(f"{summary['dropped_no_supervised_after_truncation']} with no supervised token after truncation")
    return "; ".join(parts) or f"{summary['records']} records read"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc="encoding conversations", unit=" records", mininterval=1.0, delay=2.0)


def _save(data: PreparedData, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        np.asarray(data.input_ids, dtype=np.uint32).tofile(tmp / "input_ids.bin")
        np.asarray(data.loss_mask, dtype=np.uint8).tofile(tmp / "loss_mask.bin")
        np.save(tmp / "offsets.npy", data.offsets)
        np.save(tmp / "origins.npy", data.origins)
        meta = {"version": CACHE_VERSION, "sources": data.sources, "summary": data.summary}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        if final.exists():  # a stale, incomplete directory (no meta.json): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(path: Path, wait_seconds: float, built: dict | None = None) -> PreparedData:
    t0 = time.perf_counter()
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    offsets = np.load(path / "offsets.npy", mmap_mode="r")
    n = int(offsets[-1])
    ids = np.memmap(path / "input_ids.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.empty(0, np.uint32)
    mask = np.memmap(path / "loss_mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.empty(0, np.uint8)
    origins = np.load(path / "origins.npy", mmap_mode="r")
    summary = dict(meta["summary"])
    summary["cache"] = str(path)
    summary["cache_hit"] = built is None
    summary["load_seconds"] = round(time.perf_counter() - t0 + (0 if built else wait_seconds), 4)
    return PreparedData(ids, mask, offsets, origins, meta["sources"], summary, str(path))


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned ``name: value`` lines."""
    lines = [
        f"records read:        {summary['records']:,}",
        f"samples:             {summary['samples']:,}",
        f"tokens:              {summary['tokens']:,}",
        f"supervised tokens:   {summary['supervised_tokens']:,}",
        f"longest sample:      {summary['max_length']:,} tokens (seq_length {summary['seq_length']:,})",
        f"truncated:           {summary['truncated']:,}",
        f"dropped (too long):  {summary['dropped_too_long']:,}",
        f"dropped (nothing supervised after truncation): {summary['dropped_no_supervised_after_truncation']:,}",
    ]
    by = summary.get("supervised_by_truncation")
    if by and by.get("untruncated"):
        full = by["untruncated"]
        kept = ", ".join(f"{name} {n:,} ({n / full:.1%})" for name, n in by.items() if name != "untruncated")
        lines.append(f"supervised kept:     {kept} of {full:,} (truncation={summary.get('truncation')}; "
                     f"split made {summary.get('split_samples', 0):,} extra samples)")
    reasoning = summary.get("reasoning_tokens")
    if reasoning and (reasoning["template"] or reasoning["split"] or reasoning["trained"]):
        lines.append(
            f"reasoning tokens:    {reasoning['trained']:,} trained (reasoning_history={reasoning['reasoning_history']}, "
            f"train_reasoning={str(reasoning['train_reasoning']).lower()}); template would train "
            f"{reasoning['template']:,}, split {reasoning['split']:,} "
            f"({reasoning['split_samples']:,} extra samples)"
        )
    skipped = summary.get("skipped") or {}
    where = summary.get("first_location") or {}
    total = sum(skipped.values())
    lines.append(f"skipped bad records: {total:,}")
    for reason, n in sorted(skipped.items()):
        lines.append(f"  {reason}: {n:,} (first at {where.get(reason, '?')})")
    if "packing" in summary:
        p = summary["packing"]
        lines.append(
            f"packing:             {p['samples']:,} samples in {p['packs']:,} packs of {p['capacity']:,} slots, "
            f"efficiency {p['efficiency']:.4f} (real tokens / slots)"
        )
    if summary.get("cache"):
        state = "hit" if summary.get("cache_hit") else "built"
        lines.append(f"cache ({state}):".ljust(21) + summary["cache"])
    if summary.get("cache_hit"):
        lines.append(f"load time:           {summary.get('load_seconds', 0):.3f} s (hashing the inputs included)")
    else:
        seconds, procs = summary.get("encode_seconds", 0), summary.get("num_proc", 1)
        lines.append(f"encode time:         {seconds:.2f} s on {procs} process(es)")
    return "\n".join(lines)
