"""The training console (``bridge_sft.console``): what a person sees, and the complete log behind it.

The pipe (non-terminal) console and the log of a clean run are checked in
``test_end_to_end.py`` (and the demo's terminal console in ``test_readme.py``), on runs
those tests make anyway; here: a terminal run with real problems injected, and a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from launch import DRIVERS, REPO
from terminal import run_in_pty, screen

from bridge_sft.console import HARMLESS, is_harmless

# What the console of a run must not show: the known-harmless noise of a CPU / no-TE run.
NOISE = ("Transformer Engine and Apex", "Apex is not installed", "FP8GlobalStateManager", "is experimental",
         "CPU runtime active", "No CUDA runtime", "Could not determine", "deprecated", "DEPRECATED",
         "RerunStateMachine", "Configuration Summary", "[bridge-sft] iteration")
ITERATION_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.]+E[+-]\d+)")
# Messages that report real problems; no allow-list pattern may match them.
REAL_PROBLEMS = (
    "Rank 0, node n1, device 0, iteration 7: Unexpected result nan (message='found NaN in local forward loss "
    "calculation')",
    "Unexpected result 12.5 on rank 3 at iteration #120 invocation #1 (message='Spiky loss')",
    "Rank 1: found NaN in local grad norm for bucket #0 in backward pass before data-parallel communication",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "lr_warmup_steps (32) >= lr_decay_steps (32); capping lr_warmup_steps to 31.",
    "model.calculate_per_token_loss=False: Megatron divides each micro-batch's loss by ...",
    "Traceback (most recent call last):",
    "RuntimeError: Error(s) in loading state_dict for GPTModel",
    "NCCL WARN Connect to 10.0.0.2 failed",
    "W1205 16:27:59.898000 15058 torch/distributed/elastic/agent/server/api.py:704] Received Signals.SIGTERM",
)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def test_allow_list_explains_every_pattern_and_hides_no_real_problem():
    assert all(pattern and len(reason) > 20 for pattern, reason in HARMLESS)
    for message in REAL_PROBLEMS:
        assert not is_harmless(message), message
    for noise in ("/x/megatron/core/optimizer/__init__.py:25: UserWarning: Transformer Engine and Apex are not "
                  "installed. Falling back to Torch optimizers.",
                  "Import of FP8GlobalStateManager from megatron.core.extensions.transformer_engine failed with: "
                  "Traceback (most recent call last):",
                  "encoding conversations: 2912 records [00:04, 694.39 records/s]",
                  "Writing model shards: 100%|██████████| 1/1 [00:00<00:00, 600.04it/s]"):
        assert is_harmless(noise), noise


def train_argv(mode: str, hf_dir, out, *overrides: str) -> list[str]:
    return [sys.executable, str(DRIVERS / "console_train.py"), mode, "train", "tiny", f"hf_path={hf_dir}",
            f"output_dir={out}", "train_iters=4", "log_interval=1", *overrides]


def test_header_data_line_adds_up_the_sources_of_a_mixture():
    """``bridge-sft train ... data='[a.jsonl:0.5, b.jsonl:0.5]'``: the data is prepared per source."""
    from types import SimpleNamespace

    from bridge_sft.console import describe_data

    dataset = SimpleNamespace(sources=lambda: [SimpleNamespace(name="dates"), SimpleNamespace(name="replay")],
                              validation_path=None, validation_fraction=0.02)
    summaries = [{"samples": 3, "tokens": 30, "supervised_tokens": 10, "truncated": 1},
                 {"samples": 2, "tokens": 20, "supervised_tokens": 5, "skipped": {"not JSON": 1}}]
    assert describe_data(summaries, dataset) == ("dates, replay: 5 samples, 50 tokens (15 supervised), 1 truncated, "
                                                 "1 bad records skipped; 2% held out for validation")


@pytest.mark.slow
def test_terminal_console_shows_header_progress_summary_and_real_problems_only(tiny_llama, tmp_path):
    out = tmp_path / "run"
    code, raw = run_in_pty(train_argv("messages", tiny_llama, out, "eval_interval=2", "save_interval=4"),
                           cwd=tmp_path, env=env())
    lines = screen(raw)
    text = "\n".join(lines)
    assert code == 0, text
    log_path = out / "logs" / "rank0.log"

    assert lines[0] == "bridge-sft train tiny"
    for label in ("model", "data", "training", "parallelism", "runtime", "checkpoints", "TensorBoard", "log",
                  "parameters"):
        assert re.search(rf"^  {label} +\S", text, re.M), label
    assert "LlamaForCausalLM (2 layers, hidden 64" in text
    assert "no Transformer Engine: its layers in plain torch" in text  # the one line the collapsed noise leaves
    assert f"log           {log_path}" in text
    # One live progress line, redrawn in place (the raw output holds every state it went through).
    bars = [line for line in lines if line.startswith("train ")]
    assert len(bars) == 1 and re.search(r" 4/4 loss \d\.\d{4}  lr \S+  grad norm \S+  [\d,]+ sup\. tok/s  ETA", bars[0])
    drawn = re.findall(r"([1-4])/4\x1b\[0m loss ", raw)  # every state it was drawn in
    assert len(drawn) > 2 and drawn[-1] == "4", drawn
    assert "validation at iteration 2: loss" in text and "checkpoint saved at iteration 4" in text
    assert "done: 4 iterations" in text and re.search(r"^  full log +" + re.escape(str(log_path)), text, re.M)

    injected = ("warning: UserWarning: bridge-sft test: an injected real warning",
                "warning (megatron.core.rerun_state_machine): Rank 0, node test, device 0, iteration 2: Unexpected "
                "result 73.5 (message='Spiky loss')",
                "error: bridge-sft test: an injected error record",
                "bridge-sft test: a raw line on stderr")
    for message in injected:
        assert text.count(message) == 1, message
    for noise in (*NOISE, "Falling back to bridge-sft test code"):
        assert noise not in text, noise

    # The log holds everything: Bridge's output, the noise, the injected messages.
    log = log_path.read_text()
    for message in ("bridge-sft test: an injected real warning", "message='Spiky loss'",
                    "ERROR:megatron.bridge.training.train:bridge-sft test: an injected error record",
                    "bridge-sft test: a raw line on stderr", "Falling back to bridge-sft test code",
                    "Transformer Engine and Apex are not installed", "Configuration Summary",
                    "validation loss at iteration 2", "[bridge-sft] iteration        4 | supervised tokens/s"):
        assert message in log, message
    assert sorted(int(i) for i, _ in ITERATION_LOSS.findall(log)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_failure_shows_the_tail_of_the_rank_log_and_its_path(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(train_argv("fail", tiny_llama, out, "eval_interval=null", "save_interval=4"),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    log_path = out / "logs" / "rank0.log"
    log = log_path.read_text().splitlines()
    assert re.search(r"^bridge-sft train failed on rank 0 \(pid \d+\): RuntimeError: bridge-sft test: injected "
                     r"failure at iteration 2$", proc.stderr, re.M), proc.stderr
    report = proc.stderr.split(f"last 30 lines of {log_path}:\n", 1)[1].splitlines()
    tail = [line[4:] for line in report if line.startswith("  | ")]
    assert tail == log[-30:]
    assert tail[-1] == "RuntimeError: bridge-sft test: injected failure at iteration 2"
    assert report[len(tail)] == f"full log: {log_path}"
    assert any("iteration        1/       4 |" in line for line in log)  # Bridge's own lines before the failure
    assert not (out / "checkpoints").exists()  # the unfinished run's folders are removed; its log stays
