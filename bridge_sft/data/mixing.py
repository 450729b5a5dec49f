"""Weighted mixing of several chat data sources into one training stream.

Syntax (``data=`` of the recipes, ``SFTDatasetProvider.data_path``; the same value on
the command line, where it is read as YAML, and in a recipe YAML file):

- ``chat.jsonl`` or ``[a.jsonl, b.jsonl]``: ONE source (several files concatenated),
  as before mixing existed;
- ``[chat.jsonl:0.7, code.jsonl:0.3]``: two sources with weights (``PATH:WEIGHT``;
  weights are normalised to sum 1);
- ``[chat.jsonl:2x, code.jsonl:1x]``: two sources with epochs (``PATH:Nx``);
- a list of mappings, each ``{path, weight | epochs, name, format, columns, train_on,
  system_prompt, validation}`` (``path`` a file, directory, hub id or list of them;
  ``validation``: this source's validation file(s)); unset options take the
  provider's. Mappings without weight or epochs mean ``epochs: 1`` each.

Semantics (``mix_by``, ``SFTDatasetProvider.mix_by``):

- ``weight`` is the share of the training stream, counted in samples
  (``mix_by="samples"``, the default: what the weights of LLaMA-Factory, ms-swift,
  axolotl and Bridge's ``source_weights`` count) or in supervised tokens
  (``mix_by="tokens"``: for sources whose answers differ a lot in length). A packed
  item counts as the samples (or supervised tokens) it holds.
- ``epochs`` sets the weights to ``epochs x size`` (size in the ``mix_by`` unit): one
  *round* of the mixture holds each source ``epochs`` times; a longer run continues
  with the same proportions (the summary shows the epochs each source covers).
- The stream is deterministic and online: item ``k`` comes from the source whose
  share so far is furthest below its weight (smallest ``drawn / weight``, ties to
  the first source). Every prefix of the stream is therefore within one item of
  the weights for every source (exactly the weights over a run, to a few items,
  not a random draw); the summary reports the share drawn vs asked.
- Within a source, items come in a fresh shuffled order each epoch (seeded by the
  provider's ``seed`` and the source's position); a source smaller than its share
  repeats that way, and the summary counts its epochs. Packs never mix sources.
- The stream does not depend on how long the run is, so Bridge's sequential
  ``"single"`` sampler resuming at ``consumed_samples`` continues the same stream
  (no replay, no skip), and a longer run only appends to it.
- Validation (and test) data are mixed the same way (same weights, each source's
  held-out samples in order, not shuffled), so an evaluation window of
  ``eval_iters x global_batch_size`` items holds every source whose weight is at
  least 1 / window; the forward step reports ``lm loss/<source name>`` for each
  source next to the overall ``lm loss`` (``add_source_losses``), which Bridge
  logs and writes to TensorBoard as ``lm loss/<name> validation``.

This module imports numpy (torch only inside ``add_source_losses``), not megatron.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bridge_sft.data.formats import DataError
from bridge_sft.data.packing import PackPlan, pack_best_fit, slots_needed

MIX_BY = ("samples", "tokens")
SOURCE_ID = "source_id"  # batch key: the source of each row ([b] int64)
LOSS_KEY = "lm loss/{}"  # per-source key of the reported loss dict
SOURCE_KEYS = ("path", "name", "weight", "epochs", "format", "columns", "train_on", "system_prompt", "validation")
_SUFFIX = re.compile(r"(?P<path>.+):(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<epochs>x?)")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture. ``weight`` or ``epochs`` (None for the only source of a
    plain ``data=``); ``format``/``columns``/``train_on``/``system_prompt``: None = the
    provider's; ``validation``: this source's validation paths (None: a held-out fraction)."""

    paths: tuple[str, ...]
    name: str
    weight: float | None = None
    epochs: float | None = None
    format: str | None = None
    columns: dict[str, str] | None = field(default=None, hash=False)
    train_on: str | None = None
    system_prompt: str | None = None
    validation: tuple[str, ...] | None = None


