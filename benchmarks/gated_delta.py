"""The gated DeltaNet stand-ins (``bridge_sft.runtime.gated_delta``, served as ``fla``) against the per-token loops
they replace, at the flagship's shape.

    python benchmarks/gated_delta.py           # sequence 4,096, 32 heads of 128 (a minute or two on 2 cores)
    python benchmarks/gated_delta.py --quick   # sequence 1,024, 8 heads

The gated delta rule of Qwen3-Next-80B-A3B (and Qwen3.5): 32 value heads after the GQA repeat, key and value head
dim 128, batch 1, fp32, with HF transformers' two torch paths of ``modeling_qwen3_next`` as the baselines: the
per-token ``torch_recurrent_gated_delta_rule`` (the recurrence itself: the issue asks the chunked form to be at
least 5x faster than it) and ``torch_chunk_gated_delta_rule`` (HF's chunked path, whose triangular inverse is a
64-step Python loop). Rows: forward at the full shape; forward and backward with fewer heads (4; 2 with
``--quick``), since the per-token loop's backward keeps every token's ``[heads, 128, 128]`` state (4,096 x 64 KiB
per head and saved tensor); forward and backward at the full shape without the loop (ours vs HF chunked); the
short convolution (``causal_conv1d``, width 4, 8,192 channels: the 80B's q, k and v) against a per-token loop.

Rounds run the ways side by side (3; 2 with ``--quick``); figures are medians of CPU time of this process
(``time.process_time``: one thread, so a busy shared machine bends them less), wall time beside; ratios are
baseline / ours; max |difference| against ``diff_against`` (gradients: the largest over q, k, v, g and beta).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

QWEN3_NEXT_80B = {"heads": 32, "head_dim": 128, "conv_channels": 2 * 16 * 128 + 32 * 128, "conv_width": 4}
KEYS = ("q", "k", "v", "g", "beta")


def _inputs(length: int, heads: int, dim: int, grad: bool = False) -> dict:
    """Unit keys, decays g = logsigmoid(.) <= 0 and beta in (0, 1), as a trained layer feeds the rule."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, heads, dim, generator=gen) for _ in range(3))
    inputs = dict(q=q, k=F.normalize(k, dim=-1), v=v, g=F.logsigmoid(torch.randn(1, length, heads, generator=gen) + 3),
                  beta=torch.sigmoid(torch.randn(1, length, heads, generator=gen)))
    return {n: t.requires_grad_(grad) for n, t in inputs.items()}


def _ways():
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule)

    from bridge_sft.runtime.gated_delta import chunk_gated_delta_rule

    return {"ours_chunked": lambda x: chunk_gated_delta_rule(*(x[n] for n in KEYS))[0],
            "hf_chunked": lambda x: torch_chunk_gated_delta_rule(*(x[n] for n in KEYS))[0],
            "recurrence": lambda x: torch_recurrent_gated_delta_rule(*(x[n] for n in KEYS), None, False)[0]}


