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

Where each part lives: ``EncodeOptions`` (``options``), ``PreparedData`` (``prepared``),
reading records in chunks (``chunks``), encoding them with the bad-record and length
policies, in worker processes or not (``chunk_encoding``), the summary and its text form
(``summary``). This module holds the cache itself: its key, its directory layout, the lock,
and ``_build``, which encodes and assembles the arrays. Every name these modules held when
they were one stays importable from here.

On disk, ``cache_dir/<name>-<key[:20]>/`` holds ``input_ids.bin`` (raw uint32),
``loss_mask.bin`` (raw uint8), ``offsets.npy``, ``origins.npy`` and ``meta.json``
(``version``, ``sources``, ``summary``), written to a temporary directory and renamed into
place; a directory without ``meta.json`` is incomplete and rebuilt. Builders take the lock
file ``cache_dir/.<name>-<key[:20]>.lock``.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

# Re-exported: the names of the modules ``prepare``'s parts live in stay importable from here, and
# ``prepare``/``_build`` look ``_build`` and ``_load_tokenizer`` up in this module (tests patch them here).
from bridge_sft.data.chunk_encoding import (  # noqa: F401
    _FIX_SKIP,
    _WORKER,
    _check,
    _ChunkResult,
    _count,
    _encode_chunk,
    _encode_guarded,
    _init_worker,
    _keep_sample,
    _load_tokenizer,
    _Samples,
    _unexpected,
    encode_chunks,
    make_encoder,
)
from bridge_sft.data.chunks import CHUNK_RECORDS, _Chunk, _chunks, _detect  # noqa: F401
from bridge_sft.data.encoding import (  # noqa: F401
    EMPTY_THINK,
    REASONING_HISTORY,
    TRAIN_ON,
    ChatEncoder,
    TokenizerSpec,
    load_chat_template,
    load_tools,
)
from bridge_sft.data.formats import (  # noqa: F401
    FORMATS,
    Conversation,
    DataError,
    RecordError,
    Source,
    apply_columns,
    detect_format,
    iter_source,
    location,
    parse_raw,
    resolve_sources,
    source_fingerprint_parts,
    to_conversation,
)
from bridge_sft.data.options import ON_BAD_RECORD, TRUNCATION, EncodeOptions  # noqa: F401
from bridge_sft.data.prepared import PreparedData
from bridge_sft.data.summary import _describe_losses, _policy_summary, format_summary  # noqa: F401

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the encoding rules change
_TOKENIZER_FILES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".vocab")


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
    bar = _progress_bar(progress and _rank() == 0)
    try:
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(options.tokenizer_path)
        encoder = make_encoder(options, tokenizer)  # fails fast on a missing chat template
        results = encode_chunks(chunks, options, encoder, num_proc, bar)
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