def parse_sources(data: Any) -> list[SourceSpec]:
    """The sources a ``data=`` value names (see the module docstring); ``DataError`` if malformed."""
    if data is None or data == "" or data == []:
        raise DataError("no data given: set data= to a chat data file, or a list of sources")
    entries = list(data) if isinstance(data, (list, tuple)) else [data]
    specs = [_entry(e, i) for i, e in enumerate(entries)]
    plain = all(isinstance(e, (str, os.PathLike)) for e in entries)
    if plain and all(s.weight is None and s.epochs is None for s in specs):
        return [SourceSpec(tuple(p for s in specs for p in s.paths), specs[0].name)]  # one source
    if len(specs) == 1:
        return specs
    weighted = [s.weight is not None for s in specs]
    with_epochs = [s.epochs is not None for s in specs]
    if any(weighted) and any(with_epochs):
        raise DataError("data: give every source a weight (path:0.7) or every source epochs (path:2x), not both")
    if any(weighted) and not all(weighted) or any(with_epochs) and not all(with_epochs):
        missing = [s.name for s, w, e in zip(specs, weighted, with_epochs) if not (w or e)]
        raise DataError(f"data: source(s) {', '.join(missing)} have no weight; give every source a weight "
                        "(path:0.7) or epochs (path:2x), or none of them (each source once per round)")
    if not any(weighted) and not any(with_epochs):
        specs = [replace(s, epochs=1.0) for s in specs]
    return _unique_names(specs)


def is_mixture(specs: Sequence[SourceSpec]) -> bool:
    return len(specs) > 1


def source_options(options, spec: SourceSpec | None):
    """A source's ``EncodeOptions``: its own format/columns/train_on/system prompt over ``options``."""
    if spec is None:
        return options
    return replace(options, format=spec.format or options.format, columns=spec.columns or options.columns,
                   train_on=spec.train_on or options.train_on,
                   system_prompt=spec.system_prompt or options.system_prompt)


def _entry(entry: Any, i: int) -> SourceSpec:
    where = f"data entry {i + 1}"
    if isinstance(entry, os.PathLike):
        entry = os.fspath(entry)
    if isinstance(entry, str):
        path, weight, epochs = _split_suffix(entry)
        return SourceSpec((path,), _name(path), weight=weight, epochs=epochs)
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a path, PATH:WEIGHT, PATH:Nx or a mapping with 'path', "
                        f"not {type(entry).__name__}")
    unknown = [k for k in entry if k not in SOURCE_KEYS]
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a source takes "
                        f"{', '.join(SOURCE_KEYS)}")
    if "path" not in entry:
        raise DataError(f"{where}: a source mapping needs 'path'")
    paths = _paths(entry["path"], f"{where}: path")
    weight = _positive(entry.get("weight"), f"{where}: weight")
    epochs = _positive(entry.get("epochs"), f"{where}: epochs")
    if weight is not None and epochs is not None:
        raise DataError(f"{where}: give weight or epochs, not both")
    for key in ("format", "train_on", "system_prompt", "name"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise DataError(f"{where}: {key} must be a string, not {type(entry[key]).__name__}")
    columns = entry.get("columns")
    if columns is not None and not (isinstance(columns, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
        raise DataError(f"{where}: columns must map names to column names, e.g. {{messages: dialog}}")
    validation = entry.get("validation")
    return SourceSpec(
        paths, entry.get("name") or _name(paths[0]), weight=weight, epochs=epochs, format=entry.get("format"),
        columns=dict(columns) if columns else None, train_on=entry.get("train_on"),
        system_prompt=entry.get("system_prompt"),
        validation=_paths(validation, f"{where}: validation") if validation is not None else None,
    )


def _split_suffix(entry: str) -> tuple[str, float | None, float | None]:
    """``PATH:0.7`` -> weight, ``PATH:2x`` -> epochs; a path that exists as written wins."""
    match = _SUFFIX.fullmatch(entry)
    if match is None or os.path.exists(os.path.expanduser(entry)):
        return entry, None, None
    value = _positive(float(match["value"]), f"data entry {entry!r}")
    return (match["path"], None, value) if match["epochs"] else (match["path"], value, None)


def _paths(value: Any, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (str, os.PathLike)) and str(v) for v in values):
        raise DataError(f"{where} must be a path or a list of paths")
    return tuple(os.fspath(v) for v in values)


def _positive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DataError(f"{where} must be a positive number, not {value!r}")
    return float(value)


def _name(path: str) -> str:
    base = path.rstrip("/").split(":")[0] if not os.path.exists(path) else path.rstrip("/")
    return Path(base).stem or "data"


def _unique_names(specs: list[SourceSpec]) -> list[SourceSpec]:
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        name = re.sub(r"[^\w.\-]+", "_", spec.name).strip("_") or "data"
        seen[name] = seen.get(name, 0) + 1
        out.append(replace(spec, name=name if seen[name] == 1 else f"{name}-{seen[name]}"))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise DataError(f"data: source names must differ ({', '.join(names)}); give each a 'name'")
    return out


# --------------------------------------------------------------------------- the stream


class EpochOrder:
    """Dataset index -> item index, over as many shuffled epochs as ``num_samples`` needs."""

    def __init__(self, num_items: int, num_samples: int | None, seed: int | tuple[int, ...], shuffle: bool):
        self.num_items = num_items
        self.num_samples = num_items if num_samples is None else int(num_samples)
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}
        if self.num_samples and not num_items:
            raise DataError(f"{self.num_samples} samples were asked for, but the split has no data")

    @property
    def epochs(self) -> float:
        return self.num_samples / self.num_items if self.num_items else 0.0

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                seed = list(self.seed) if isinstance(self.seed, tuple) else [self.seed]
                perm = np.random.default_rng([*seed, epoch]).permutation(self.num_items)
            else:
                perm = np.arange(self.num_items)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        epoch, j = divmod(index, self.num_items)
        return int(self.permutation(epoch)[j])



def supervised_per_sample(data) -> np.ndarray:
    """Supervised labels of each sample of a ``PreparedData`` (int64 [num_samples]): its
    ``loss_mask`` summed without position 0, which is never a label."""
    if not len(data):
        return np.zeros(0, dtype=np.int64)
    starts = np.asarray(data.offsets[:-1], dtype=np.int64)
    mask = np.asarray(data.loss_mask)
    return np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts].astype(np.int64)