def _timed_rounds(ways: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Each way once per round, side by side: (median CPU s, median wall s, the last result) per way."""
    cpu, wall, result = ({n: [] for n in ways} for _ in range(3))
    for _ in range(rounds):
        for name, fn in ways.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            result[name] = fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return ({n: statistics.median(t) for n, t in cpu.items()}, {n: statistics.median(t) for n, t in wall.items()},
            result)


def _rule_row(what: str, length: int, heads: int, dim: int, rounds: int, backward: bool,
              loop: bool = True) -> dict:
    """Ours, HF's chunked path and (``loop``) HF's per-token loop; differences against the loop, else HF chunked."""
    import torch

    inputs = _inputs(length, heads, dim, grad=backward)
    gen = torch.Generator().manual_seed(1)
    cotangent = torch.randn(1, length, heads, dim, generator=gen)

    def timed(fn):
        if not backward:  # the inputs need no gradient: no graph is kept
            return lambda: fn(inputs)
        return lambda: torch.autograd.grad((fn(inputs) * cotangent).sum(), [inputs[n] for n in KEYS])

    ways = {n: fn for n, fn in _ways().items() if loop or n != "recurrence"}
    cpu, wall, result = _timed_rounds({n: timed(fn) for n, fn in ways.items()}, rounds)
    reference = "recurrence" if loop else "hf_chunked"

    def diff(name):
        got, want = result[name], result[reference]
        pairs = zip(got, want) if backward else [(got, want)]
        return max(float((a - b).abs().max()) for a, b in pairs)

    row = {"benchmark": "gated_delta", "what": what, "tokens": length, "heads": heads, "head_dim": dim,
           "torch_threads": torch.get_num_threads(), "ours_cpu_ms": 1000 * cpu["ours_chunked"],
           "hf_chunked_cpu_ms": 1000 * cpu["hf_chunked"],
           "ratio_hf_chunked_vs_ours": cpu["hf_chunked"] / cpu["ours_chunked"], "diff_against": reference,
           "max_abs_diff_ours": diff("ours_chunked"), "rounds": rounds}
    if loop:
        row.update(recurrence_cpu_ms=1000 * cpu["recurrence"],
                   ratio_recurrence_vs_ours=cpu["recurrence"] / cpu["ours_chunked"],
                   wall_ratio_recurrence_vs_ours=wall["recurrence"] / wall["ours_chunked"],
                   max_abs_diff_hf_chunked=diff("hf_chunked"))
    return row


def _conv_loop(x, weight, bias):
    """Per token: y_t = silu(bias + sum_k weight[:, k] x_{t - (w - 1) + k}), x ``[b, t, d]``, weight ``[d, w]``."""
    import torch
    import torch.nn.functional as F

    width = weight.shape[-1]
    padded = torch.cat([x.new_zeros(x.shape[0], width - 1, x.shape[2]), x], dim=1)
    return torch.stack([F.silu(bias + (padded[:, t:t + width] * weight.T).sum(1)) for t in range(x.shape[1])], 1)


def _conv_row(length: int, channels: int, width: int, rounds: int) -> dict:
    import torch

    from bridge_sft.runtime.gated_delta import causal_conv1d

    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(1, length, channels, generator=gen), torch.randn(channels, width, generator=gen)
    bias = torch.randn(channels, generator=gen)
    with torch.no_grad():
        cpu, wall, result = _timed_rounds({"ours": lambda: causal_conv1d(x, weight, bias, activation="silu")[0],
                                           "loop": lambda: _conv_loop(x, weight, bias)}, rounds)
    return {"benchmark": "gated_delta", "what": "causal_conv1d forward, silu", "tokens": length, "heads": "",
            "head_dim": f"{channels} channels", "torch_threads": torch.get_num_threads(),
            "ours_cpu_ms": 1000 * cpu["ours"], "recurrence_cpu_ms": 1000 * cpu["loop"],
            "ratio_recurrence_vs_ours": cpu["loop"] / cpu["ours"],
            "wall_ratio_recurrence_vs_ours": wall["loop"] / wall["ours"],
            "diff_against": "loop", "max_abs_diff_ours": float((result["ours"] - result["loop"]).abs().max()),
            "rounds": rounds}


def run(quick: bool = False, rounds: int | None = None) -> list[dict]:
    shape = QWEN3_NEXT_80B
    length, heads = (1024, 8) if quick else (4096, shape["heads"])
    rounds = rounds or (2 if quick else 3)
    return [_rule_row("gated delta rule forward", length, heads, shape["head_dim"], rounds, backward=False),
            _rule_row("gated delta rule forward+backward", length, 2 if quick else 4, shape["head_dim"], rounds,
                      backward=True),
            _rule_row("gated delta rule forward+backward, no loop", length, heads, shape["head_dim"], rounds,
                      backward=True, loop=False),
            _conv_row(length, shape["conv_channels"], shape["conv_width"], rounds)]


def _table(rows: list[dict]) -> str:
    """The command line's table (not named ``markdown``: benchmarks/run.py prints every column of the rows)."""
    return common.markdown_table(rows, ["what", "tokens", "heads", "head_dim", "ours_cpu_ms", "hf_chunked_cpu_ms",
                                        "recurrence_cpu_ms", "ratio_recurrence_vs_ours", "ratio_hf_chunked_vs_ours",
                                        "wall_ratio_recurrence_vs_ours", "diff_against",
                                        "max_abs_diff_ours", "max_abs_diff_hf_chunked"])


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, _table, quick_help="sequence 1,024, 8 heads (2 with backward)",
                options=[("--rounds", {"type": int})], argv=argv)


if __name__ == "__main__":
    main()
