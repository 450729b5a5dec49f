"""``SFTDatasetProvider``: chat data files -> Bridge train/validation/test datasets.

Put an instance in ``ConfigContainer.dataset``; Bridge calls
``build_datasets(context)`` on every rank. The data is encoded once
(``bridge_sft.data.cache.prepare``: cached, parallel, counted), split, packed
(best-fit decreasing) when ``packing=True``, and wrapped in map-style datasets
of exactly ``context.train_samples`` / ``valid_samples`` / ``test_samples``
items (the data repeated over shuffled epochs; see ``bridge_sft.data.datasets``).

All fields are plain values, so the config can be written to YAML.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider

from bridge_sft.data.cache import EncodeOptions, PreparedData, format_summary, prepare
from bridge_sft.data.datasets import PackedSFTDataset, SFTDataset, packed_real_tokens, plan_packs
from bridge_sft.data.formats import DataError
from bridge_sft.data.packing import packing_efficiency

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTDatasetProvider(DatasetProvider):
    """Chat SFT data for Bridge's ``finetune()``.

    Data: ``data_path`` (file(s)/directories/hub ids; see ``bridge_sft.data.formats``),
    ``format`` (``auto``, ``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion``),
    ``columns`` (``{canonical: source column}``). Tokens: ``tokenizer_path`` (HF
    tokenizer directory or id), ``chat_template`` (a .jinja path or template text
    overriding the tokenizer's), ``template_kwargs`` (e.g. ``{"enable_thinking": False}``),
    ``train_on`` (``assistant``, ``last_assistant``, ``all``), ``empty_think``
    (``mask``: empty ``<think></think>`` blocks injected by the template are not
    trained; ``train``). Length: ``seq_length`` (slots per sample/pack; must equal
    the model's), ``truncation`` (``split``: long conversations cut at turn boundaries,
    every assistant turn trained once; ``truncate``, ``drop``, ``error``), ``train_reasoning``,
    ``reasoning_history`` (``split``, ``template``; see ``bridge_sft.data.encoding``), ``tools``
    (tool schemas, or a JSON file, for records without their own),
    ``on_bad_record`` (``error``, ``skip``). Splits: ``validation_path`` /
    ``test_path``, or ``validation_fraction`` / ``test_fraction`` of the training
    records (chosen with ``seed``). ``packing``: THD packs (micro-batch size 1);
    ``pad_seq_to_mult``: pad each packed sample to a multiple (2 x context
    parallel size). ``cache_dir``: where encoded arrays are cached (None: encode
    in memory every run); ``num_proc``: encoding processes (None: automatic).

    Loader defaults: ``dataloader_type="single"`` (sequential, resumes at
    ``consumed_samples``; shuffling is done by the dataset per epoch);
    ``num_workers=0``: an item is a few memory-mapped slices copied into
    preallocated arrays (tens of microseconds; ``benchmarks/packing_efficiency.py``
    measures it), so worker processes would cost start-up time and memory for
    nothing measurable.
    """

    data_path: str | list[str]
    tokenizer_path: str
    seq_length: int = 2048
    packing: bool = True
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    pad_seq_to_mult: int = 1
    cache_dir: str | None = None
    seed: int = 1234
    format: str = "auto"
    columns: dict[str, str] | None = None
    chat_template: str | None = None
    template_kwargs: dict[str, Any] | None = None
    empty_think: Literal["mask", "train"] = "mask"
    truncation: Literal["split", "truncate", "drop", "error"] = "truncate"
    train_reasoning: bool = True
    reasoning_history: Literal["split", "template"] = "split"
    tools: list[dict[str, Any]] | str | None = None
    on_bad_record: Literal["error", "skip"] = "error"
    validation_path: str | list[str] | None = None
    test_path: str | list[str] | None = None
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    num_proc: int | None = None
    dataloader_type: Literal["single", "cyclic", "batch", "external"] | None = "single"
    num_workers: int = 0
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        self.encode_options().validate()
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name} must be in [0, 1), not {value!r}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DataError("validation_fraction + test_fraction must leave some training data (< 1)")
        if self.pad_seq_to_mult < 1 or self.seq_length % self.pad_seq_to_mult:
            raise DataError(
                f"seq_length {self.seq_length} must be a multiple of pad_seq_to_mult {self.pad_seq_to_mult}"
            )

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(
            tokenizer_path=str(self.tokenizer_path),
            seq_length=self.seq_length,
            train_on=self.train_on,
            format=self.format,
            columns=dict(self.columns) if self.columns else None,
            chat_template=self.chat_template,
            template_kwargs=dict(self.template_kwargs) if self.template_kwargs else None,
            empty_think=self.empty_think,
            truncation=self.truncation,
            train_reasoning=self.train_reasoning,
            reasoning_history=self.reasoning_history,
            tools=self.tools,
            on_bad_record=self.on_bad_record,
        )

    def prepare(self, paths: str | list[str]) -> PreparedData:
        return prepare(paths, self.encode_options(), cache_dir=self.cache_dir, num_proc=self.num_proc)

    def build_datasets(self, context: DatasetBuildContext):
        """Train, validation and test datasets of ``context.*_samples`` items (None for an empty split)."""
        train_data = self.prepare(self.data_path)
        n = len(train_data)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_valid = int(round(n * self.validation_fraction)) if self.validation_path is None else 0
        n_test = int(round(n * self.test_fraction)) if self.test_path is None else 0
        splits = {
            "validation": (train_data, np.sort(perm[:n_valid])),
            "test": (train_data, np.sort(perm[n_valid: n_valid + n_test])),
            "train": (train_data, np.sort(perm[n_valid + n_test:])),
        }
        for name, path in (("validation", self.validation_path), ("test", self.test_path)):
            if path is not None:
                data = self.prepare(path)
                splits[name] = (data, np.arange(len(data)))
        if self.validation_fraction and self.validation_path is not None:
            logger.warning("validation_path is set: validation_fraction is ignored")
        if self.test_fraction and self.test_path is not None:
            logger.warning("test_path is set: test_fraction is ignored")

        wanted = {"train": context.train_samples, "validation": context.valid_samples, "test": context.test_samples}
        datasets = {}
        for name in ("train", "validation", "test"):
            data, indices = splits[name]
            if name != "train" and not wanted[name]:
                # Bridge asks for no items (e.g. eval_interval=None): no dataset, or its
                # sampler would fail on an empty one.
                datasets[name] = None
                continue
            if not len(indices):
                if name == "train":
                    raise DataError("the training split is empty")
                if wanted[name]:
                    logger.warning(
                        "%s: no data (set %s_path or %s_fraction); Bridge will skip it", name,
                        name, name,
                    )
                datasets[name] = None
                continue
            datasets[name] = self._dataset(data, indices, wanted[name], name)
        return datasets["train"], datasets["validation"], datasets["test"]

    def _dataset(self, data: PreparedData, indices: np.ndarray, num_samples: int, name: str):
        pad_id = int(data.summary.get("pad_id", 0))
        summary = dict(data.summary)
        if self.packing:
            plan = plan_packs(data, indices, self.seq_length, self.pad_seq_to_mult)
            real = packed_real_tokens(data, indices)
            summary["packing"] = {
                "samples": len(indices),
                "packs": len(plan),
                "capacity": self.seq_length,
                "efficiency": packing_efficiency(real, len(plan), self.seq_length),
            }
            dataset = PackedSFTDataset(
                data, indices, plan, self.seq_length, num_samples=num_samples, seed=self.seed,
                shuffle=name == "train", pad_id=pad_id, pad_seq_to_mult=self.pad_seq_to_mult, name=name,
            )
        else:
            dataset = SFTDataset(
                data, indices, self.seq_length, num_samples=num_samples, seed=self.seed,
                shuffle=name == "train", pad_id=pad_id, name=name,
            )
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info("%s data (%d of %d samples):\n%s", name, len(indices), len(data), format_summary(summary))
        return dataset
