"""Benchmark: the loss paths of SFT on the CPU: "manual", megatron-core's "internal" one, and our "fused" head.

manual:   logits = model(...)  ->  logits[:, :-1].contiguous()  ->  F.cross_entropy(reduction="none")
          ->  * mask  ->  sum / count        (what SFT code without labels-in does)
internal: model(..., labels=labels) returns per-token losses [b, s] (megatron-core's output layer and
          vocab-parallel cross-entropy over the full logits)  ->  Bridge's masked_next_token_loss
fused:    the same call with GPTModel's ``output_processor`` = ``bridge_sft.loss_head`` (output projection
          + cross-entropy in chunks of tokens, logits recomputed in backward; the forward step's default)

All run forward + backward on a megatron-core GPTModel (one layer) built on the CPU runtime, micro-batch 1,
with 70% of the tokens supervised (``loss_mask``). Two levels:

- ``head``: output projection + loss from given hidden states (the part the paths differ in);
- ``step``: the whole (1-layer) model, to check that the gain survives a full step.

Two sections:

1. **paths** (hidden 64, Qwen vocabulary 151,936, seq 2048 and 4096, fp32 and bf16): manual vs internal
   (memory and time ratios baseline / internal, as before), and fused vs internal;
2. **target shape** (``--target``; 40+ minutes, so not part of ``benchmarks/run.py``): seq 4096, hidden
   1024, fp32, vocabularies 151,936 (Qwen) and 262,144 (Gemma 3), head and step, fused vs internal.
   Targets: head peak memory <= 0.35x and time <= 1.3x of internal. The step feeds one packed row of
   four 1,024-token sequences (THD, the recipes' packing), whose attention runs through torch SDPA
   (``bridge_sft.runtime``). The head is also measured with every token supervised (``100%``): the fused
   backward skips unsupervised tokens, so its time ratio depends on their share. ``--levels head`` and
   ``--repeats N`` (ABBA rounds) for more timed runs of the head alone.

Time: median (of repeated runs, internal and fused interleaved ABBA in the target section); memory: extra
resident memory at the peak (``benchmarks.common.peak_rss_mb``). Ratios compare paths measured in the
same process. ``python benchmarks/loss_path.py [--quick | --target]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, median_seconds, peak_rss_mb  # noqa: E402

VOCAB = 151_936
HIDDEN = 64
SUPERVISED_SHARE = 0.7
TARGET_SEQ, TARGET_HIDDEN, TARGET_VOCABS = 4096, 1024, (151_936, 262_144)
TARGET_MEMORY, TARGET_TIME = 0.35, 1.3


def _setup(dtype_name: str):
    from bridge_sft import runtime

    runtime.enable()
    import torch

    return torch, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]


def _build(vocab: int, hidden: int, seq: int, dtype, heads: int = 4):
    """A 1-layer megatron-core GPTModel (Bridge's provider, CPU runtime: megatron-core's TE spec on plain-torch modules), untied."""
    import torch
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    from bridge_sft import runtime

    provider = GPTModelProvider(
        num_layers=1, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
        num_query_groups=heads, vocab_size=vocab, seq_length=seq, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, position_embedding_type="rope",
        share_embeddings_and_output_weights=False, add_bias_linear=False, make_vocab_size_divisible_by=128,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
    )
    runtime.configure_model(provider)
    provider.finalize()
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False, mixed_precision_wrapper=None)
    return model


def _masked_mean(losses, mask):
    from megatron.bridge.training.losses import masked_next_token_loss

    loss_sum, num_tokens, _ = masked_next_token_loss(mask, losses)
    return loss_sum / num_tokens


def _measure(dtype_name: str, seqs: list[int], repeats: int) -> list[dict]:
    """Worker, section 1: build the model once per sequence length and measure every path (one process)."""
    torch, dtype = _setup(dtype_name)
    import torch.nn.functional as F
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    from bridge_sft import loss_head

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

    rows = []
    with temporary_distributed_context(backend="gloo"):
        for seq in seqs:
            model = _build(VOCAB, HIDDEN, seq, dtype)
            fused = loss_head.output_processor_for(model)
            input_ids = torch.randint(0, VOCAB, (1, seq))
            positions = torch.arange(seq)[None]
            labels = torch.roll(input_ids, -1, dims=1)
            mask = (torch.rand(1, seq) < SUPERVISED_SHARE).float()
            hidden = torch.randn(seq, 1, HIDDEN, dtype=dtype, requires_grad=True)

            def head_internal():
                logits, _ = model.output_layer(hidden)
                _masked_mean(model.compute_language_model_loss(labels, logits), mask).backward()

            def head_fused():
                _masked_mean(loss_head.fused_loss(hidden, labels, model.output_layer), mask).backward()

            def head_manual(upcast):
                logits, _ = model.output_layer(hidden)
                manual(logits.transpose(0, 1).contiguous(), input_ids, mask, upcast).backward()

            def step_internal():
                _masked_mean(model(input_ids, positions, None, labels=labels), mask).backward()

            def step_fused():
                _masked_mean(model(input_ids, positions, None, labels=labels, output_processor=fused), mask).backward()

            def step_manual(upcast):
                manual(model(input_ids, positions, None), input_ids, mask, upcast).backward()

            cases = {
                ("head", "internal"): head_internal,
                ("head", "manual"): lambda: head_manual(upcast=False),
                ("head", "fused"): head_fused,
                ("step", "internal"): step_internal,
                ("step", "manual"): lambda: step_manual(upcast=False),
                ("step", "fused"): step_fused,
            }
            if dtype == torch.bfloat16:
                cases[("head", "manual+upcast")] = lambda: head_manual(upcast=True)
                cases[("step", "manual+upcast")] = lambda: step_manual(upcast=True)
            for (level, path), fn in cases.items():
                model.zero_grad(set_to_none=True)
                hidden.grad = None
                peak = peak_rss_mb(fn)
                model.zero_grad(set_to_none=True)
                hidden.grad = None
                seconds = median_seconds(fn, repeats=repeats, warmup=0)
                rows.append({"dtype": dtype_name, "seq": seq, "hidden": HIDDEN, "vocab": VOCAB, "level": level,
                             "path": path, "median_s": seconds, "peak_mb": peak})
            del model
    return rows


def _measure_target(vocab: int, repeats: int, levels: list[str]) -> list[dict]:
    """Worker, section 2: seq 4096, hidden 1024, fp32, ``vocab``: internal vs fused, head and step."""
    torch, dtype = _setup("fp32")
    from megatron.bridge.training.model_load_save import temporary_distributed_context
    from megatron.core.packed_seq_params import PackedSeqParams

    from bridge_sft import loss_head

    seq, hidden_size = TARGET_SEQ, TARGET_HIDDEN
    torch.manual_seed(0)
    rows = []
    with temporary_distributed_context(backend="gloo"):
        model = _build(vocab, hidden_size, seq, dtype, heads=16)
        fused = loss_head.output_processor_for(model)
        assert fused is not None, loss_head.unsupported_reason(model)
        input_ids = torch.randint(0, vocab, (1, seq))
        labels = torch.roll(input_ids, -1, dims=1)
        hidden = torch.randn(seq, 1, hidden_size, dtype=dtype, requires_grad=True)
        masks = {"70%": (torch.rand(1, seq) < SUPERVISED_SHARE).float(), "100%": torch.ones(1, seq)}
        cu = torch.arange(0, seq + 1, 1024, dtype=torch.int32)  # one packed row of 4 sequences of 1,024
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=1024,
                                 max_seqlen_kv=1024)
        positions = (torch.arange(seq) % 1024)[None]

        def head(path, mask):
            if path == "fused":
                losses = loss_head.fused_loss(hidden, labels, model.output_layer)
            else:
                losses = model.compute_language_model_loss(labels, model.output_layer(hidden)[0])
            _masked_mean(losses, mask).backward()

        def step(path, mask):
            extra = {"output_processor": fused} if path == "fused" else {}
            losses = model(input_ids, positions, None, labels=labels, packed_seq_params=packed, **extra)
            _masked_mean(losses, mask).backward()

        plan = [("head", "70%"), ("step", "70%"), ("head", "100%")]
        plan = [(level, share) for level, share in plan if level in levels]
        for level, share in plan:
            fn = {"head": head, "step": step}[level]
            runs = {"internal": [], "fused": []}
            for path in ["internal", "fused", "fused", "internal"] * repeats:  # ABBA: drift cancels
                model.zero_grad(set_to_none=True)
                hidden.grad = None
                t0 = time.perf_counter()
                peak = peak_rss_mb(lambda: fn(path, masks[share]))
                runs[path].append((time.perf_counter() - t0, peak))
            for path, measured in runs.items():
                rows.append({"dtype": "fp32", "seq": seq, "hidden": hidden_size, "vocab": vocab, "level": level,
                             "supervised": share, "path": path, "median_s": statistics.median(s for s, _ in measured),
                             "peak_mb": max(p for _, p in measured), "runs_s": [round(t, 2) for t, _ in measured]})
    return rows


def _worker(args: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loss_path worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, target: bool = False, repeats: int | None = None) -> list[dict]:
    """Measure (one fresh process per dtype / vocabulary) and return per-path rows plus ratio rows.

    ``quick``: section 1 at seq 2048, one repeat. ``target``: section 2 as well (40+ minutes on 2 cores,
    longer than ``benchmarks/run.py`` gives one benchmark: run it with ``--target``).
    """
    seqs = [2048] if quick else [2048, 4096]
    rows = []
    for dtype in ("fp32", "bf16"):
        rows += _worker(["--worker", dtype, "--seqs", *map(str, seqs),
                         "--repeats", str(repeats or (1 if quick else 3))])
    return rows + (run_target(repeats) if target else []) + ratios(rows)


def run_target(repeats: int | None = None, levels: tuple[str, ...] = ("head", "step")) -> list[dict]:
    """Section 2 alone: rows and their ratio rows."""
    rows = []
    for vocab in TARGET_VOCABS:
        rows += _worker(["--target-worker", str(vocab), "--repeats", str(repeats or 1), "--levels", *levels])
    return rows + ratios(rows)


def ratios(rows: list[dict]) -> list[dict]:
    """Manual vs internal (memory: manual / internal; time: bf16 manual+upcast / bf16 internal, as
    before), and fused vs internal (fused / internal: < 1 means the fused head needs less)."""
    by = {(r["dtype"], r["seq"], r["hidden"], r["vocab"], r["level"], r.get("supervised", "70%"), r["path"]): r
          for r in rows if "path" in r}
    out = []
    for (dtype, seq, hidden, vocab, level, share, path), r in sorted(by.items()):
        if path != "internal":
            continue
        baseline = by.get((dtype, seq, hidden, vocab, level, share, "manual+upcast" if dtype == "bf16" else "manual"))
        if baseline is not None:
            out.append({
                "benchmark": "loss path", "dtype": dtype, "seq": seq, "level": level,
                "baseline": baseline["path"],
                "memory_ratio (baseline/internal)": baseline["peak_mb"] / r["peak_mb"],
                "speedup (baseline/internal)": baseline["median_s"] / r["median_s"],
            })
        fused = by.get((dtype, seq, hidden, vocab, level, share, "fused"))
        if fused is not None:
            row = {
                "benchmark": "fused loss head", "dtype": dtype, "seq": seq, "hidden": hidden, "vocab": vocab,
                "level": level, "supervised": share,
                "internal_peak_mb": r["peak_mb"], "fused_peak_mb": fused["peak_mb"],
                "memory_ratio (fused/internal)": fused["peak_mb"] / r["peak_mb"],
                "time_ratio (fused/internal)": fused["median_s"] / r["median_s"],
            }
            if (seq, hidden, level) == (TARGET_SEQ, TARGET_HIDDEN, "head"):
                row["targets"] = f"memory <= {TARGET_MEMORY}, time <= {TARGET_TIME}"
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="section 1 only, seq 2048, one repeat")
    parser.add_argument("--target", action="store_true",
                        help="section 2 only: seq 4096, hidden 1024, fp32, vocab 151,936 and 262,144 (~30-40 min)")
    parser.add_argument("--repeats", type=int, help="timed runs per path (section 2: ABBA rounds)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--target-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--levels", nargs="+", choices=("head", "step"), default=["head", "step"],
                        help="section 2: the levels to measure (default both)")
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 4096], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker, args.seqs, args.repeats or 3)))
        return
    if args.target_worker:
        print(json.dumps(_measure_target(args.target_worker, args.repeats or 1, args.levels)))
        return
    if args.target:
        rows = run_target(args.repeats, tuple(args.levels))
    else:
        rows = run(quick=args.quick, repeats=args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown_table([r for r in rows if "path" in r]))
    print()
    print(markdown_table([r for r in rows if r.get("benchmark") == "loss path"]))
    print()
    print(markdown_table([r for r in rows if r.get("benchmark") == "fused loss head"]))


if __name__ == "__main__":
    main()