@dataclass
class SourceItems:
    """The items a source's split contributes: ``packs`` (None when unpacked: an item is a
    sample), and per item its ``samples`` and supervised ``tokens`` (int64 arrays)."""

    packs: PackPlan | None
    samples: np.ndarray
    tokens: np.ndarray


def source_items(data, indices: np.ndarray, seq_length: int, packing: bool, pad_seq_to_mult: int = 1,
                 supervised: np.ndarray | None = None) -> SourceItems:
    """Items of the samples ``indices`` of ``data``: best-fit-decreasing packs of ``seq_length``
    slots (positions in the plan index ``indices``), or the samples themselves. ``supervised``:
    ``supervised_per_sample(data)`` if already computed (it reads every loss mask)."""
    indices = np.asarray(indices, dtype=np.int64)
    supervised = (supervised if supervised is not None else supervised_per_sample(data))[indices]
    if not packing:
        return SourceItems(None, np.ones(len(indices), dtype=np.int64), supervised)
    packs = pack_best_fit(slots_needed(data.lengths[indices], pad_seq_to_mult), seq_length)
    samples = np.diff(packs.offsets)
    tokens = np.add.reduceat(supervised[packs.items], packs.offsets[:-1]) if len(packs) else samples * 0
    return SourceItems(packs, samples, tokens)


def mixture_weights(specs: Sequence[SourceSpec], items: Sequence[SourceItems], mix_by: str) -> list[float]:
    """Each source's share in ``mix_by`` units (unnormalised): its ``weight``, or ``epochs`` x its
    size (samples or supervised tokens of its training split)."""
    out = []
    for spec, item in zip(specs, items):
        size = int(item.samples.sum() if mix_by == "samples" else item.tokens.sum())
        out.append(spec.weight if spec.weight is not None else (spec.epochs or 1.0) * size)
    return out




@dataclass
class MixturePlan:
    """The first ``len(source)`` items of a mixed stream.

    ``source`` int16 [N]: the source of item k; ``position`` int64 [N]: its index in that
    source's own (epoch-ordered) stream. ``draws`` [K]: items drawn per source;
    ``samples`` / ``tokens`` [K]: samples and supervised tokens they hold;
    ``weights`` [K]: the shares asked (in ``mix_by`` units, summing to 1).
    """

    source: np.ndarray
    position: np.ndarray
    draws: np.ndarray
    samples: np.ndarray
    tokens: np.ndarray
    weights: np.ndarray
    mix_by: str

    def drawn_shares(self) -> np.ndarray:
        units = self.samples if self.mix_by == "samples" else self.tokens
        total = units.sum()
        return units / total if total else np.zeros_like(self.weights)


