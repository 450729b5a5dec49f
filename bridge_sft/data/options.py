"""``EncodeOptions``: every setting that decides the encoded samples, all plain values.

Every field is part of the cache key (``bridge_sft.data.cache.cache_key``), so two runs
with equal options over the same bytes share a cache. ``validate()`` raises a
``DataError`` naming the bad setting and its allowed values; ``prepare`` calls it first.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge_sft.data.encoding import EMPTY_THINK, REASONING_HISTORY, TRAIN_ON, load_tools
from bridge_sft.data.errors import DataError
from bridge_sft.data.formats import FORMATS

TRUNCATION = ("split", "truncate", "drop", "error")
ON_BAD_RECORD = ("error", "skip")


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
