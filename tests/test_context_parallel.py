"""Context parallelism without Transformer Engine: te_torch's attention over megatron-core's CP shards."""

from __future__ import annotations

import json

import pytest
import torch
from launch import run_torchrun

from bridge_sft.runtime.context_parallel import thd_get_partitioned_indices


def test_cp_attention_equals_the_unsplit_attention():
    """CP=2 (torchrun, gloo) te_torch attention on megatron-core's load-balanced shards equals the 1-process
    attention of the whole input, fp32, outputs and q/k/v/sink gradients within 1e-6 relative: ``sbhd``,
    packed ``thd`` and a ``thd`` pack whose sequences (7, 13, 13 tokens) are padded to multiples of 2 x CP
    as megatron-core requires (compared with the unpadded pack; padded slots get no gradient), for causal
    GQA, a sliding window and learnable sinks. The THD split (te_torch's ``thd_get_partitioned_indices``,
    reached through Bridge and megatron-core) is checked against megatron-core's own zigzag per sequence."""
    out = run_torchrun("cp_attention.py", nproc=2).stdout
    cases = json.loads(out.split("FACTS ", 1)[1].splitlines()[0])
    assert set(cases) == {f"{c}/{layout}" for c in ("causal_gqa", "window", "sinks_window")
                          for layout in ("sbhd", "thd", "thd_padded")}
    for name, f in cases.items():
        assert f["out_diff"] <= 1e-6 * f["out_scale"] and f["out_scale"] > 0.1, (name, f)
        assert f["grad_diff"] <= 1e-6 * f["grad_scale"] and f["grad_scale"] > 0.1, (name, f)


def test_thd_split_refuses_sequences_not_padded_for_cp():
    """A pack whose sequence lengths are not multiples of 2 x CP cannot be split: one line naming the fix."""
    # rank 1 of 2: chunks 1 and 2 of each sequence's 4
    assert thd_get_partitioned_indices(torch.tensor([0, 8, 12]), 12, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="padded to a multiple of 4 tokens.*pad_seq_to_mult=4"):
        thd_get_partitioned_indices(torch.tensor([0, 7, 12]), 12, 2, 0)
