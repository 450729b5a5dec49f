"""The benchmarks run and their outputs are well-formed and self-consistent (never timed assertions).

- the GPU check's dry mode end to end on the CPU, with every package hidden that the GPU
  machine would lack (so both the script and its list of carried wheels cannot rot);
- the useful-token efficiency benchmark (quick, in its own process), checked for consistency;
- the runner (benchmarks/run.py) on stand-in benchmarks: a failing one is reported, not fatal;
- the pure helpers (iteration pairing, paired batches, ratios, long conversations).
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from launch import REPO, run_python

sys.path.insert(0, str(REPO))

from benchmarks import long_conversations, run as bench_run, step_overhead  # noqa: E402
from benchmarks.step_overhead import BRIDGE, OURS  # noqa: E402


# --------------------------------------------------------------------------- GPU check, dry mode


@pytest.mark.slow
@pytest.mark.extended  # 100 s; a check of the GPU script's packaging, not of training (CI runs it)
def test_gpu_check_dry_run_with_only_carried_packages(tmp_path):
    run_python(REPO / "tests" / "drivers" / "bench_gpu_imports.py", tmp_path, timeout=600)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    report = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in report and "bridge-sft step" in report

    assert summary["settings"]["dry_run"] and summary["iterations_run"] == 6
    assert summary["environment"]["transformer_engine"] is False
    records = summary["records"]
    assert [r["kind"] for r in records] == [OURS, BRIDGE, BRIDGE, OURS, OURS, BRIDGE]
    for first, second in zip(records[0::2], records[1::2]):  # a pair: same batch, same weights (lr 0)
        assert first["supervised_tokens"] == second["supervised_tokens"] > 0
        assert first["slots"] == second["slots"] == 2 * 512
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
        assert first["flops"] == second["flops"] > 0

    checks = summary["checks"]
    assert checks["supervised_tokens_ours"] == checks["supervised_tokens_bridge"] \
        == checks["supervised_tokens_counted_by_our_step"] > 0
    assert 0 < checks["supervised_share_of_slots"] <= 1
    for kind in (OURS, BRIDGE):
        step = summary["per_step"][kind]
        assert step["timed_iterations"] == 2
        assert step["seconds_per_iteration_median"] > 0
        assert 0 < step["supervised_tokens_per_s_per_gpu"] <= step["slot_tokens_per_s_per_gpu"]
        assert 0 < step["mfu_vs_989"] < 1
        assert step["model_tflops_per_gpu"] == pytest.approx(step["mfu_vs_989"] * 989.0)
    for name, value in summary["ratios"].items():
        if isinstance(value, list):  # a confidence interval
            assert 0 < value[0] <= value[1], name
        elif value is not None and name != "pairs":
            assert value > 0, name
    assert summary["setup"]["parameters_b"] > 0.008  # 128,256 x 64 tied embeddings + 2 tiny layers


def test_wheel_commands_name_every_carried_wheel_once():
    from benchmarks.gpu_check import BUILT_WHEELS, CARRIED_WHEELS, wheel_commands

    text = wheel_commands()
    names = [spec.split("==")[0].lower() for spec in CARRIED_WHEELS + BUILT_WHEELS]
    assert len(names) == len(set(names))
    for spec in CARRIED_WHEELS + BUILT_WHEELS:
        assert f" {spec}" in text
    assert "--python-version 3.12" in text and "-d .whl" in text


# --------------------------------------------------------------------------- useful-token efficiency


@pytest.fixture(scope="module")
def token_efficiency(tmp_path_factory):
    """The quick benchmark's rows and a toy case, computed in a fresh process."""
    out = tmp_path_factory.mktemp("token-efficiency") / "result.json"
    run_python(REPO / "tests" / "drivers" / "bench_token_efficiency.py", out, timeout=600)
    return json.loads(out.read_text())


def test_token_efficiency_quick_is_consistent(token_efficiency):
    from benchmarks import token_efficiency as te

    rows = token_efficiency["rows"]
    groups = {}
    for r in rows:
        groups.setdefault((r["data"], r["seq_length"]), {})[r["method"]] = r
    assert {seq for _, seq in groups} == {2048, 4096}
    assert {data for data, _ in groups} == {"chatterbot sample", "long conversations (sample)"}
    for (data, seq), by_method in groups.items():
        assert set(by_method) == {te.OURS, te.BRIDGE_DEFAULT, te.BRIDGE_FFD, te.PADDING}
        padding = by_method[te.PADDING]
        for r in by_method.values():
            # same samples, same supervised and real tokens for every method; only the rows differ
            assert r["supervised_tokens"] == padding["supervised_tokens"] > 0
            assert r["real_tokens"] == padding["real_tokens"]
            assert r["slots"] == r["rows"] * seq
            assert 0 < r["useful_efficiency"] <= r["real_efficiency"] <= 1
            assert r["rows"] <= padding["rows"] == r["samples"]
            assert r["vs_bridge_packing"] > 0 and r["vs_padding"] >= 1
            assert math.ceil(r["real_tokens"] / seq) <= r["rows"]  # no method beats the lower bound
    assert "supervised / slot" in token_efficiency["markdown"]


