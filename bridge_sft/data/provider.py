"""``SFTDatasetProvider``: chat data files -> Bridge train/validation/test datasets.

Put an instance in ``ConfigContainer.dataset``; Bridge calls
``build_datasets(context)`` on every rank. The data is encoded once
(``bridge_sft.data.cache.prepare``: cached, parallel, counted), split, packed
(best-fit decreasing) when ``packing=True``, and wrapped in map-style datasets
of exactly ``context.train_samples`` / ``valid_samples`` / ``test_samples``
items (the data repeated over shuffled epochs; see ``bridge_sft.data.datasets``).
Several weighted sources (``data_path=["chat.jsonl:0.7", "code.jsonl:0.3"]``) are
each encoded, split and packed on their own and mixed into one stream
(``bridge_sft.data.mixing``).

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
from bridge_sft.data.datasets import (
    EpochOrder,
    FullPassDataset,
    MixedDataset,
    PackedSFTDataset,
    SFTDataset,
    packed_real_tokens,
    padding_multiple,
    plan_packs,
)
from bridge_sft.data.formats import DataError
from bridge_sft.data.mixing import (
    MIX_BY,
    SourceSpec,
    format_mixture,
    is_mixture,
    mixture_weights,
    one_pass_plan,
    parse_sources,
    plan_mixture,
    source_items,
    source_options,
    supervised_per_sample,
)
from bridge_sft.data.packing import packing_efficiency

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTDatasetProvider(DatasetProvider):
    """Chat SFT data for Bridge's ``finetune()``.

    Data: ``data_path``: file(s)/directories/hub ids of ONE source (see
    ``bridge_sft.data.formats``), or several weighted sources (``["a.jsonl:0.7",
    "b.jsonl:0.3"]``, ``PATH:Nx`` for epochs, or mappings with per-source options;
    see ``bridge_sft.data.mixing``), mixed by ``mix_by`` (``samples`` or supervised
    ``tokens``). ``format`` (``auto``, ``messages``, ``sharegpt``, ``alpaca``,
    ``prompt_completion``), ``columns`` (``{canonical: source column}``),
    ``system_prompt`` (for conversations without one): defaults a source may override.
    Tokens: ``tokenizer_path`` (HF tokenizer directory or id), ``chat_template`` (a
    .jinja path or template text overriding the tokenizer's), ``template_kwargs``
    (e.g. ``{"enable_thinking": False}``), ``train_on`` (``assistant``,
    ``last_assistant``, ``all``), ``empty_think`` (``mask``: empty
    ``<think></think>`` blocks injected by the template are not trained; ``train``).
    Length: ``seq_length`` (slots per sample/pack; must equal the model's),
    ``truncation`` (``split``: long conversations cut at turn boundaries, every
    assistant turn trained once; ``truncate``, ``drop``, ``error``). Reasoning and
    tools: ``train_reasoning``, ``reasoning_history`` (``split``, ``template``; see
    ``bridge_sft.data.encoding``), ``tools`` (tool schemas, or a JSON file, for records
    without their own). ``on_bad_record`` (``error``, ``skip``). Splits: ``validation_path`` / ``test_path`` (one source), or per-source
    ``validation`` files, or ``validation_fraction`` / ``test_fraction`` of each
    source's records (chosen with ``seed``; at least one sample per source of a
    mixture), or else ``validation_samples`` held out of each source (at most a fifth
    of it: ``held_out_count``). ``eval_pass_items``: when set (``bridge_sft.train``
    sets it from ``held_out_items``), every evaluation covers each held-out sample
    exactly once: the validation and test datasets repeat one pass of their items in
    a fixed order, padded to ``eval_pass_items`` with items that supervise no token
    (``datasets.FullPassDataset``); None: a stream of ``valid_samples`` items as for
    training. ``eval_samples``: that many held-out prompts answered greedily (at most
    ``eval_sample_tokens`` tokens) at each evaluation (``bridge_sft.eval_samples``). ``packing``: THD packs (micro-batch size 1); ``pad_seq_to_mult``: pad
    each packed sample to a multiple (2 x context parallel size). Without packing,
    ``padding="longest"`` pads each micro-batch to its longest sample rounded up to
    ``pad_to_multiple`` (and to the context-parallel 2 x CP and tensor-parallel
    multiples of the run), at most ``seq_length``; ``padding="seq_length"`` pads
    every sample to ``seq_length``. ``cache_dir``: where encoded arrays are cached
    (None: encode in memory every run); ``num_proc``: encoding processes (None:
    automatic).

    Loader defaults: ``dataloader_type="single"`` (sequential, resumes at
    ``consumed_samples``; shuffling and mixing are done by the dataset, the same
    stream whatever the run length); ``num_workers=0``: an item is a few
    memory-mapped slices copied into preallocated arrays (tens of microseconds;
    ``benchmarks/packing_efficiency.py`` measures it), so worker processes would
    cost start-up time and memory for nothing measurable.
    """

    data_path: str | list[str | dict[str, Any]]
    tokenizer_path: str
    seq_length: int = 2048
    packing: bool = True
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    pad_seq_to_mult: int = 1
    padding: Literal["longest", "seq_length"] = "longest"
    pad_to_multiple: int = 64
    mix_by: Literal["samples", "tokens"] = "samples"
    cache_dir: str | None = None
    seed: int = 1234
    format: str = "auto"
    columns: dict[str, str] | None = None
    system_prompt: str | None = None
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
    validation_samples: int = 0
    test_fraction: float = 0.0
    eval_pass_items: int | None = None
    eval_samples: int = 0
    eval_sample_tokens: int = 48
    num_proc: int | None = None
    dataloader_type: Literal["single", "cyclic", "batch", "external"] | None = "single"
    num_workers: int = 0
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        specs = self.sources()
        for spec in specs:
            self.encode_options(spec).validate()
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name} must be in [0, 1), not {value!r}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DataError("validation_fraction + test_fraction must leave some training data (< 1)")
        if isinstance(self.validation_samples, bool) or not isinstance(self.validation_samples, int) \
                or self.validation_samples < 0:
            raise DataError(f"validation_samples must be a whole number >= 0, not {self.validation_samples!r}")
        if self.pad_seq_to_mult < 1 or self.seq_length % self.pad_seq_to_mult:
            raise DataError(
                f"seq_length {self.seq_length} must be a multiple of pad_seq_to_mult {self.pad_seq_to_mult}"
            )
        if self.padding not in ("longest", "seq_length"):
            raise DataError(f"padding must be 'longest' or 'seq_length', not {self.padding!r}")
        if isinstance(self.pad_to_multiple, bool) or not isinstance(self.pad_to_multiple, int) \
                or self.pad_to_multiple < 1:
            raise DataError(f"pad_to_multiple must be a positive integer, not {self.pad_to_multiple!r}")
        if self.mix_by not in MIX_BY:
            raise DataError(f"mix_by must be one of {', '.join(MIX_BY)}, not {self.mix_by!r}")
        if is_mixture(specs) and (self.validation_path is not None or self.test_path is not None):
            raise DataError("validation_path/test_path name one data set, but data has several sources: give each "
                            "source its own validation file ({path: ..., weight: ..., validation: FILE}) or use "
                            "validation_fraction")

    def sources(self) -> list[SourceSpec]:
        """The sources ``data_path`` names (one, or several to mix)."""
        return parse_sources(self.data_path)

    def loss_source_names(self) -> list[str]:
        """Names of the sources in validation batches' ``source_id`` order (empty without a mixture):
        the forward step reports a validation loss for each (``mixing.add_source_losses``)."""
        specs = self.sources()
        return [s.name for s in specs if self._has_validation(s)] if is_mixture(specs) else []

    def _has_validation(self, spec: SourceSpec) -> bool:
        return spec.validation is not None or self.validation_fraction > 0 or self.validation_samples > 0

    def _n_valid(self, n: int, mixture: bool) -> int:
        """Samples held out of a source of ``n`` for validation (no validation file given)."""
        if self.validation_fraction > 0:
            return _held_out(n, self.validation_fraction) if mixture else int(round(n * self.validation_fraction))
        return held_out_count(n, self.validation_samples)

    def held_out_items(self, split: str) -> int:
        """Items (packs, or samples without packing) one pass over the ``validation`` or ``test`` split holds,
        all sources together: what one evaluation must cover. Prepares (or loads) the data."""
        specs = self.sources()
        parts = self._mixture_splits(specs)[split] if is_mixture(specs) else [self._single_splits(specs[0])[split]]
        total = 0
        for data, indices in parts:
            if len(indices):
                total += len(plan_packs(data, indices, self.seq_length, self.pad_seq_to_mult)) if self.packing \
                    else len(indices)
        return total

    def encode_options(self, spec: SourceSpec | None = None) -> EncodeOptions:
        """Encoding options of a source (its own format/columns/train_on/system prompt, else the provider's)."""
        return source_options(EncodeOptions(
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
            system_prompt=self.system_prompt,
        ), spec)

    def prepare(self, paths: Any, spec: SourceSpec | None = None) -> PreparedData | list[PreparedData]:
        """Encode ``paths`` (cached): a ``PreparedData``, or one per source when ``paths`` is a mixture
        (then each source's validation files are prepared too)."""
        if spec is None:
            specs = parse_sources(paths)
            if is_mixture(specs):
                out = []
                for s in specs:
                    out.append(self.prepare(list(s.paths), s))
                    if s.validation is not None:
                        self.prepare(list(s.validation), s)
                return out
            spec = specs[0]
            paths = list(spec.paths)
        return prepare(paths, self.encode_options(spec), cache_dir=self.cache_dir, num_proc=self.num_proc)

    def build_datasets(self, context: DatasetBuildContext):
        """Train, validation and test datasets of ``context.*_samples`` items (None for an empty split)."""
        specs = self.sources()
        wanted = {"train": context.train_samples, "validation": context.valid_samples, "test": context.test_samples}
        pad_multiple = self._pad_multiple(context)
        if is_mixture(specs):
            return self._build_mixture(specs, wanted, pad_multiple)
        splits = self._single_splits(specs[0])
        validation_path = self.validation_path if specs[0].validation is None else specs[0].validation
        if self.validation_fraction and validation_path is not None:
            logger.warning("validation_path is set: validation_fraction is ignored")
        if self.test_fraction and self.test_path is not None:
            logger.warning("test_path is set: test_fraction is ignored")

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
            if name != "train" and self.eval_pass_items is not None:
                one_pass, summary = self._dataset(data, indices, None, name, self.seed, pad_multiple)
                dataset = FullPassDataset(one_pass, self.eval_pass_items, wanted[name], name=name)
            else:
                dataset, summary = self._dataset(data, indices, wanted[name], name, self.seed, pad_multiple)
            if _rank() == 0:
                logger.info("%s data (%d of %d samples):\n%s", name, len(indices), len(data), format_summary(summary))
            datasets[name] = dataset
        return datasets["train"], datasets["validation"], datasets["test"]

    def held_out_samples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """The first ``n`` samples of the validation split (taken from the sources in turn) as ``(ids,
        loss_mask)`` lists, as training encoded them."""
        specs = self.sources()
        parts = self._mixture_splits(specs)["validation"] if is_mixture(specs) else \
            [self._single_splits(specs[0])["validation"]]
        out = []
        for k in range(max((len(idx) for _, idx in parts), default=0)):
            for data, indices in parts:
                if k < len(indices) and len(out) < n:
                    out.append(tuple(a.tolist() for a in data.sample(int(indices[k]))))
        return out

    def _single_splits(self, spec: SourceSpec) -> dict[str, tuple[PreparedData, np.ndarray]]:
        """``{split: (data, indices)}`` of one source: held-out samples drawn with ``seed``, or the
        validation/test files."""
        validation_path = self.validation_path if spec.validation is None else list(spec.validation)
        train_data = self.prepare(list(spec.paths), spec)
        n = len(train_data)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_valid = self._n_valid(n, mixture=False) if validation_path is None else 0
        n_test = int(round(n * self.test_fraction)) if self.test_path is None else 0
        splits = {
            "validation": (train_data, np.sort(perm[:n_valid])),
            "test": (train_data, np.sort(perm[n_valid: n_valid + n_test])),
            "train": (train_data, np.sort(perm[n_valid + n_test:])),
        }
        for name, path in (("validation", validation_path), ("test", self.test_path)):
            if path is not None:
                data = self.prepare(path, spec)
                splits[name] = (data, np.arange(len(data)))
        return splits

    def _pad_multiple(self, context: DatasetBuildContext) -> int | None:
        """Rows of a dynamically padded micro-batch are a multiple of this (None: pad to seq_length),
        from the run's tensor- and context-parallel groups (``datasets.padding_multiple``)."""
        if self.packing or self.padding == "seq_length":
            return None
        tp = cp = 1
        groups = getattr(context, "pg_collection", None)
        if groups is not None:
            tp = groups.tp.size() if getattr(groups, "tp", None) is not None else 1
            cp = groups.cp.size() if getattr(groups, "cp", None) is not None else 1
        return padding_multiple(self.pad_to_multiple, tensor_parallel=tp, context_parallel=cp,
                                pad_seq_to_mult=self.pad_seq_to_mult)

    def _dataset(self, data: PreparedData, indices: np.ndarray, num_samples: int | None, name: str, seed,
                 pad_multiple: int | None):
        """The split's dataset (packed or not; ``num_samples`` items) and its summary."""
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
                data, indices, plan, self.seq_length, num_samples=num_samples, seed=seed,
                shuffle=name == "train", pad_id=pad_id, pad_seq_to_mult=self.pad_seq_to_mult, name=name,
            )
        else:
            dataset = SFTDataset(
                data, indices, self.seq_length, num_samples=num_samples, seed=seed,
                shuffle=name == "train", pad_id=pad_id, pad_to_multiple=pad_multiple, name=name,
            )
        return dataset, summary

    # ------------------------------------------------------------------ mixtures

    def _build_mixture(self, specs: list[SourceSpec], wanted: dict[str, int], pad_multiple: int | None):
        """One dataset per source and split, mixed by ``mixing.plan_mixture`` (see ``bridge_sft.data.mixing``)."""
        prepared = [self.prepare(list(s.paths), s) for s in specs]
        splits = self._mixture_splits(specs)
        supervised = {id(data): supervised_per_sample(data) for split in splits.values() for data, _ in split}
        items = {split: [source_items(data, idx, self.seq_length, self.packing, self.pad_seq_to_mult,
                                      supervised[id(data)]) for data, idx in splits[split]] for split in splits}
        weights = mixture_weights(specs, items["train"], self.mix_by)
        loss_names = self.loss_source_names()
        if _rank() == 0:
            for spec, data in zip(specs, prepared):
                logger.info("source %s:\n%s", spec.name, format_summary(data.summary))
        datasets = {}
        for split in ("train", "validation", "test"):
            if split != "train" and not wanted[split]:
                datasets[split] = None
                continue
            present = [i for i, (_, idx) in enumerate(splits[split]) if len(idx)]
            if split != "train" and not present:
                logger.warning("%s: no data (set validation files per source or %s_fraction); Bridge will skip it",
                               split, split)
                datasets[split] = None
                continue
            datasets[split] = self._mix(
                split, [specs[i] for i in present], [splits[split][i] for i in present],
                [items[split][i] for i in present], [weights[i] for i in present], present, wanted[split],
                pad_multiple, with_source_id=[specs[i].name for i in present] == loss_names,
            )
        return datasets["train"], datasets["validation"], datasets["test"]

    def _mixture_splits(self, specs: list[SourceSpec]) -> dict[str, list[tuple[PreparedData, np.ndarray]]]:
        """``{split: [(data, indices) per source]}``, each source split with its own seed."""
        splits: dict[str, list] = {"train": [], "validation": [], "test": []}
        for i, spec in enumerate(specs):
            data = self.prepare(list(spec.paths), spec)
            n = len(data)
            perm = np.random.default_rng([self.seed, i + 1]).permutation(n)
            n_valid = self._n_valid(n, mixture=True) if spec.validation is None else 0
            n_test = _held_out(n - n_valid, self.test_fraction)
            splits["train"].append((data, np.sort(perm[n_valid + n_test:])))
            splits["test"].append((data, np.sort(perm[n_valid: n_valid + n_test])))
            if spec.validation is not None:
                valid = self.prepare(list(spec.validation), spec)
                splits["validation"].append((valid, np.arange(len(valid))))
            else:
                splits["validation"].append((data, np.sort(perm[:n_valid])))
            if not len(splits["train"][-1][1]):
                raise DataError(f"source {spec.name}: the training split is empty")
        return splits

    def _mix(self, split, specs, parts, items, weights, source_index, num_items, pad_multiple, with_source_id):
        """One split's ``MixedDataset``: the plan of ``num_items`` items, one dataset per source."""
        shuffle = split == "train"
        full_pass = split != "train" and self.eval_pass_items is not None
        seeds = [(self.seed, i + 1) for i in source_index]
        orders = [EpochOrder(len(item.samples), None, seed, shuffle) for item, seed in zip(items, seeds)]
        if full_pass:  # every held-out item of every source once (not a weighted draw)
            plan = one_pass_plan(items)
        else:
            plan = plan_mixture([o.permutation for o in orders], [i.samples for i in items],
                                [i.tokens for i in items], weights, num_items, self.mix_by)
        datasets = []
        for k, ((data, indices), item, seed) in enumerate(zip(parts, items, seeds)):
            pad_id = int(data.summary.get("pad_id", 0))
            name = f"{split}/{specs[k].name}"
            if self.packing:
                datasets.append(PackedSFTDataset(
                    data, indices, item.packs, self.seq_length, num_samples=int(plan.draws[k]), seed=seed,
                    shuffle=shuffle, pad_id=pad_id, pad_seq_to_mult=self.pad_seq_to_mult, name=name,
                ))
            else:
                datasets.append(SFTDataset(
                    data, indices, self.seq_length, num_samples=int(plan.draws[k]), seed=seed, shuffle=shuffle,
                    pad_id=pad_id, pad_to_multiple=pad_multiple, name=name,
                ))
        names = [s.name for s in specs]
        if _rank() == 0:
            stats = [{"records": int(data.summary["records"]), "samples": len(indices),
                      "supervised_tokens": int(item.tokens.sum())} for (data, indices), item in zip(parts, items)]
            logger.info("%s\n", format_mixture(split, names, plan, stats, [len(i.samples) for i in items],
                                               self.packing))
        mixed = MixedDataset(datasets, plan, names, with_source_id=with_source_id)
        return FullPassDataset(mixed, self.eval_pass_items, num_items, name=split) if full_pass else mixed


def held_out_count(n: int, samples: int) -> int:
    """Samples ``validation_samples`` holds out of a source of ``n``: ``samples``, at most a fifth of the
    source (small data still trains on most of itself), at least one when ``samples > 0`` and ``n >= 2``."""
    if samples <= 0 or n < 2:
        return 0
    return max(1, min(samples, n // 5))


def _held_out(n: int, fraction: float) -> int:
    """Samples held out of a mixture source: ``round(n x fraction)``, at least one when
    ``fraction > 0`` (so that every source has a validation loss), leaving one to train on."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(n * fraction))))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
