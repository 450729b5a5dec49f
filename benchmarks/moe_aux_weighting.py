"""Router-loss weighting error of the unfixed path: by how much megatron's per-token scaling multiplies the
load-balancing loss's gradient in SFT, on real chat data, before and after bridge-sft's fix.

For each data set, one training run (tiny Qwen3-MoE of ``benchmarks.moe_common``, packed, lr 0, no
gradient clipping: the finalized gradients are read after the optimizer step) takes
``batches`` global batches of the real data and runs each of them 8 times: with our forward step and
with Bridge's ``gpt_step.forward_step`` (megatron's unfixed scaling), with the data's own loss mask and
with every real token supervised ("all"), with the load-balancing coefficient on and at 0. The
difference of the finalized router-weight gradients (on minus off) is the load-balancing loss's
contribution ``C``. Per batch and router:

- **before** = |C(Bridge, data mask)| / |C(ours, data mask)|: the factor by which the unfixed path
  multiplies the coefficient (``tests/test_moe.py`` checks ours against the loss's definition);
- **predicted** = slots / supervised tokens of the global batch (Bridge's step routes every slot);
- **after** = |C(ours, data mask)| / |C(ours, all)|: 1.0 when the weighting does not depend on how
  many tokens are supervised.

Data sets: the bundled ChatterBot dialogs (``train_on=assistant``, seq 256) and long-prompt data:
the deterministic long conversations of ``benchmarks/long_conversations.py`` with only the last
reply trained (``train_on=last_assistant``, seq 2048), where most tokens are prompt.

``python benchmarks/moe_aux_weighting.py [--quick]``
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from benchmarks.moe_common import build_tiny_moe, set_router_coefficients  # noqa: E402

AUX_COEFF = 0.01
# iteration 8b + v runs base batch b as VARIANTS[v] = (step, mask, load-balancing loss on)
VARIANTS = [("ours", "data", True), ("ours", "data", False), ("ours", "all", True), ("ours", "all", False),
            ("bridge", "data", True), ("bridge", "data", False), ("bridge", "all", True), ("bridge", "all", False)]


class VariantBatches:
    """Iteration ``i`` gets base global batch ``i // 8``; variants with mask "all" supervise every real token."""

    def __init__(self, base, global_batch: int):
        self.base, self.global_batch = base, global_batch
        if hasattr(base, "collate_fn"):
            self.collate_fn = base.collate_fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, j: int):
        iteration, k = divmod(j, self.global_batch)
        item = dict(self.base[(iteration // len(VARIANTS)) * self.global_batch + k])
        if VARIANTS[iteration % len(VARIANTS)][1] == "all":
            item["loss_mask"] = (~item["padding_mask"]).float()
        return item


def _worker(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    from bridge_sft.data.provider import SFTDatasetProvider
    from bridge_sft.recipes import tiny
    from bridge_sft.step import forward_step
    from bridge_sft.train import run
    from megatron.bridge.training import gpt_step
    from megatron.bridge.training.callbacks import Callback

    gbs = spec["global_batch_size"]
    config = tiny(spec["hf_path"], data=spec["data"], train_on=spec["train_on"], output_dir=spec["output_dir"],
                  seq_length=spec["seq_length"], global_batch_size=gbs, train_iters=len(VARIANTS) * spec["batches"],
                  lr=0.0, min_lr=0.0, warmup_iters=0, clip_grad=0.0, eval_interval=None, eval_iters=0,
                  save_interval=None, save_hf=False, validation_fraction=0.0, log_interval=1000)
    config.checkpoint.save = config.checkpoint.load = config.logger.tensorboard_dir = None

    @dataclass(kw_only=True)
    class VariantProvider(SFTDatasetProvider):
        def build_datasets(self, context):
            train, valid, test = super().build_datasets(context)
            self.__dict__["_variants"] = VariantBatches(train, gbs)
            return self.__dict__["_variants"], valid, test

    config.dataset = VariantProvider(**{f.name: getattr(config.dataset, f.name) for f in fields(config.dataset)
                                        if f.init})
    steps = {"ours": forward_step, "bridge": gpt_step.forward_step}

    def variant_step(state, data_iterator, model, return_schedule_plan=False):
        return steps[VARIANTS[state.train_state.step % len(VARIANTS)][0]](state, data_iterator, model)

    grads: dict[int, dict[str, list]] = {}

    class Capture(Callback):
        def on_train_step_start(self, context):
            on = VARIANTS[context.state.train_state.step % len(VARIANTS)][2]
            set_router_coefficients(context, aux=AUX_COEFF if on else 0.0)

        def on_train_step_end(self, context):
            model = context.model[0]
            grads[context.state.train_state.step] = {
                name: p.main_grad.detach().double().flatten().tolist()
                for name, p in model.named_parameters() if name.endswith("router.weight")}

    run(config, device="cpu", callbacks=[Capture()], forward_step_func=variant_step)
    variants = config.dataset.__dict__["_variants"]
    rows = []
    for b in range(spec["batches"]):
        items = [variants.base[b * gbs + k] for k in range(gbs)]
        supervised = sum(int(item["loss_mask"].sum()) for item in items)
        real = sum(int((~item["padding_mask"]).sum()) for item in items)
        slots = sum(item["loss_mask"].numel() for item in items)
        first = b * len(VARIANTS)

        def contribution(v, name):
            return torch.tensor(grads[first + v][name]) - torch.tensor(grads[first + v + 1][name])

        for name in grads[first]:
            ours, ours_all, bridge = (contribution(v, name) for v in (0, 2, 4))
            rows.append({"batch": b, "router": name, "supervised": supervised, "real": real, "slots": slots,
                         "before": (bridge.norm() / ours.norm()).item(),
                         "cosine": torch.nn.functional.cosine_similarity(bridge, ours, dim=0).item(),
                         "predicted": slots / supervised, "after": (ours.norm() / ours_all.norm()).item()})
    Path(spec["out"]).write_text(json.dumps(rows))


DATA_SETS = {
    "bundled dialogs (train_on=assistant, seq 256)": ("dialogs", "assistant", 256, 8),
    "long prompts (long conversations, train_on=last_assistant, seq 2048)": ("long", "last_assistant", 2048, 8),
}


def run(quick: bool = False, batches: int | None = None) -> list[dict]:
    from benchmarks import long_conversations
    from bridge_sft.tiny import SAMPLE_DIALOGS

    batches = batches or (2 if quick else 6)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-aux-") as tmp:
        hf_path = build_tiny_moe(Path(tmp) / "tiny-moe")
        files = {"dialogs": SAMPLE_DIALOGS, "long": long_conversations.build(SAMPLE_DIALOGS, Path(tmp) / "long.jsonl")}
        for label, (data, train_on, seq_length, gbs) in DATA_SETS.items():
            spec = {"hf_path": str(hf_path), "data": str(files[data]), "train_on": train_on, "seq_length": seq_length,
                    "global_batch_size": gbs, "batches": batches, "output_dir": str(Path(tmp) / data),
                    "out": str(Path(tmp) / f"{data}.json")}
            common.run_worker(__file__, spec, Path(tmp) / f"{data}.spec.json", f"moe_aux_weighting worker ({data})")
            per_batch = json.loads(Path(spec["out"]).read_text())
            before = [r["before"] for r in per_batch]
            predicted = [r["predicted"] for r in per_batch]
            after = [r["after"] for r in per_batch]
            rows.append({
                "benchmark": "moe_aux_weighting", "data": label, "batches": batches, "routers": 2,
                "supervised_share_of_slots":
                    sum(r["supervised"] for r in per_batch) / sum(r["slots"] for r in per_batch),
                "before_mean": statistics.mean(before), "before_min": min(before), "before_max": max(before),
                "predicted_mean": statistics.mean(predicted),
                "before_vs_predicted_max_rel": max(abs(r["before"] / r["predicted"] - 1) for r in per_batch),
                "cosine_min": min(r["cosine"] for r in per_batch),
                "after_mean": statistics.mean(after), "after_max_abs_error": max(abs(a - 1) for a in after),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    return "\n".join(common.table_lines(
        ["data", "supervised share", "before: unfixed / fixed (mean, min-max)", "predicted slots / supervised",
         "after: fixed at data mask / all supervised"],
        ([r["data"], f"{r['supervised_share_of_slots']:.1%}",
          f"{r['before_mean']:.3f} ({r['before_min']:.3f}-{r['before_max']:.3f})", f"{r['predicted_mean']:.3f}",
          f"{r['after_mean']:.7f} (max error {r['after_max_abs_error']:.1e})"] for r in rows)))


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, markdown, quick_help="2 global batches per data set (default 6)",
                options=[("--batches", {"type": int, "help": "global batches per data set"})], worker=_worker,
                argv=argv)


if __name__ == "__main__":
    main()
