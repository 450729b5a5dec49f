"""The tokenizer side of encoding: a picklable spec of an HF tokenizer, its Rust backend,
and the mapping of supervised characters to tokens through the backend's offsets.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge_sft.data.formats import DataError


@dataclass(frozen=True)
class TokenizerSpec:
    """What encoding needs from an HF tokenizer, as plain picklable values (for worker
    processes, which then need neither ``AutoTokenizer`` nor torch)."""

    name: str
    backend_json: str
    chat_template: str | dict[str, str] | None
    special_tokens_map: dict[str, Any]
    special_ids: frozenset[int]
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str | None = None) -> "TokenizerSpec":
        """The spec of an HF tokenizer (cached per tokenizer object while its template,
        added tokens and special tokens stay the same)."""
        fingerprint = tokenizer_fingerprint(tokenizer)
        try:
            cached = _SPECS.get(tokenizer)
        except TypeError:  # not weak-referenceable
            cached = None
        if cached is not None and cached[0] == fingerprint and (name is None or cached[1].name == name):
            return cached[1]
        spec = cls._from_tokenizer(tokenizer, name)
        try:
            _SPECS[tokenizer] = (fingerprint, spec)
        except TypeError:
            pass
        return spec

    @classmethod
    def _from_tokenizer(cls, tokenizer, name: str | None) -> "TokenizerSpec":
        name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise DataError(
                f"tokenizer {name}: a fast (Rust 'tokenizers') tokenizer with a tokenizer.json is needed to map "
                "the loss mask to tokens; this one is a slow Python tokenizer"
            )
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)
        }
        pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
        return cls(
            name=str(name),
            backend_json=backend.to_str(),
            chat_template=getattr(tokenizer, "chat_template", None),
            special_tokens_map=dict(tokenizer.special_tokens_map),
            special_ids=frozenset(special),
            pad_id=int(pad),
        )


_SPECS: "weakref.WeakKeyDictionary[Any, tuple[tuple, TokenizerSpec]]" = weakref.WeakKeyDictionary()
_BACKENDS: OrderedDict[int, tuple[TokenizerSpec, Any]] = OrderedDict()


def tokenizer_fingerprint(tokenizer) -> tuple:
    """What may change on a live tokenizer object and changes the encoding (about 10 us)."""
    template = getattr(tokenizer, "chat_template", None)
    return (
        template if not isinstance(template, dict) else tuple(sorted(template.items())),
        len(getattr(tokenizer, "added_tokens_decoder", ())),
        repr(sorted(getattr(tokenizer, "special_tokens_map", {}).items())),
    )


def backend_of(spec: TokenizerSpec):
    """The Rust tokenizer of a spec: a private copy that never inherits padding/truncation
    settings from tokenizer.json (HF resets them on every call; the raw backend would not)."""
    hit = _BACKENDS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec.backend_json)
    backend.no_truncation()
    backend.no_padding()
    _BACKENDS[id(spec)] = (spec, backend)
    while len(_BACKENDS) > 4:
        _BACKENDS.popitem(last=False)
    return backend


def to_arrays(enc, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int64, loss_mask uint8)`` of a backend encoding: a token is supervised when
    any of its characters lies in one of ``spans`` (``[start, end)`` in the encoded text)."""
    ids = np.asarray(enc.ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    if len(ids) == 0:
        return ids, mask
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    if np.all(starts[1:] >= starts[:-1]) and np.all(ends[1:] >= ends[:-1]):
        for a, b in spans:
            lo = np.searchsorted(ends, a, side="right")  # first token ending after a
            hi = np.searchsorted(starts, b, side="left")  # first token starting at/after b
            mask[lo:hi] = 1
    else:  # offsets out of order (unusual normalisers): overlap test per token
        for a, b in spans:
            mask[(starts < b) & (ends > a)] = 1
    return ids, mask


def count_in_spans(enc, mask: np.ndarray, spans: list[tuple[int, int]]) -> int:
    """Supervised tokens (``mask == 1``) whose first character lies in one of ``spans``."""
    if not spans or not len(mask):
        return 0
    starts = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    inside = np.zeros(len(mask), dtype=bool)
    for a, b in spans:
        inside |= (starts >= a) & (starts < b)
    return int((inside & (mask == 1)).sum())
