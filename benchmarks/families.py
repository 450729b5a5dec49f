"""Step time of each tiny model family on the CPU runtime, as a ratio to the tiny Llama of the same size.

    python benchmarks/families.py            # all families, 12 rounds (a minute or two on 2 cores)
    python benchmarks/families.py --quick    # 4 rounds

Every family of ``bridge_sft.tiny.TINY_ARCHS`` (2 layers, hidden 64) is built from its HF checkpoint
with ``bridge_sft.models.megatron_provider`` on the CPU runtime (megatron-core's TE layer spec on
``bridge_sft.runtime.te_torch``), fp32, in one process. One step is the forward and backward pass of
one THD pack of 256 tokens (four sequences of 64) with labels. The families are timed in rotating
rounds (every round times each family once, starting one family later than the round before), so
load changes on the machine fall on all of them alike; the figure is the median over rounds and
the ratio is against the tiny Llama's median. No absolute target on the CPU: the table shows
whether a family is pathologically slow on the stand-ins.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SEQUENCES, LENGTH = 4, 64


def _build(hf_dir):
    import torch

    from bridge_sft import runtime
    from bridge_sft.models import megatron_provider

    provider = megatron_provider(str(hf_dir), load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.finalize()
    return provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].train()


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    losses = model(**batch)
    losses.sum().backward()


def run(quick: bool = False, rounds: int | None = None) -> list[dict]:
    import torch

    from bridge_sft import runtime

    runtime.enable()
    from megatron.bridge.training.model_load_save import temporary_distributed_context
    from megatron.core.packed_seq_params import PackedSeqParams

    from bridge_sft.tiny import TINY_ARCHS, build_tiny_model

    rounds = rounds or (4 if quick else 12)
    torch.manual_seed(0)
    total = SEQUENCES * LENGTH
    cu = torch.arange(0, total + 1, LENGTH, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=LENGTH,
                             max_seqlen_kv=LENGTH)
    ids = torch.randint(10, 400, (1, total + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": None,
             "position_ids": torch.arange(LENGTH).repeat(SEQUENCES)[None], "packed_seq_params": packed}
    times: dict[str, list[float]] = {arch: [] for arch in TINY_ARCHS}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, temporary_distributed_context(backend="gloo"):
        models = {}
        for arch in TINY_ARCHS:
            models[arch] = _build(build_tiny_model(Path(tmp) / arch, arch=arch))
            params[arch] = sum(p.numel() for p in models[arch].parameters())
            _step(models[arch], batch)  # warm-up
        order = list(TINY_ARCHS)
        for r in range(rounds):
            for arch in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                _step(models[arch], batch)
                times[arch].append(time.perf_counter() - start)
    base = statistics.median(times["llama"])
    return [{"benchmark": "families", "family": arch, "parameters": params[arch],
             "median_ms": 1000 * statistics.median(t), "ratio_vs_llama": statistics.median(t) / base,
             "rounds": rounds, "tokens": total} for arch, t in times.items()]


def _table(rows: list[dict]) -> str:
    """The command line's table (not named ``markdown``: benchmarks/run.py prints every column of the rows)."""
    return common.markdown_table(rows, ["family", "parameters", "median_ms", "ratio_vs_llama"])


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, _table, quick_help=None, options=[("--rounds", {"type": int})], argv=argv)


if __name__ == "__main__":
    main()
