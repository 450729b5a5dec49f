"""Benchmark: the "manual" loss path against the model-internal per-token path (CPU).

manual:   logits = model(...)  ->  logits[:, :-1].contiguous()  ->  F.cross_entropy(reduction="none")
          ->  * mask  ->  sum / count        (what SFT code without labels-in does)
internal: model(..., labels=labels) returns per-token losses [b, s] (megatron-core's
          vocab-parallel cross-entropy, in place on the logits)  ->  Bridge's masked_next_token_loss

Both run forward + backward on a megatron-core GPTModel built on the CPU runtime, at the
Qwen vocabulary (151,936), micro-batch 1, seq 2048 and 4096, in fp32 and bf16 (bf16 weights
and logits; the bf16 manual path upcasts its logits to fp32, the accuracy the internal
path has). Two levels:

- ``head``: output projection + loss from given hidden states (the part the paths differ in);
- ``step``: the whole (1-layer) model, to check that the gain survives a full step.

Time: median of repeated runs; memory: extra resident memory at the peak (benchmarks.common).
Ratios compare paths measured in the same process. ``python benchmarks/loss_path.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, median_seconds, peak_rss_mb  # noqa: E402

VOCAB = 151_936
HIDDEN = 64


def _measure(dtype_name: str, seqs: list[int], repeats: int) -> list[dict]:
    """Worker: build the model once per sequence length and measure every path (one process)."""
    from bridge_sft import cpu

    cpu.enable()
    import torch
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.losses import masked_next_token_loss
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)

    def manual(logits_bsv, input_ids, mask, upcast):
        shift_logits = logits_bsv[:, :-1, :].contiguous()
        if upcast:
            shift_logits = shift_logits.float()
        per_token = F.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)), input_ids[:, 1:].reshape(-1), reduction="none"
        )
        m = mask[:, 1:].reshape(-1).float()
        return (per_token * m).sum() / m.sum()

    def internal(losses, mask):
        loss_sum, num_tokens, _ = masked_next_token_loss(mask, losses)
        return loss_sum / num_tokens

    rows = []
    with temporary_distributed_context(backend="gloo"):
        for seq in seqs:
            provider = GPTModelProvider(
                num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=4,
                num_query_groups=4, vocab_size=VOCAB, seq_length=seq, normalization="RMSNorm",
                gated_linear_unit=True, activation_func=F.silu, position_embedding_type="rope",
                share_embeddings_and_output_weights=False, add_bias_linear=False, make_vocab_size_divisible_by=128,
                bf16=dtype == torch.bfloat16, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
            )
            cpu.configure_model(provider)
            provider.finalize()
            (model,) = provider.provide_distributed_model(wrap_with_ddp=False, mixed_precision_wrapper=None)
            input_ids = torch.randint(0, VOCAB, (1, seq))
            positions = torch.arange(seq)[None]
            labels = torch.roll(input_ids, -1, dims=1)
            mask = (torch.rand(1, seq) < 0.7).float()
            hidden = torch.randn(seq, 1, HIDDEN, dtype=dtype, requires_grad=True)

            def head_internal():
                logits, _ = model.output_layer(hidden)
                internal(model.compute_language_model_loss(labels, logits), mask).backward()

            def head_manual(upcast):
                logits, _ = model.output_layer(hidden)
                manual(logits.transpose(0, 1).contiguous(), input_ids, mask, upcast).backward()

            def step_internal():
                internal(model(input_ids, positions, None, labels=labels), mask).backward()

            def step_manual(upcast):
                manual(model(input_ids, positions, None), input_ids, mask, upcast).backward()

            cases = {
                ("head", "internal"): head_internal,
                ("head", "manual"): lambda: head_manual(upcast=False),
                ("step", "internal"): step_internal,
                ("step", "manual"): lambda: step_manual(upcast=False),
            }
            if dtype == torch.bfloat16:
                cases[("head", "manual+upcast")] = lambda: head_manual(upcast=True)
                cases[("step", "manual+upcast")] = lambda: step_manual(upcast=True)
            for (level, path), fn in cases.items():
                model.zero_grad(set_to_none=True)
                peak = peak_rss_mb(fn)
                model.zero_grad(set_to_none=True)
                seconds = median_seconds(fn, repeats=repeats, warmup=0)
                rows.append({"dtype": dtype_name, "seq": seq, "level": level, "path": path,
                             "median_s": seconds, "peak_mb": peak})
            del model
    return rows


def run(quick: bool = False) -> list[dict]:
    """Measure both dtypes (one fresh process each) and return per-path rows plus ratio rows."""
    seqs = [2048] if quick else [2048, 4096]
    repeats = 1 if quick else 3
    rows = []
    for dtype in ("fp32", "bf16"):
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", dtype, "--seqs", *map(str, seqs), "--repeats", str(repeats)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"loss_path worker ({dtype}) failed:\n{proc.stderr[-4000:]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    return rows + ratios(rows)


def ratios(rows: list[dict]) -> list[dict]:
    """Memory: manual fp32 / internal (same dtype); time: bf16 manual+upcast / bf16 internal."""
    by = {(r["dtype"], r["seq"], r["level"], r["path"]): r for r in rows}
    out = []
    for (dtype, seq, level, path), r in sorted(by.items()):
        if path != "internal":
            continue
        baseline = by.get((dtype, seq, level, "manual+upcast" if dtype == "bf16" else "manual"))
        out.append({
            "benchmark": "loss path", "dtype": dtype, "seq": seq, "level": level,
            "baseline": baseline["path"],
            "memory_ratio (baseline/internal)": baseline["peak_mb"] / r["peak_mb"],
            "speedup (baseline/internal)": baseline["median_s"] / r["median_s"],
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq 2048 only, one repeat")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 4096], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker, args.seqs, args.repeats)))
        return
    rows = run(quick=args.quick)
    print(markdown_table([r for r in rows if "path" in r]))
    print()
    print(markdown_table([r for r in rows if "benchmark" in r]))


if __name__ == "__main__":
    main()
