"""Step overhead: per-iteration time of bridge-sft's forward step vs Megatron-Bridge's own
``gpt_step.forward_step``, interleaved in one training run so that machine noise cancels.

Both steps run in the same ``bridge_sft.train.run`` (Bridge's ``finetune()``), on the same
model, the same batches and the same runner:

- **interleaved**: a dispatching forward step sends every iteration to one of the two
  steps, in pairs of consecutive iterations (ours, Bridge's), (Bridge's, ours), ... (the
  order alternates so that neither always goes first);
- **identical batches**: the training dataset is wrapped so that both iterations of a
  pair get the same global batch (bridge-sft's packed THD batches, which Bridge's
  ``get_batch`` consumes unchanged: they hold no ``-100`` labels, padding has the pad id
  and ``loss_mask = 0``);
- **identical weights**: the learning rate is 0, so the optimizer runs in full (Adam,
  gradient clipping, the distributed optimizer's copies) but the weights do not move:
  both steps of a pair must report the same loss, which the result checks.

Per iteration (``IterationRecorder``): wall time from step start to step end (the
device synchronised at both ends on a GPU), Bridge's own FLOPs count for the
iteration (``train_state.floating_point_operations_so_far``, the figure behind its
TFLOP/s log), the loss, and on a GPU the peak allocated memory. The first
``warmup`` iterations are left out. The reported ratio is the median over pairs of
(our iteration time / Bridge's), with a 95% bootstrap confidence interval of that
median and the 25th-75th percentile spread of the pairs; several
processes (``repeats``) run one after another. Supervised tokens per iteration
come from the batches themselves and must be identical for both steps. As a
noise-free cross-check, the work our step adds to Bridge's (``normalize_batch`` and
``count_tokens``) is also timed on its own, per micro-batch.

On the CPU this uses a tiny Llama (``bridge_sft.tiny``: hidden 64, 2 layers) with
packed seq 256 and 8 micro-batches per step: the per-micro-batch cost of a forward
step is then as large as it gets relative to the model's compute (a worst case).
Target: ratio <= 1.02. ``python benchmarks/step_overhead.py [--quick]``.
``benchmarks/gpu_check.py`` runs the same machinery on a GPU with a 1B model.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

OURS = "bridge-sft"
BRIDGE = "bridge gpt_step"
TARGET = 1.02
DENSE_MODEL = "tiny llama (hidden 64, 2 layers), CPU"
MOE_MODEL = "tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts, top-2, router losses on), CPU"
QUICK_HELP = "one process of 40 iterations"
OPTIONS = (  # the command line beyond --quick, also benchmarks/moe_step_overhead.py's
    ("--repeats", {"type": int, "help": "training processes (default 3, quick 1)"}),
    ("--iters", {"type": int, "help": "iterations per process (default 60, quick 40)"}),
)


def kind_of_iteration(iteration: int) -> str:
    """Which step runs 0-based ``iteration``: pairs (ours, Bridge's), (Bridge's, ours), ... alternating."""
    pair, position = divmod(iteration, 2)
    return OURS if position == pair % 2 else BRIDGE


def interleaved_forward_step():
    """A forward step that runs ``bridge_sft.step.forward_step`` or Bridge's ``gpt_step.forward_step``
    for the current iteration (``kind_of_iteration(state.train_state.step)``)."""
    from megatron.bridge.training import gpt_step

    from bridge_sft import step as sft_step

    steps = {OURS: sft_step.forward_step, BRIDGE: gpt_step.forward_step}

    def forward_step(state, data_iterator, model, return_schedule_plan: bool = False):
        return steps[kind_of_iteration(state.train_state.step)](state, data_iterator, model, return_schedule_plan)

    return forward_step


class PairedBatches:
    """A map-style dataset whose iterations ``2m`` and ``2m + 1`` get the same global batch
    (``repeats`` consecutive iterations: ``benchmarks/gpu_check.py`` compares more than two steps).

    Item ``j`` is ``base[(j // (repeats * global_batch)) * global_batch + j % global_batch]``
    (Bridge's sequential sampler hands iteration ``i`` items ``i*gbs .. (i+1)*gbs - 1``
    on one data-parallel rank).
    """

    def __init__(self, base, global_batch: int, repeats: int = 2):
        self.base = base
        self.global_batch = global_batch
        self.repeats = repeats
        if hasattr(base, "collate_fn"):
            self.collate_fn = base.collate_fn

    def __len__(self) -> int:
        return len(self.base)

    def base_index(self, j: int) -> int:
        return (j // (self.repeats * self.global_batch)) * self.global_batch + j % self.global_batch

    def __getitem__(self, j: int):
        return self.base[self.base_index(j)]


def paired_provider(provider, global_batch: int, repeats: int = 2):
    """A copy of the ``SFTDatasetProvider`` ``provider`` whose training split is ``PairedBatches``."""
    from bridge_sft.data.provider import SFTDatasetProvider

    @dataclass(kw_only=True)
    class PairedSFTDatasetProvider(SFTDatasetProvider):
        def build_datasets(self, context):
            train, valid, test = super().build_datasets(context)
            self.__dict__["_paired_train"] = PairedBatches(train, global_batch, repeats)
            return self.__dict__["_paired_train"], valid, test

    values = {f.name: getattr(provider, f.name) for f in fields(provider) if f.init}
    return PairedSFTDatasetProvider(**values)


def _iteration_recorder_class():
    import torch
    from megatron.bridge.training.callbacks import Callback

    class IterationRecorder(Callback):
        """Per training iteration: kind, seconds, Bridge's FLOPs, loss, peak device memory (GiB).

        With ``time_budget_s``, training stops after the first complete pair of iterations that
        ends more than ``time_budget_s`` seconds after the training loop started (Bridge's loop
        re-reads ``train.train_iters`` every iteration).
        """

        def __init__(self, time_budget_s: float | None = None) -> None:
            self.records: list[dict] = []
            self.stopped_early = False
            self._cuda = torch.cuda.is_available()
            self._budget = time_budget_s
            self._train_start = time.perf_counter()
            self._t0 = 0.0
            self._flops_at_start = 0.0

        def on_train_start(self, context) -> None:
            self._train_start = time.perf_counter()

        def _close_flops(self, state) -> None:
            flops = float(state.train_state.floating_point_operations_so_far)
            if self.records and "flops" not in self.records[-1]:
                self.records[-1]["flops"] = flops - self._flops_at_start
            self._flops_at_start = flops

        def on_train_step_start(self, context) -> None:
            self._close_flops(context.state)
            if self._cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_train_step_end(self, context) -> None:
            if self._cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._t0
            iteration = context.state.train_state.step  # 0-based: incremented after this callback
            loss = (context.loss_dict or {}).get("lm loss")
            self.records.append({
                "iteration": iteration,
                "kind": kind_of_iteration(iteration),
                "seconds": seconds,
                "loss": float(loss) if loss is not None else None,
                "skipped": bool(context.skipped_iter),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self._cuda else 0.0,
            })
            train = context.state.cfg.train
            if (self._budget is not None and iteration % 2 == 1 and iteration + 1 < train.train_iters
                    and time.perf_counter() - self._train_start > self._budget):
                train.train_iters = iteration + 1
                self.stopped_early = True

        def on_train_end(self, context) -> None:
            self._close_flops(context.state)

    return IterationRecorder


def batch_tokens(paired: PairedBatches, iteration: int) -> tuple[int, int]:
    """(supervised tokens, slots) of the global batch of 0-based ``iteration``."""
    supervised = slots = 0
    for j in range(iteration * paired.global_batch, (iteration + 1) * paired.global_batch):
        mask = paired[j]["loss_mask"]
        supervised += int(mask.sum())
        slots += int(mask.numel())
    return supervised, slots


def interleaved_run(config, device: str = "auto", time_budget_s: float | None = None) -> dict:
    """Train ``config`` with the interleaved step on paired batches; per-iteration records and totals.

    ``config``: a bridge-sft ``ConfigContainer`` (SFTDatasetProvider, micro-batch 1,
    one data-parallel rank, no validation). Returns ``{"records": [...], "totals": ...}``:
    each record has ``iteration``, ``kind``, ``seconds``, ``flops``, ``loss``,
    ``peak_gib``, ``supervised_tokens`` and ``slots`` of its batch; ``totals`` is
    ``bridge_sft.train.run``'s (its supervised tokens are counted by our step only);
    ``stopped_early``: whether ``time_budget_s`` (seconds of training) cut the run short.
    """
    from bridge_sft import train

    gbs = config.train.global_batch_size
    config.dataset = paired_provider(config.dataset, gbs)
    recorder = _iteration_recorder_class()(time_budget_s)
    totals = train.run(config, device=device, callbacks=[recorder], forward_step_func=interleaved_forward_step())
    paired = config.dataset.__dict__["_paired_train"]
    for record in recorder.records:
        record["supervised_tokens"], record["slots"] = batch_tokens(paired, record["iteration"])
    return {"records": recorder.records, "totals": totals, "stopped_early": recorder.stopped_early}


def pair_ratios(records: list[dict], warmup: int, ours: str = OURS, baseline: str = BRIDGE) -> list[float]:
    """``ours`` iteration time / ``baseline``'s (record kinds), for each complete pair of iterations after
    ``warmup`` iterations."""
    by_iteration = {r["iteration"]: r for r in records if not r["skipped"]}
    ratios = []
    for first in range(warmup + warmup % 2, max(by_iteration, default=-1) + 1, 2):
        pair = [by_iteration.get(first), by_iteration.get(first + 1)]
        if None in pair:
            continue
        times = {r["kind"]: r["seconds"] for r in pair}
        ratios.append(times[ours] / times[baseline])
    return ratios


def consistency(records: list[dict], counted_by_our_step: float) -> dict:
    """Self-checks: equal supervised tokens and losses for both steps of every pair."""
    kinds = {OURS: [r for r in records if r["kind"] == OURS], BRIDGE: [r for r in records if r["kind"] == BRIDGE]}
    by_iteration = {r["iteration"]: r for r in records}
    loss_diffs = []
    for first in range(0, max(by_iteration, default=-1) + 1, 2):
        a, b = by_iteration.get(first), by_iteration.get(first + 1)
        if a and b and a["loss"] is not None and b["loss"] is not None:
            loss_diffs.append(abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12))
    return {
        "supervised_tokens_ours": sum(r["supervised_tokens"] for r in kinds[OURS]),
        "supervised_tokens_bridge": sum(r["supervised_tokens"] for r in kinds[BRIDGE]),
        "supervised_tokens_counted_by_our_step": int(counted_by_our_step),
        "max_pair_loss_rel_diff": max(loss_diffs, default=float("nan")),
    }


def added_work_us(batch: dict, repeats: int = 2000) -> float:
    """Microseconds per micro-batch of what our step does beyond Bridge's: ``normalize_batch`` and
    ``count_tokens`` (median of 5 rounds of ``repeats`` calls, on the CPU)."""
    import types

    from bridge_sft.batch import normalize_batch
    from bridge_sft.callbacks import count_tokens

    state = types.SimpleNamespace()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            count_tokens(state, normalize_batch(batch)["loss_mask"])
        rounds.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(rounds)


def median_ci95(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap confidence interval of the median of ``values`` (percentile method, seeded)."""
    import numpy as np

    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(resamples, len(data)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


# --------------------------------------------------------------------------- CPU benchmark


def _worker(spec_path: str) -> None:
    """One training process: the tiny recipe, interleaved steps; writes the result JSON to spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    from bridge_sft.recipes import tiny

    config = tiny(
        spec["hf_path"], output_dir=spec["output_dir"], seq_length=spec["seq_length"],
        global_batch_size=spec["global_batch_size"], micro_batch_size=1, train_iters=spec["iters"],
        lr=0.0, min_lr=0.0, warmup_iters=0, eval_interval=None, eval_iters=0, save_interval=None, save_hf=False,
        validation_fraction=0.0, log_interval=spec["iters"],
        fused_loss_head=False,  # both steps on megatron-core's loss path: this measures the step itself
    )
    config.checkpoint.save = None
    config.checkpoint.load = None
    config.logger.tensorboard_dir = None
    if spec.get("moe"):  # benchmarks/moe_step_overhead.py
        from benchmarks.moe_common import configure

        configure(config)
    result = interleaved_run(config, device="cpu")
    paired = config.dataset.__dict__["_paired_train"]
    result["added_us_per_micro_batch"] = added_work_us(paired.collate_fn([paired[0]]))
    Path(spec["out"]).write_text(json.dumps(result))


def run(quick: bool = False, repeats: int | None = None, iters: int | None = None, warmup: int = 4,
        moe: bool = False) -> list[dict]:
    """Run ``repeats`` training processes of ``iters`` interleaved iterations; rows per process + a summary.

    Defaults: quick 1 process x 40 iterations, else 3 processes x 60 iterations. ``moe``: the tiny
    mixture-of-experts model of ``benchmarks/moe_step_overhead.py`` instead of the tiny Llama.
    """
    from bridge_sft.tiny import build_tiny_model

    repeats = repeats or (1 if quick else 3)
    iters = iters or (40 if quick else 60)
    iters += iters % 2
    benchmark, model = ("moe_step_overhead", MOE_MODEL) if moe else ("step_overhead", DENSE_MODEL)
    rows, all_ratios, all_records = [], [], []
    counted = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        if moe:
            from benchmarks.moe_common import build_tiny_moe

            hf_path = build_tiny_moe(Path(tmp) / "tiny-moe")
        else:
            hf_path = build_tiny_model(Path(tmp) / "tiny-llama", arch="llama")
        for process in range(repeats):
            spec = {"hf_path": str(hf_path), "output_dir": str(Path(tmp) / f"run{process}"), "seq_length": 256,
                    "global_batch_size": 8, "iters": iters, "out": str(Path(tmp) / f"result{process}.json"),
                    "moe": moe}
            common.run_worker(__file__, spec, Path(tmp) / f"spec{process}.json", f"step_overhead worker {process}")
            result = json.loads(Path(spec["out"]).read_text())
            records = result["records"]
            ratios = pair_ratios(records, warmup)
            p25, median, p75 = _quantiles(ratios)
            timed = [r for r in records if r["iteration"] >= warmup]
            rows.append({
                "benchmark": benchmark, "process": process, "iterations": len(records), "pairs": len(ratios),
                "ours_median_ms": 1e3 * statistics.median(r["seconds"] for r in timed if r["kind"] == OURS),
                "bridge_median_ms": 1e3 * statistics.median(r["seconds"] for r in timed if r["kind"] == BRIDGE),
                "ratio_median": median, "ratio_p25": p25, "ratio_p75": p75,
            })
            rows[-1]["added_us_per_micro_batch"] = result["added_us_per_micro_batch"]
            all_ratios += ratios
            all_records += [dict(r, iteration=r["iteration"] + process * 10**6) for r in records]
            counted += result["totals"]["supervised_tokens"]
    p25, median, p75 = _quantiles(all_ratios)
    ci_low, ci_high = median_ci95(all_ratios)
    added_us = statistics.median(r["added_us_per_micro_batch"] for r in rows)
    ours_ms = statistics.median(r["ours_median_ms"] for r in rows)
    rows.append({
        "benchmark": benchmark, "summary": True, "model": model,
        "seq_length": 256, "global_batch_size": 8, "processes": repeats, "pairs": len(all_ratios),
        "ratio (ours/bridge)": median, "ratio_ci95_low": ci_low, "ratio_ci95_high": ci_high,
        "ratio_p25": p25, "ratio_p75": p75, "ratio_min": min(all_ratios), "ratio_max": max(all_ratios),
        "target": TARGET,
        "added_us_per_micro_batch": added_us, "added_share_of_iteration": added_us * 8 / (ours_ms * 1e3),
        **consistency(all_records, counted),
    })
    return rows


def markdown(rows: list[dict]) -> str:
    """Per-process rows and the summary as Markdown."""
    lines = common.table_lines(
        ["process", "pairs", "ours ms/iter", "Bridge ms/iter", "ratio (median of pairs)", "p25-p75"],
        ([r["process"], r["pairs"], f"{r['ours_median_ms']:.1f}", f"{r['bridge_median_ms']:.1f}",
          f"{r['ratio_median']:.4f}", f"{r['ratio_p25']:.4f}-{r['ratio_p75']:.4f}"] for r in rows if "process" in r))
    for r in rows:
        if r.get("summary"):
            lines.append(
                f"\nAll {r['pairs']} pairs: ratio {r['ratio (ours/bridge)']:.4f} (95% CI of the median "
                f"{r['ratio_ci95_low']:.4f}-{r['ratio_ci95_high']:.4f}; p25-p75 {r['ratio_p25']:.4f}-"
                f"{r['ratio_p75']:.4f}, min-max {r['ratio_min']:.3f}-{r['ratio_max']:.3f}; target <= {r['target']}). "
                f"Supervised tokens: ours {r['supervised_tokens_ours']:,}, Bridge {r['supervised_tokens_bridge']:,}, "
                f"counted by our step {r['supervised_tokens_counted_by_our_step']:,}; max pair loss difference "
                f"{r['max_pair_loss_rel_diff']:.2e}. The work our step adds to Bridge's (normalize_batch + "
                f"count_tokens) takes {r['added_us_per_micro_batch']:.1f} us per micro-batch, "
                f"{r['added_share_of_iteration']:.3%} of an iteration.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, markdown, quick_help=QUICK_HELP, options=OPTIONS, worker=_worker, argv=argv)


if __name__ == "__main__":
    main()
