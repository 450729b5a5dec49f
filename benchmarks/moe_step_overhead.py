"""MoE step overhead: per-iteration time of bridge-sft's forward step vs Megatron-Bridge's own
``gpt_step.forward_step`` on a tiny mixture-of-experts model, interleaved in one training run.

``benchmarks/step_overhead.py``'s machinery (pairs of iterations on identical packed batches, lr 0,
equal losses checked, median of per-pair ratios with a bootstrap CI; ``run(moe=True)``), on
``benchmarks.moe_common.build_tiny_moe`` (Qwen3-MoE, hidden 64, 2 layers, 4 experts, top-2) with the
load-balancing loss and the z-loss on (``benchmarks.moe_common.configure``). Our step then does
everything it does for MoE: the step's read-ahead and its supervised-token all-reduce, the padding
mask to the routers, the per-micro-batch router-loss scale hook; ``RouterHealth`` counts expert loads
in both kinds of iterations (a model hook of the run, not part of a step). A tiny model on the CPU is
the worst case for a per-micro-batch cost. Target: ratio <= 1.02.

``python benchmarks/moe_step_overhead.py [--quick]``
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, step_overhead  # noqa: E402


def run(quick: bool = False, repeats: int | None = None, iters: int | None = None) -> list[dict]:
    """``repeats`` training processes of ``iters`` interleaved iterations (quick 1 x 40, else 3 x 60)."""
    return step_overhead.run(quick=quick, repeats=repeats, iters=iters, moe=True)


def markdown(rows: list[dict]) -> str:
    return step_overhead.markdown(rows)


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, markdown, quick_help=step_overhead.QUICK_HELP, options=step_overhead.OPTIONS, argv=argv)


if __name__ == "__main__":
    main()
