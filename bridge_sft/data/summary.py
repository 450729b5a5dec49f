"""The data summary: what preparing a data set read, kept, cut and skipped, and its text form.

``prepare`` puts a ``summary`` dict on every ``PreparedData``: ``records``, ``samples``,
``tokens``, ``supervised_tokens`` (labels: the mask shifted by one inside each sample),
``truncated``, ``dropped_too_long``, ``dropped_no_supervised_after_truncation``, ``skipped``
(count by reason) and ``first_location`` (where each reason first occurred), the policies'
figures (``_policy_summary``: ``supervised_by_truncation``, the supervised labels each
truncation policy would keep; ``reasoning_tokens``, the reasoning tokens each
``reasoning_history`` policy trains), ``max_length``, ``seq_length``, ``pad_id``,
``num_proc``, ``encode_seconds``, and from the cache ``cache``, ``cache_hit`` and
``load_seconds``; the provider adds ``packing`` when it packs. ``format_summary`` renders it as
aligned ``name: value`` lines; ``_describe_losses`` says in one line why nothing was kept.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge_sft.data.chunk_encoding import _ChunkResult
    from bridge_sft.data.options import EncodeOptions


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


def _describe_losses(summary: dict) -> str:
    parts = [f"{n} skipped as {reason}" for reason, n in summary["skipped"].items()]
    if summary["dropped_too_long"]:
        parts.append(f"{summary['dropped_too_long']} longer than seq_length + 1")
    if summary["dropped_no_supervised_after_truncation"]:
        parts.append(f"{summary['dropped_no_supervised_after_truncation']} with no supervised token after truncation")
    return "; ".join(parts) or f"{summary['records']} records read"


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
