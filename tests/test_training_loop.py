"""Megatron-Bridge's real finetune() loop on CPU: training, validation, checkpoints, DP=2 and TP=2.

Each run is a separate process (tests/drivers/train_tiny.py); Bridge keeps
process-global state.
"""

from __future__ import annotations

import math

import pytest
from launch import train_tiny
from samples import dialog_token_samples

SEQ = 32


def train(tmp_path, name, spec, nproc=1):
    return train_tiny(tmp_path, name, {"seq_length": SEQ, **spec}, nproc)


def test_finetune_trains_validates_saves_and_resumes_exactly(tiny_llama, tmp_path):
    samples = dialog_token_samples(tiny_llama, 8, SEQ)
    common = {"hf": str(tiny_llama), "samples": samples, "gbs": 4, "mbs": 2, "lr": 3e-3, "iters": 6,
              "eval_interval": 3, "eval_iters": 1}

    straight = train(tmp_path, "straight", {**common, "output_dir": str(tmp_path / "straight")})
    assert sorted(straight["losses"]) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in straight["losses"].values())
    assert straight["losses"][6] < straight["losses"][1] - 0.3, straight["losses"]
    assert sorted(straight["val_losses"]) == [3, 6], straight["val_losses"]
    assert straight["val_losses"][6] < straight["val_losses"][3]

    # Interrupted after iteration 3 (a checkpoint is saved on exit), then the same command again:
    # Bridge resumes from iter_0000003 (weights, optimizer, scheduler, data position).
    run_dir = str(tmp_path / "run")
    first = train(tmp_path, "first", {**common, "save_interval": 3, "exit_interval": 3, "output_dir": run_dir})
    assert sorted(first["losses"]) == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "iter_0000003").is_dir()
    resumed = train(tmp_path, "resumed", {**common, "save_interval": 3, "output_dir": run_dir})
    assert sorted(resumed["losses"]) == [4, 5, 6], resumed["losses"]
    for it in (1, 2, 3):
        assert first["losses"][it] == straight["losses"][it]
    for it in (4, 5, 6):
        assert resumed["losses"][it] == pytest.approx(straight["losses"][it], rel=1e-6, abs=0)


@pytest.mark.parametrize("parallel", ["dp", "tp"])
def test_two_ranks_reproduce_single_process_losses(tiny_llama, tmp_path, parallel):
    """torchrun, 2 ranks on gloo: DP=2 (micro-batch 1) and TP=2 give the 1-process losses to rel 1e-5."""
    samples = dialog_token_samples(tiny_llama, 8, SEQ, supervised=[32, 5, 17, 29, 1, 32, 12, 20])
    spec = {"hf": str(tiny_llama), "samples": samples, "gbs": 4, "mbs": 1, "iters": 3, "lr": 3e-3}
    single = train(tmp_path, "single", spec)
    double = train(tmp_path, parallel, {**spec, "tp": 2 if parallel == "tp" else 1}, nproc=2)
    assert double["world_size"] == 2
    assert sorted(double["losses"]) == [1, 2, 3]
    assert single["losses"][3] != single["losses"][1]  # the weights did change between steps
    for it in (1, 2, 3):
        assert double["losses"][it] == pytest.approx(single["losses"][it], rel=1e-5, abs=0)