def plan_mixture(
    permutation: Sequence[Callable[[int], np.ndarray]],
    item_samples: Sequence[np.ndarray],
    item_tokens: Sequence[np.ndarray],
    weights: Sequence[float],
    num_items: int,
    mix_by: str = "samples",
) -> MixturePlan:
    """The first ``num_items`` items of the stream (see the module docstring).

    Per source ``i``: ``permutation[i](epoch)`` is its item order in that epoch,
    ``item_samples[i]`` / ``item_tokens[i]`` the samples and supervised tokens of each of
    its items (all > 0); ``weights[i] > 0`` its share in ``mix_by`` units (normalised here).

    The greedy rule "next item from the source with the smallest ``drawn_units / weight``
    (ties: the first source)" gives source ``i``'s ``m``-th item the key ``(units of its
    first m items) / weight``, increasing in ``m``; the stream is all sources' items merged
    by that key (a stable sort, so ties go to the lower source index). It is online: the
    plan of ``n`` items is the prefix of the plan of any ``m > n``. Vectorised (numpy).
    """
    if mix_by not in MIX_BY:
        raise DataError(f"mix_by must be one of {', '.join(MIX_BY)}, not {mix_by!r}")
    k = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    if k == 0 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise DataError("every source of a mixture needs a positive weight")
    w = w / w.sum()
    units = [np.asarray(u, dtype=np.int64) for u in (item_samples if mix_by == "samples" else item_tokens)]
    for u in units:
        if not len(u) or int(u.min()) <= 0:
            raise DataError("every source of a mixture needs items, each with at least one sample and "
                            "supervised token")
    # Items each source contributes to num_items, roughly: share of items ~ weight / mean units.
    rate = w / np.array([u.mean() for u in units])
    need = [int(num_items * r / rate.sum() * 1.05) + 64 for r in rate]
    while True:
        streams = [_stream(permutation[i], len(units[i]), need[i]) for i in range(k)]
        keys = np.concatenate([np.concatenate([[0], np.cumsum(units[i][ids][:-1])]) / w[i]
                               for i, ids in enumerate(streams)])
        owner = np.repeat(np.arange(k, dtype=np.int16), need)
        order = np.argsort(keys, kind="stable")[:num_items]
        draws = np.bincount(owner[order], minlength=k).astype(np.int64)
        short = [i for i in range(k) if draws[i] >= need[i]]
        if not short:  # every source's next key lies beyond the plan: the merge is exact
            break
        for i in short:
            need[i] *= 2
    position = np.concatenate([np.arange(n, dtype=np.int64) for n in need])[order]
    samples = np.array([int(np.asarray(item_samples[i])[streams[i][:draws[i]]].sum()) for i in range(k)])
    tokens = np.array([int(np.asarray(item_tokens[i])[streams[i][:draws[i]]].sum()) for i in range(k)])
    return MixturePlan(owner[order], position, draws, samples, tokens, w, mix_by)


def one_pass_plan(items: Sequence[SourceItems]) -> MixturePlan:
    """Every item of every source once, source after source, each in its own order: one pass over
    held-out data (``SFTDatasetProvider.eval_pass_items``), where a weighted draw would count some
    samples twice and others never."""
    draws = np.array([len(item.samples) for item in items], dtype=np.int64)
    samples = np.array([int(item.samples.sum()) for item in items], dtype=np.int64)
    tokens = np.array([int(item.tokens.sum()) for item in items], dtype=np.int64)
    return MixturePlan(np.repeat(np.arange(len(items), dtype=np.int16), draws),
                       np.concatenate([np.arange(n, dtype=np.int64) for n in draws]), draws, samples, tokens,
                       samples / max(int(samples.sum()), 1), "samples")


