"""MoE step overhead: per-iteration time of bridge-sft's forward step vs Megatron-Bridge's own
``gpt_step.forward_step`` on a tiny mixture-of-experts model, interleaved in one training run.

``benchmarks/step_overhead.py``'s machinery (pairs of iterations on identical packed batches, lr 0,
equal losses checked, median of per-pair ratios with a bootstrap CI; ``run(moe=True)``), on
``benchmarks.moe_common.build_tiny_moe`` (Qwen3-MoE, hidden 64, 2 layers, 4 experts, top-2) with the
load-balancing loss and the z-loss on (``configure``). Our step then does everything it does for MoE:
the step's read-ahead and its supervised-token all-reduce, the padding mask to the routers, the
per-micro-batch router-loss scale hook; ``RouterHealth`` counts expert loads in both kinds of
iterations (a model hook of the run, not part of a step). A tiny model on the CPU is the worst case
for a per-micro-batch cost. Target: ratio <= 1.02.

``python benchmarks/moe_step_overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import step_overhead  # noqa: E402

AUX_COEFF, Z_COEFF = 0.01, 0.001


def configure(config) -> None:
    """The worker's settings for the MoE model: router losses on, CPU MoE overrides."""
    config.model.moe_aux_loss_coeff, config.model.moe_z_loss_coeff = AUX_COEFF, Z_COEFF


def run(quick: bool = False, repeats: int | None = None, iters: int | None = None) -> list[dict]:
    """``repeats`` training processes of ``iters`` interleaved iterations (quick 1 x 40, else 3 x 60)."""
    return step_overhead.run(quick=quick, repeats=repeats, iters=iters, moe=True)


def markdown(rows: list[dict]) -> str:
    return step_overhead.markdown(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one process of 40 iterations")
    parser.add_argument("--repeats", type=int, help="training processes (default 3, quick 1)")
    parser.add_argument("--iters", type=int, help="iterations per process (default 60, quick 40)")
    args = parser.parse_args()
    print(markdown(run(quick=args.quick, repeats=args.repeats, iters=args.iters)))


if __name__ == "__main__":
    main()
