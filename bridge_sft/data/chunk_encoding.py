"""Encoding chunks of raw records into samples, in this process or in spawned workers.

``_encode_chunk(chunk)`` parses, validates and encodes each record of a ``_Chunk``
(``bridge_sft.data.chunks``) with a ``ChatEncoder`` (``make_encoder``) and applies the
length policy, returning a ``_ChunkResult``: the kept samples' ids, masks, lengths and
origins, and the count of everything else. Bad records: ``on_bad_record="error"`` sets
``result.error`` (the record's location, the problem, the fix) and stops the chunk;
``"skip"`` counts the record by reason (``skipped``, first location in ``first_at``). Too
long samples (more than ``seq_length + 1`` ids) follow ``options.truncation``
(``_keep_sample``): ``"drop"`` and ``"truncate"`` count what they drop or cut, ``"error"``
stops, ``"split"`` has the encoder cut long conversations at turn boundaries first. A
record that makes the tokenizer fail in an unforeseen way is that record's
``unexpected_error`` (``_encode_guarded``), never the run's traceback. ``counts`` sums what
each truncation and reasoning policy would keep (``EncodedRecord``), for the summary.

``encode_chunks`` runs the chunks in order, in this process (``num_proc == 1``) or in a
spawned pool whose workers build their encoder once (``_init_worker``) from the options, the
``TokenizerSpec`` and the templates the main process chose; the first ``result.error``
becomes a ``DataError``. Results come back in chunk order either way.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from bridge_sft.data.chunks import _Chunk
from bridge_sft.data.encoding import ChatEncoder, TokenizerSpec, load_chat_template, load_tools
from bridge_sft.data.errors import DataError, RecordError
from bridge_sft.data.formats import Conversation, to_conversation
from bridge_sft.data.options import EncodeOptions
from bridge_sft.data.sources import location, parse_raw

_FIX_SKIP = "fix the record, or set on_bad_record='skip' to skip and count bad records"


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


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(options: EncodeOptions, spec: TokenizerSpec, templates: dict[str, str]) -> None:
    """A worker's encoder, with the templates the main process chose (and announced)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["options"] = options
    _WORKER["encoder"] = make_encoder(options, spec, templates)


def _check(result: _ChunkResult) -> _ChunkResult:
    if result.error:
        raise DataError(result.error)
    return result


def encode_chunks(
    chunks: Iterable[_Chunk], options: EncodeOptions, encoder: ChatEncoder, num_proc: int, bar
) -> list[_ChunkResult]:
    """Every chunk's ``_ChunkResult``, in chunk order: encoded here with ``encoder`` if ``num_proc``
    is 1, else by ``num_proc`` spawned workers (about 4 chunks in flight per worker). ``bar``
    is told the records of each result; the first result with an error raises it as a ``DataError``."""
    results: list[_ChunkResult] = []
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
    return results