def plan_sources(specs: Sequence[SourceSpec], prepared: Sequence, *, seq_length: int, packing: bool,
                 pad_seq_to_mult: int = 1, mix_by: str = "samples", num_items: int | None = None,
                 seed: int = 1234) -> tuple[list[SourceItems], MixturePlan]:
    """The training mixture of whole prepared sources, as a provider with this ``seed`` would shuffle
    it (``bridge-sft data prepare`` and the benchmarks show it): each source's items and the plan of
    ``num_items`` items (default: as many as the sources hold together)."""
    items = [source_items(data, np.arange(len(data)), seq_length, packing, pad_seq_to_mult) for data in prepared]
    orders = [EpochOrder(len(item.samples), None, (seed, i + 1), True) for i, item in enumerate(items)]
    num_items = num_items if num_items is not None else sum(len(item.samples) for item in items)
    plan = plan_mixture([o.permutation for o in orders], [i.samples for i in items], [i.tokens for i in items],
                        mixture_weights(specs, items, mix_by), num_items, mix_by)
    return items, plan


def _stream(permutation: Callable[[int], np.ndarray], num_items: int, n: int) -> np.ndarray:
    """A source's first ``n`` items, epoch after epoch."""
    epochs = -(-n // num_items)
    return np.concatenate([permutation(e) for e in range(epochs)])[:n]


# --------------------------------------------------------------------------- per-source losses


def add_source_losses(loss_func: Callable, loss_mask, source_id, dataset_config: Any) -> Callable:
    """Wrap Bridge's loss function so that its report also holds, for each source of a mixture,
    ``"lm loss/<name>": tensor([loss_sum, num_tokens])`` over that source's rows of the
    micro-batch (zeros for a source with no row here). Megatron/Bridge sum every key over
    micro-batches and data-parallel ranks and log ``sum / count`` like ``"lm loss"``, so each
    is that source's per-token mean. The loss and token count returned (what the gradient
    and Bridge's ``"lm loss"`` use) are untouched. Unchanged when there is no mixture.

    ``loss_mask`` [b, s] as the loss function got it (context-parallel slice included: the
    per-row sums are then partial and Bridge's reduction over DP x CP completes them);
    ``source_id`` [b]: the batch's ``SOURCE_ID``; ``dataset_config``: the provider, whose
    ``loss_source_names()`` names the sources in ``source_id`` order.
    """
    names_of = getattr(dataset_config, "loss_source_names", None)
    names = names_of() if names_of is not None else []
    if loss_mask is None or source_id is None or len(names) < 2:
        return loss_func

    import torch

    def loss_with_sources(output_tensor, *args, **kwargs):
        loss, num_tokens, report = loss_func(output_tensor, *args, **kwargs)
        mask = loss_mask.float()
        per_token = output_tensor.detach().float().view(mask.shape) * mask
        row_loss, row_tokens = per_token.sum(dim=1), mask.sum(dim=1)
        ids = source_id.view(-1).to(row_loss.device)
        for i, name in enumerate(names):
            rows = ids == i
            report[LOSS_KEY.format(name)] = torch.stack([row_loss[rows].sum(), row_tokens[rows].sum()])
        return loss, num_tokens, report

    return loss_with_sources


# --------------------------------------------------------------------------- summary


def format_mixture(split: str, names: Sequence[str], plan: MixturePlan, stats: Sequence[dict[str, int]],
                   items_per_epoch: Sequence[int], packed: bool, planned: str = "what Bridge asks for") -> str:
    """The per-source table of a mixed split: records, samples, supervised tokens of each source,
    and over the planned run the share asked vs drawn and the epochs covered."""
    unit = "samples" if plan.mix_by == "samples" else "supervised tokens"
    items = "packs" if packed else "samples"
    lines = [f"{split} mixture: {len(names)} sources, weights count {unit}; {len(plan.source):,} {items} planned "
             f"({planned})"]
    header = ("source", "records", "samples", "supervised tokens", "asked", "drawn", "epochs")
    rows = []
    drawn = plan.drawn_shares()
    for i, name in enumerate(names):
        epochs = plan.draws[i] / items_per_epoch[i] if items_per_epoch[i] else 0.0
        rows.append((name, f"{stats[i]['records']:,}", f"{stats[i]['samples']:,}",
                     f"{stats[i]['supervised_tokens']:,}", f"{plan.weights[i]:.2%}", f"{drawn[i]:.2%}",
                     f"{epochs:.2f}"))
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                                      for c, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
