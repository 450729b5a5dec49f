"""What trustworthy validation costs: a full pass over the held-out set vs Bridge's sampled ``eval_iters``
window, and ``eval_samples``' greedy answers, per evaluation, on the demo's setting.

One training process per variant (Bridge's ``finetune()``, the ``tiny`` recipe on the tiny Llama and the
bundled dialogs, 200 held-out dialogs, global batch 8 packs), each evaluating every 2 iterations:

- ``full pass``: bridge-sft's default (``bridge_sft.train.plan_full_validation``: every evaluation covers
  the 200 held-out dialogs once);
- ``sampled window``: what the ``tiny`` recipe did before (``eval_iters=2``: 16 packs from a repeating
  stream of validation items, another window at every evaluation), with the full-pass planning switched
  off in that process;
- ``full pass + eval_samples=2``: the demo's setting (2 prompts, 24 new tokens at most).

Per variant: the median wall time of an evaluation (Bridge's ``on_eval_start`` to our callbacks'
``on_eval_end``) and the part of it ``eval_samples`` took, the supervised tokens it covered, and the spread of its validation losses at learning
rate 0 (the same weights every time: 0 for a full pass). Ratios against the sampled window of the same run.

``python benchmarks/validation.py [--quick]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

VARIANTS = {
    "sampled window (eval_iters=2)": {"full_pass": False, "eval_samples": 0},
    "full pass": {"full_pass": True, "eval_samples": 0},
    "full pass + eval_samples=2": {"full_pass": True, "eval_samples": 2},
}


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from bridge_sft import train
    from bridge_sft.callbacks import LossHistory, TokenThroughput
    from bridge_sft.recipes import tiny

    from megatron.bridge.training.callbacks import Callback

    class EvalTimer(Callback):
        def __init__(self):
            self.seconds, self._start = [], 0.0

        def on_eval_start(self, context):
            self._start = time.perf_counter()

        def on_eval_end(self, context):  # fires after the other callbacks' (it is added last)
            self.seconds.append(time.perf_counter() - self._start)

    if not spec["full_pass"]:
        train.plan_full_validation = lambda config: None  # Bridge's own sampled window, as before
    config = tiny(spec["hf"], output_dir=spec["out"], train_iters=spec["iters"], eval_interval=2, eval_iters=2,
                  lr=0.0, min_lr=0.0, warmup_iters=0, save_interval=None, save_hf=False,
                  eval_samples=spec["eval_samples"], eval_sample_tokens=24, log_interval=100)
    throughput, history = TokenThroughput(), LossHistory()
    timer = EvalTimer()
    callbacks = [throughput, history]
    sampling_seconds = []
    if spec["eval_samples"]:
        from bridge_sft.eval_samples import EvalSamples

        class TimedEvalSamples(EvalSamples):
            def on_eval_end(self, context):
                start = time.perf_counter()
                super().on_eval_end(context)
                sampling_seconds.append(time.perf_counter() - start)

        callbacks.append(TimedEvalSamples(spec["eval_samples"], 24))
    train.run(config, callbacks=[*callbacks, timer])
    losses = [loss for _, loss in history.evaluations]
    Path(spec["result"]).write_text(json.dumps({
        "seconds": timer.seconds, "sampling_seconds": sampling_seconds, "tokens": [t for _, t in throughput.evaluations], "losses": losses,
        "eval_iters": config.validation.eval_iters}))


def run(quick: bool = False) -> list[dict]:
    from bridge_sft.tiny import build_tiny_model

    iters = 6 if quick else 12
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        hf = build_tiny_model(Path(tmp) / "tiny")
        for name, variant in VARIANTS.items():
            result = Path(tmp) / f"{len(rows)}.json"
            common.run_worker(__file__, {"hf": str(hf), "out": str(Path(tmp) / f"run{len(rows)}"), "iters": iters,
                                         "result": str(result), **variant}, Path(tmp) / "spec.json", name)
            r = json.loads(result.read_text())
            in_training = r["seconds"][:-1] or r["seconds"]  # the evaluation after training repeats the last
            rows.append({"variant": name, "eval_iters": r["eval_iters"],
                         "seconds per evaluation": statistics.median(in_training),
                         "of which eval_samples": statistics.median(r["sampling_seconds"][:-1] or [0.0]),
                         "supervised tokens per evaluation": statistics.median(r["tokens"]),
                         "loss spread at lr 0": max(r["losses"]) - min(r["losses"])})
    base = rows[0]["seconds per evaluation"]
    for row in rows:
        row["time ratio vs sampled window"] = row["seconds per evaluation"] / base
    return rows


def markdown(rows: list[dict]) -> str:
    return common.markdown_table(rows)


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, markdown, quick_help="6 iterations instead of 12", worker=_worker, argv=argv)


if __name__ == "__main__":
    main()