def test_efficiency_rows_on_known_lengths(token_efficiency):
    from benchmarks import token_efficiency as te

    rows = {r["method"]: r for r in token_efficiency["toy"]}
    assert rows[te.OURS]["rows"] == 2  # 60+40, 50+30+20
    assert rows[te.BRIDGE_FFD]["rows"] == 2
    assert rows[te.PADDING]["rows"] == 5
    assert rows[te.OURS]["useful_efficiency"] == pytest.approx(100 / 200)
    assert rows[te.OURS]["vs_padding"] == pytest.approx(2.5)


# --------------------------------------------------------------------------- the runner


def test_runner_reports_a_failing_benchmark_and_summarises_the_others(tmp_path, monkeypatch):
    (tmp_path / "fake_bench.py").write_text(textwrap.dedent("""
        def run(quick=False):
            return [{"benchmark": "step_overhead", "summary": True, "model": "fake", "pairs": 2,
                     "ratio (ours/bridge)": 1.01, "ratio_p25": 1.0, "ratio_p75": 1.02, "target": 1.02,
                     "supervised_tokens_ours": 5, "supervised_tokens_bridge": 5,
                     "supervised_tokens_counted_by_our_step": 5}]
        """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(bench_run, "BENCHMARKS", {
        "step_overhead": ("fake_bench", {"quick": True}, {"quick": False}),
        "broken": ("benchmarks.common", {}, {}),  # has no run(): the child process fails
    })
    code = bench_run.main(["--out-dir", str(tmp_path / "out")])
    assert code == 1
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    status = {b["name"]: b["status"] for b in result["benchmarks"]}
    assert status == {"step_overhead": "ok", "broken": "failed"}
    lines = {line["benchmark"]: line for line in result["summary"]}
    assert lines["step overhead"]["ratio"] == 1.01 and "equal" in lines["step overhead"]["ratio means"]
    assert lines["broken"]["measure"] == "FAILED" and "run" in lines["broken"]["ratio means"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Summary" in text and "FAILED" in text and "load average" in text


def test_summaries_survive_unexpected_rows():
    rows = [{"efficiency": 0.9, "method": "bridge-sft best-fit decreasing"}]  # no data, seq_length ...
    lines = bench_run.summarize([{"name": "packing_efficiency", "status": "ok", "rows": rows}])
    assert lines[0]["measure"] == "rows could not be summarised"


# --------------------------------------------------------------------------- helpers


def test_iterations_alternate_in_pairs():
    kinds = [step_overhead.kind_of_iteration(i) for i in range(8)]
    assert kinds == [OURS, BRIDGE, BRIDGE, OURS, OURS, BRIDGE, BRIDGE, OURS]


def test_paired_batches_repeat_each_global_batch_once():
    paired = step_overhead.PairedBatches(list(range(100)), global_batch=3)
    assert [paired[j] for j in range(12)] == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert len(paired) == 100


def test_pair_ratios_and_consistency():
    records = [
        {"iteration": i, "kind": step_overhead.kind_of_iteration(i), "skipped": False, "loss": 2.0,
         "seconds": 1.1 if step_overhead.kind_of_iteration(i) == OURS else 1.0, "supervised_tokens": 7}
        for i in range(6)
    ]
    assert step_overhead.pair_ratios(records, warmup=2) == pytest.approx([1.1, 1.1])
    checks = step_overhead.consistency(records, counted_by_our_step=21)
    assert checks["supervised_tokens_ours"] == checks["supervised_tokens_bridge"] == 21
    assert checks["max_pair_loss_rel_diff"] == 0


def test_long_conversations_are_deterministic_and_use_each_dialog_once(tmp_path):
    from bridge_sft.tiny import SAMPLE_DIALOGS

    a = long_conversations.build(SAMPLE_DIALOGS, tmp_path / "a.jsonl")
    b = long_conversations.build(SAMPLE_DIALOGS, tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    conversations = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    source = [json.loads(line) for line in Path(SAMPLE_DIALOGS).read_text(encoding="utf-8").splitlines()]
    assert sum(c["dialogs"] for c in conversations) == len(source)
    assert sum(len(c["messages"]) for c in conversations) == sum(len(s["messages"]) for s in source)
    for c in conversations:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert c["dialogs"] <= 48
