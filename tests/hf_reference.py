"""HF's own torch paths as test references, with transformers bugs that would make them wrong fixed here
(test-side only: bridge_sft never patches transformers)."""

from __future__ import annotations

import inspect
import textwrap

# transformers 5.x NemotronHMamba2Mixer.torch_forward (the path without mamba_ssm kernels) passes the states
# between chunks summed over the wrong axis: `(decay_chunk[..., None, None] * states_permuted[:, :, None, ...])
# .sum(dim=2)` sums over the target chunk instead of the source chunk (dim=3; Mamba2's and Falcon-H1's torch
# paths transpose first and are right). Each chunk then sees only the previous chunk's own state, scaled, so
# outputs past the first chunk are wrong wherever the state decays slowly (0.12 at token 48 of 49 with chunks
# of 16 in tests/test_runtime_mamba.py), and the kernel path (mamba_ssm) disagrees with it.
_NEMOTRON_H_BUG = "states_permuted[:, :, None, ...]).sum(dim=2)"
_NEMOTRON_H_FIX = "states_permuted[:, :, None, ...]).sum(dim=3)"


def fix_hf_nemotron_h_torch_path() -> bool:
    """Replace NemotronHMamba2Mixer.torch_forward by its own source with the axis fixed; True if it was buggy."""
    from transformers.models.nemotron_h import modeling_nemotron_h as module

    mixer = module.NemotronHMamba2Mixer
    if getattr(mixer.torch_forward, "_bridge_sft_fixed", False):
        return True
    source = textwrap.dedent(inspect.getsource(mixer.torch_forward))
    if _NEMOTRON_H_BUG not in source:
        return False
    namespace: dict = {}
    exec(compile(source.replace(_NEMOTRON_H_BUG, _NEMOTRON_H_FIX), module.__file__, "exec"), module.__dict__, namespace)
    namespace["torch_forward"]._bridge_sft_fixed = True
    mixer.torch_forward = namespace["torch_forward"]
    return True
