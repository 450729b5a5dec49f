"""MoE step overhead: per-iteration time of bridge-sft's forward step vs Megatron-Bridge's own
``gpt_step.forward_step`` on a tiny mixture-of-experts model, interleaved in one training run.

The machinery of ``benchmarks/step_overhead.py`` (pairs of iterations on identical packed
batches, lr 0, equal losses checked, median of per-pair ratios with a bootstrap CI), on
``benchmarks.moe_common.build_tiny_moe`` (Qwen3-MoE, hidden 64, 2 layers, 4 experts, top-2)
with the load-balancing loss and the z-loss on. Our step then does everything it does for
MoE: the step's read-ahead and its supervised-token all-reduce, the padding mask to the
routers, the per-micro-batch router-loss scale hook; ``RouterHealth`` counts expert loads in
both kinds of iterations (it is a model hook of the run, not part of a step). A tiny model
on the CPU is the worst case for a per-micro-batch cost. Target: ratio <= 1.02.

``python benchmarks/moe_step_overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import step_overhead  # noqa: E402
from benchmarks.moe_common import apply_cpu_moe_overrides, build_tiny_moe  # noqa: E402

AUX_COEFF, Z_COEFF = 0.01, 0.001


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from bridge_sft.recipes import tiny

    config = tiny(
        spec["hf_path"], output_dir=spec["output_dir"], seq_length=spec["seq_length"],
        global_batch_size=spec["global_batch_size"], micro_batch_size=1, train_iters=spec["iters"],
        lr=0.0, min_lr=0.0, warmup_iters=0, eval_interval=None, eval_iters=0, save_interval=None, save_hf=False,
        validation_fraction=0.0, log_interval=spec["iters"],
    )
    apply_cpu_moe_overrides(config)
    config.model.moe_aux_loss_coeff, config.model.moe_z_loss_coeff = AUX_COEFF, Z_COEFF
    config.checkpoint.save = config.checkpoint.load = config.logger.tensorboard_dir = None
    result = step_overhead.interleaved_run(config, device="cpu")
    Path(spec["out"]).write_text(json.dumps(result))


def run(quick: bool = False, repeats: int | None = None, iters: int | None = None, warmup: int = 4) -> list[dict]:
    """``repeats`` training processes of ``iters`` interleaved iterations; one row per process + a summary.
    Defaults: quick 1 x 40, else 3 x 60."""
    repeats = repeats or (1 if quick else 3)
    iters = iters or (40 if quick else 60)
    iters += iters % 2
    rows, all_ratios, all_records, counted = [], [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="bench-moe-step-") as tmp:
        hf_path = build_tiny_moe(Path(tmp) / "tiny-moe")
        for process in range(repeats):
            spec = {"hf_path": str(hf_path), "output_dir": str(Path(tmp) / f"run{process}"), "seq_length": 256,
                    "global_batch_size": 8, "iters": iters, "out": str(Path(tmp) / f"result{process}.json")}
            spec_path = Path(tmp) / f"spec{process}.json"
            spec_path.write_text(json.dumps(spec))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"moe_step_overhead worker {process} failed:\n{proc.stdout[-4000:]}")
            result = json.loads(Path(spec["out"]).read_text())
            records = result["records"]
            ratios = step_overhead.pair_ratios(records, warmup)
            p25, median, p75 = step_overhead._quantiles(ratios)
            timed = [r for r in records if r["iteration"] >= warmup]
            rows.append({
                "benchmark": "moe_step_overhead", "process": process, "iterations": len(records), "pairs": len(ratios),
                "ours_median_ms": 1e3 * statistics.median(r["seconds"] for r in timed if r["kind"] == step_overhead.OURS),
                "bridge_median_ms": 1e3 * statistics.median(
                    r["seconds"] for r in timed if r["kind"] == step_overhead.BRIDGE),
                "ratio_median": median, "ratio_p25": p25, "ratio_p75": p75,
            })
            all_ratios += ratios
            all_records += [dict(r, iteration=r["iteration"] + process * 10**6) for r in records]
            counted += result["totals"]["supervised_tokens"]
    p25, median, p75 = step_overhead._quantiles(all_ratios)
    low, high = step_overhead.median_ci95(all_ratios)
    rows.append({
        "benchmark": "moe_step_overhead", "summary": True,
        "model": "tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts, top-2), CPU", "seq_length": 256,
        "global_batch_size": 8, "moe_aux_loss_coeff": AUX_COEFF, "moe_z_loss_coeff": Z_COEFF, "processes": repeats,
        "pairs": len(all_ratios), "ratio (ours/bridge)": median, "ratio_ci95_low": low, "ratio_ci95_high": high,
        "ratio_p25": p25, "ratio_p75": p75, "ratio_min": min(all_ratios), "ratio_max": max(all_ratios),
        "target": step_overhead.TARGET, **step_overhead.consistency(all_records, counted),
    })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| process | pairs | ours ms/iter | Bridge ms/iter | ratio (median of pairs) | p25-p75 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "process" in r:
            lines.append(f"| {r['process']} | {r['pairs']} | {r['ours_median_ms']:.1f} | {r['bridge_median_ms']:.1f} | "
                         f"{r['ratio_median']:.4f} | {r['ratio_p25']:.4f}-{r['ratio_p75']:.4f} |")
    for r in rows:
        if r.get("summary"):
            lines.append(
                f"\nAll {r['pairs']} pairs ({r['model']}, router losses on): ratio {r['ratio (ours/bridge)']:.4f} "
                f"(95% CI of the median {r['ratio_ci95_low']:.4f}-{r['ratio_ci95_high']:.4f}; p25-p75 "
                f"{r['ratio_p25']:.4f}-{r['ratio_p75']:.4f}; target <= {r['target']}). Max pair loss difference "
                f"{r['max_pair_loss_rel_diff']:.2e}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one process of 40 iterations")
    parser.add_argument("--repeats", type=int, help="training processes (default 3, quick 1)")
    parser.add_argument("--iters", type=int, help="iterations per process (default 60, quick 40)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    print(markdown(run(quick=args.quick, repeats=args.repeats, iters=args.iters)))


if __name__ == "__main__":
    main()
