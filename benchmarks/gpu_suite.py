"""The GPU check's measurement suite (``gpu_check.py --suite``): the cases, their variants, and running them.

Measurements beyond the step comparison, each case one training process (Bridge keeps global state) that
interleaves K variants of the run on identical batches: iterations come in rounds of K consecutive
iterations that get the same global batch (learning rate 0: the same weights), the order of the variants
rotating from round to round; the first rounds are not timed. Per variant: seconds per iteration,
supervised and slot tokens/s, TFLOP/s, MFU, peak allocated memory (reset at every iteration start).

``run_suite(args)`` starts every case as ``gpu_check.py --case NAME`` (its own process), which calls
``run_case``; benchmarks/README.md describes the cases and how to run them on a GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.gpu_setup import (
    DRY, LLAMA32_1B, QWEN3_30B_A3B_FEWER_LAYERS, REPO, TINY, TINY_MOE, VOCAB, build_hf_model, build_hf_moe_model,
    hf_parameter_count, log, make_config, step_figures, use_sdpa,
)

CHECK = Path(__file__).resolve().with_name("gpu_check.py")  # the script that runs one case (--case)

GEMMA3_1B = {  # Gemma 3 1B's sizes (google/gemma-3-1b-it config.json); the model itself is a Llama, see SHAPES
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256,
}
TINY_GEMMA = {  # dry run: head_dim != hidden / heads, as in Gemma 3
    "hidden_size": 72, "intermediate_size": 288, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 48,
}
GEMMA3_VOCAB = 262_144
# shape -> (sizes on the GPU, sizes in the dry run, vocabulary, description)
SHAPES = {
    "llama32-1b": (LLAMA32_1B, TINY, VOCAB, "Llama-3.2-1B shape"),
    "gemma3-1b": (GEMMA3_1B, TINY_GEMMA, GEMMA3_VOCAB,
                  "Gemma-3-1B sizes on the Llama architecture (vocabulary 262,144, hidden 1152, 26 layers, 4 heads "
                  "of 256, 1 KV head, FFN 6912, tied embeddings; only the loss head's shape is Gemma 3's: no sliding window, QK-norm, "
                  "sandwich norms or GeLU)"),
    "qwen3-30b-a3b": (QWEN3_30B_A3B_FEWER_LAYERS, TINY_MOE, VOCAB,
                      "Qwen3-30B-A3B shape, 4 of 48 layers (128 experts, top-8; router losses on)"),
}
DEFAULT = "default"  # the recipes' defaults: fused loss head, packed attention through SDPA
# variant -> what differs from the default
VARIANTS = {
    DEFAULT: {"fused_loss_head": True, "attention": "sdpa"},
    "megatron-core loss": {"fused_loss_head": False, "attention": "sdpa"},
    "unfused attention": {"fused_loss_head": True, "attention": "unfused"},
}
# comparison -> (subject, baseline): ratios subject / baseline
COMPARISONS = {"loss head: fused / megatron-core": (DEFAULT, "megatron-core loss"),
               "packed attention: SDPA / unfused (+ core-attention recompute)": (DEFAULT, "unfused attention")}
# case -> (shape, seq (GPU, dry run), packs per global batch (GPU, dry run), variants)
CASES = {  # in the order they run: the three measurements the issue asks for first, seq 8192 after them
    "llama-4096": ("llama32-1b", (4096, 512), (4, 2), (DEFAULT, "megatron-core loss", "unfused attention")),
    "gemma-4096": ("gemma3-1b", (4096, 512), (4, 2), (DEFAULT, "megatron-core loss", "unfused attention")),
    "moe-4096": ("qwen3-30b-a3b", (4096, 512), (2, 2), (DEFAULT, "megatron-core loss")),
    "llama-8192": ("llama32-1b", (8192, 1024), (2, 1), (DEFAULT, "megatron-core loss")),
    "gemma-8192": ("gemma3-1b", (8192, 1024), (2, 1), (DEFAULT, "megatron-core loss")),
}


def variant_of_iteration(iteration: int, k: int) -> int:
    """Index of the variant that runs 0-based ``iteration``: rounds of ``k``, the order rotating by one each
    round (for k=2 this is ``step_overhead.kind_of_iteration``'s (A, B), (B, A), ... order)."""
    round_, position = divmod(iteration, k)
    return (position + round_) % k


def apply_variant(model, variant: dict) -> None:
    """Set a variant on the live model: the fused loss head (read per call by bridge_sft.step) and, without TE,
    the packed attention kernel, with core attention recomputed in backward for the unfused one (its s^2
    probabilities of every layer would not fit otherwise). Both are read at forward time."""
    from megatron.core.utils import get_model_config, unwrap_model

    get_model_config(model).fused_loss_head = variant["fused_loss_head"]
    unfused = variant["attention"] == "unfused"
    use_sdpa(not unfused)
    for module in unwrap_model(model).modules():
        if hasattr(module, "checkpoint_core_attention"):
            module.checkpoint_core_attention = unfused


def variant_forward_step(variants: list[str], used: dict):
    """bridge_sft's forward step, with the variant of the current iteration applied first; ``used[iteration]``
    records whether the fused loss head was passed to the model (bridge_sft.loss_head)."""
    from bridge_sft import loss_head
    from bridge_sft import step as sft_step

    def forward_step(state, data_iterator, model, return_schedule_plan: bool = False):
        iteration = state.train_state.step
        apply_variant(model, VARIANTS[variants[variant_of_iteration(iteration, len(variants))]])
        if model.training:
            used[iteration] = loss_head.output_processor_for(model) is not None
        return sft_step.forward_step(state, data_iterator, model, return_schedule_plan)

    return forward_step


def _round_budget_callback(k: int, budget_s: float):
    from megatron.bridge.training.callbacks import Callback

    class RoundBudget(Callback):
        """Stop training after the first complete round that ends ``budget_s`` seconds after training began."""

        def __init__(self):
            self.start, self.stopped_early = time.perf_counter(), False

        def on_train_start(self, context):
            self.start = time.perf_counter()

        def on_train_step_end(self, context):
            iteration, train = context.state.train_state.step, context.state.cfg.train
            if (iteration % k == k - 1 and iteration + 1 < train.train_iters
                    and time.perf_counter() - self.start > budget_s):
                train.train_iters, self.stopped_early = iteration + 1, True

    return RoundBudget()


def variant_run(config, variants: list[str], device: str, budget_s: float) -> dict:
    """Train ``config`` with the variants interleaved on repeated batches; per-iteration records."""
    from benchmarks.step_overhead import _iteration_recorder_class, batch_tokens, paired_provider
    from bridge_sft import train

    k, gbs = len(variants), config.train.global_batch_size
    config.dataset = paired_provider(config.dataset, gbs, repeats=k)
    recorder, budget, used = _iteration_recorder_class()(None), _round_budget_callback(k, budget_s), {}
    totals = train.run(config, device=device, callbacks=[recorder, budget],
                       forward_step_func=variant_forward_step(variants, used))
    paired = config.dataset.__dict__["_paired_train"]
    for record in recorder.records:
        record["kind"] = variants[variant_of_iteration(record["iteration"], k)]
        record["fused_loss_head_used"] = used.get(record["iteration"])
        record["supervised_tokens"], record["slots"] = batch_tokens(paired, record["iteration"])
    return {"records": recorder.records, "totals": totals, "stopped_early": budget.stopped_early,
            "packs": len(paired.base.plan), "samples": len(paired.base.indices)}


def summarize_case(name: str, result: dict, variants: list[str], warmup: int, settings: dict, env: dict) -> dict:
    """Per-variant figures, ratios of each comparison (per round, median and 95% CI) and self-checks."""
    from benchmarks.step_overhead import median_ci95

    records, k = result["records"], len(variants)
    timed = [r for r in records if r["iteration"] >= warmup and not r["skipped"]]
    per_variant = {v: step_figures([r for r in timed if r["kind"] == v]) for v in variants}
    for v in variants:
        used = [r["fused_loss_head_used"] for r in records if r["kind"] == v]
        per_variant[v]["fused_loss_head_used"] = f"{sum(map(bool, used))}/{len(used)} iterations"
    rounds: dict[int, dict] = {}
    for r in records:
        rounds.setdefault(r["iteration"] // k, {})[r["kind"]] = r
    comparisons, max_loss_diff = {}, {}
    for label, (subject, baseline) in COMPARISONS.items():
        if subject not in variants or baseline not in variants:
            continue
        pairs = [(rd[subject], rd[baseline]) for i, rd in rounds.items() if len(rd) == k and i * k >= warmup
                 and not rd[subject]["skipped"] and not rd[baseline]["skipped"]]
        time_ratios = [a["seconds"] / b["seconds"] for a, b in pairs]
        s, b = per_variant[subject], per_variant[baseline]
        comparisons[label] = {
            "subject": subject, "baseline": baseline, "rounds": len(pairs),
            "seconds_per_iteration (median of rounds)": statistics.median(time_ratios) if time_ratios else None,
            "seconds_per_iteration 95% CI": median_ci95(time_ratios) if time_ratios else None,
            "supervised_tokens_per_s": s["supervised_tokens_per_s_per_gpu"] / b["supervised_tokens_per_s_per_gpu"],
            "peak_memory": s["peak_memory_gib"] / b["peak_memory_gib"] if b["peak_memory_gib"] else None,
            "peak_memory_saved_gib": b["peak_memory_gib"] - s["peak_memory_gib"],
        }
        diffs = [abs(rd[subject]["loss"] - rd[baseline]["loss"]) / max(abs(rd[baseline]["loss"]), 1e-12)
                 for rd in rounds.values() if len(rd) == k and rd[subject]["loss"] is not None]
        max_loss_diff[label] = max(diffs, default=float("nan"))
    complete = [rd for rd in rounds.values() if len(rd) == k]
    return {
        "case": name, "environment": env, "settings": settings, "iterations_run": len(records),
        "stopped_early_by_budget": result["stopped_early"], "packs": result["packs"], "samples": result["samples"],
        "per_variant": per_variant, "comparisons": comparisons,
        "checks": {
            "max_round_loss_rel_diff": max_loss_diff,
            "same_supervised_tokens_in_every_round": all(len({r["supervised_tokens"] for r in rd.values()}) == 1
                                                         for rd in complete),
            "same_flops_in_every_round": all(len({r.get("flops") for r in rd.values()}) == 1 for rd in complete),
            "supervised_share_of_slots": sum(r["supervised_tokens"] for r in records)
            / max(1, sum(r["slots"] for r in records)),
        },
        "records": records,
    }


def case_markdown(summary: dict) -> str:
    """One case as Markdown: a row per variant, a line per comparison."""
    s, env = summary["settings"], summary["environment"]
    lines = [
        f"**{summary['case']}** ({DRY + '; ' if s['dry_run'] else ''}{s['shape_description']}): seq {s['seq_length']} "
        f"(packed), {s['global_batch_size']} packs per iteration, bf16, {summary['iterations_run']} iterations in "
        f"rounds of {len(s['variants'])} ({s['warmup']} untimed), {summary['packs']} packs of {summary['samples']} "
        f"conversations{'; stopped early by --budget-s' if summary['stopped_early_by_budget'] else ''}.",
        "",
        "| variant | s/iteration | supervised tok/s | slot tok/s | TFLOP/s | MFU | peak GiB | fused head used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["per_variant"].items():
        peak = f"{v['peak_memory_gib']:.2f}" if env["cuda"] else "n/a (CPU)"
        lines.append(f"| {name} | {v['seconds_per_iteration_median']:.4f} | "
                     f"{v['supervised_tokens_per_s_per_gpu']:,.0f} | {v['slot_tokens_per_s_per_gpu']:,.0f} | "
                     f"{v['model_tflops_per_gpu']:.2f} | {v['mfu_vs_989']:.2%} | {peak} | "
                     f"{v['fused_loss_head_used']} |")
    lines.append("")
    for label, c in summary["comparisons"].items():
        ci = c["seconds_per_iteration 95% CI"]
        time_ratio = c["seconds_per_iteration (median of rounds)"]
        memory = (f"peak memory {c['peak_memory']:.3f}x ({c['peak_memory_saved_gib']:+.2f} GiB saved)"
                  if c["peak_memory"] else "peak memory n/a")
        lines.append(f"- {label}: seconds per iteration {time_ratio:.4f}x (median of {c['rounds']} rounds, 95% CI "
                     f"{ci[0]:.4f}-{ci[1]:.4f}), supervised tokens/s {c['supervised_tokens_per_s']:.4f}x, {memory}; "
                     f"max loss difference within a round "
                     f"{summary['checks']['max_round_loss_rel_diff'][label]:.2e}.")
    return "\n".join(lines)

def run_case(args, env: dict, device: str, out: Path, work: Path) -> dict:
    """One case of the suite (``--case``): build or reuse the model and data under ``work``, train, report."""
    from benchmarks import long_conversations
    from bridge_sft.tiny import SAMPLE_DIALOGS

    shape, seqs, packs, variants = CASES[args.case]
    if env["transformer_engine"]:  # TE's attention: no local kernels to compare
        variants = tuple(v for v in variants if VARIANTS[v]["attention"] == "sdpa")
    gpu_sizes, dry_sizes, vocab, description = SHAPES[shape]
    k = len(variants)
    args.seq_length = args.seq_length or seqs[args.dry_run]
    args.global_batch_size = args.global_batch_size or packs[args.dry_run]
    args.iters = k * (args.rounds or (3 if args.dry_run else 7))
    args.warmup = k * (args.warmup_rounds if args.warmup_rounds is not None else (1 if args.dry_run else 2))
    hf_dir = work / f"hf-{shape}"
    if not (hf_dir / "config.json").exists():
        build = build_hf_moe_model if shape == "qwen3-30b-a3b" else build_hf_model
        build(hf_dir, dry_sizes if args.dry_run else gpu_sizes, device, vocab)
    data = work / "long_conversations.jsonl"
    if not data.exists():
        long_conversations.build(SAMPLE_DIALOGS, data)
    args.recompute = "none"  # the unfused variant recomputes core attention (apply_variant)
    config = make_config(hf_dir, data, work / f"run-{args.case}", args, env)
    log(f"case {args.case}: {description}, seq {args.seq_length}, variants {', '.join(variants)} ...")
    t0 = time.perf_counter()
    result = variant_run(config, list(variants), device, args.budget_s)
    log(f"case {args.case}: training done in {time.perf_counter() - t0:.1f}s")
    settings = {"dry_run": args.dry_run, "shape": shape, "shape_description": description, "vocab": vocab,
                "parameters_b": hf_parameter_count(hf_dir) / 1e9, "seq_length": args.seq_length,
                "global_batch_size": args.global_batch_size, "iters": args.iters, "warmup": args.warmup,
                "variants": list(variants), "budget_s": args.budget_s}
    summary = summarize_case(args.case, result, list(variants), args.warmup, settings, env)
    (out / "case.json").write_text(json.dumps(summary, indent=1))
    report = case_markdown(summary)
    (out / "case.md").write_text(report + "\n")
    print(report, flush=True)
    return summary


def run_suite(args) -> dict:
    """``--suite``: every case of ``--cases`` (default: all) in its own process, one after another, within
    ``--suite-budget-s`` (a case starts only with ``--case-reserve-s`` left, trains for at most
    ``--case-budget-s``, and is stopped at the end of the budget); one report ``gpu_check_suite.md`` /
    ``.json`` in ``--out``, each case's own in ``--out/CASE``."""
    import subprocess
    import tempfile

    out = Path(args.out or os.environ.get("OUT") or REPO / "outputs" / "bench" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    passthrough = ["--dry-run"] if args.dry_run else []
    for option in ("rounds", "warmup_rounds", "seq_length", "global_batch_size"):
        if getattr(args, option) is not None:
            passthrough += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="bridge_sft_gpu_suite_") as tmp:
        work = Path(args.work_dir or tmp)
        for name in args.cases or list(CASES):
            left = args.suite_budget_s - (time.perf_counter() - start)
            if left < args.case_reserve_s:
                results[name] = {"case": name, "skipped": f"suite budget: {left:.0f}s left"}
                log(f"case {name}: skipped ({results[name]['skipped']})")
                continue
            case_out = out / name
            case_out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(CHECK), "--case", name, "--out", str(case_out),
                   "--work-dir", str(work), "--budget-s", str(min(args.case_budget_s, max(20.0, left - 60.0))),
                   *passthrough]
            log(f"case {name}: {' '.join(cmd[2:])}")
            try:
                proc = subprocess.run(cmd, cwd=REPO, timeout=left, check=False)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code == 0:
                results[name] = json.loads((case_out / "case.json").read_text())
            else:
                results[name] = {"case": name, "failed": f"exit {code}"}
    summary = {"cases": results, "seconds": time.perf_counter() - start,
               "environment": next((r["environment"] for r in results.values() if "environment" in r), None)}
    (out / "gpu_check_suite.json").write_text(json.dumps(summary, indent=1))
    report = suite_markdown(summary)
    (out / "gpu_check_suite.md").write_text(report + "\n")
    print(report, flush=True)
    return summary


def suite_markdown(summary: dict) -> str:
    env = summary["environment"] or {}
    lines = [f"GPU check suite: {env.get('device', '?')}, torch {env.get('torch', '?')}, megatron-core "
             f"{env.get('megatron-core', '?')}, megatron-bridge {env.get('megatron-bridge', '?')}; "
             f"{summary['seconds']:.0f}s for all cases.", f"Layers: {env.get('layers', '?')}.", ""]
    for name, case in summary["cases"].items():
        if "per_variant" in case:
            lines += [case_markdown(case), ""]
        else:
            lines += [f"**{name}**: {case.get('skipped') or case.get('failed')}", ""]
    return "\n".join(lines)
