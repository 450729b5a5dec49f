"""The plain-torch Mamba-2 kernels (bridge_sft.runtime.mamba) against independent references: a per-token
recurrence written here, HF's own torch path of the Nemotron-H mixer, and each packed sequence run alone.
Forward and gradient within 1e-5 in fp32. No Bridge, no megatron: fast."""

import math

import pytest
import torch
import torch.nn.functional as F

from bridge_sft.runtime import mamba

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_scan(x, dt, A, B, C, D, z, dt_bias, seq_idx=None):
    """Token by token: state = exp(dt A) state + dt B x, reset to zero where seq_idx changes; y = C state + D x,
    gated by silu(z). Returns (y, final state, the state after every token)."""
    b, length, h, p = x.shape
    rep = h // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    state = x.new_zeros(b, h, p, B.shape[3])
    ys, states = [], []
    for t in range(length):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
        Bt, Ct = B[:, t].repeat_interleave(rep, dim=1), C[:, t].repeat_interleave(rep, dim=1)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, Ct) + D[None, :, None] * x[:, t]
        ys.append(y * F.silu(z[:, t]))
        states.append(state)
    return torch.stack(ys, 1), state, torch.stack(states, 1)


def naive_conv(x, weight, bias, seq_idx=None):
    """[b, d, l]: each output from the w inputs ending at it, of its own sequence only; silu."""
    b, d, length = x.shape
    out = torch.zeros_like(x)
    for t in range(length):
        acc = bias.expand(b, d).clone()
        for k in range(weight.shape[1]):
            s = t - (weight.shape[1] - 1) + k
            if s < 0:
                continue
            same = torch.ones(b, dtype=x.dtype) if seq_idx is None else (seq_idx[:, s] == seq_idx[:, t]).to(x.dtype)
            acc = acc + weight[:, k] * x[:, :, s] * same[:, None]
        out[:, :, t] = F.silu(acc)
    return out


def scan_inputs(b=2, length=53, h=4, p=8, g=2, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    return dict(x=r(b, length, h, p), dt=r(b, length, h, scale=0.5), A=(-torch.rand(h, generator=gen) - 0.5)
                .requires_grad_(), B=r(b, length, g, n, scale=0.5), C=r(b, length, g, n, scale=0.5), D=r(h),
                z=r(b, length, h, p), dt_bias=r(h, scale=0.5))


# Boundaries mid-chunk, right at a chunk boundary (16, 32), a one-token sequence, and a sequence across chunks.
PACKED_SEQ_IDX = torch.tensor([[0] * 7 + [1] * 9 + [2] * 1 + [3] * 23 + [4] * 13,
                               [0] * 16 + [1] * 16 + [2] * 21])


def grads(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, list(inputs.values()))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_chunked_scan_equals_the_per_token_recurrence_forward_and_gradient(packed):
    inputs = scan_inputs()
    seq_idx = PACKED_SEQ_IDX if packed else None
    out, final = mamba.mamba_chunk_scan_combined(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=16, D=inputs["D"],
        z=inputs["z"], dt_bias=inputs["dt_bias"], seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    ref_out, ref_final, _ = naive_scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
                                       seq_idx=seq_idx)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(final, ref_final, **TOL)
    for got, want in zip(grads((out, final), inputs), grads((ref_out, ref_final), inputs)):
        torch.testing.assert_close(got, want, **TOL)


def test_packed_scan_equals_each_sequence_alone_and_returns_each_final_state():
    inputs = scan_inputs(b=1, length=61, seed=2)
    lengths = [5, 27, 1, 28]  # 16-token chunks: sequences end mid-chunk and cross chunk boundaries
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    out, varlen = mamba.mamba_chunk_scan_combined(*args, chunk_size=16, D=inputs["D"], z=inputs["z"],
                                                  dt_bias=inputs["dt_bias"], cu_seqlens=cu_seqlens,
                                                  dt_softplus=True, return_varlen_states=True)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        piece = {k: (v[:, start:end] if v.dim() > 1 else v) for k, v in inputs.items()}
        alone, final = mamba.mamba_chunk_scan_combined(
            *(piece[k] for k in ("x", "dt", "A", "B", "C")), chunk_size=16, D=piece["D"], z=piece["z"],
            dt_bias=piece["dt_bias"], dt_softplus=True, return_final_states=True)
        torch.testing.assert_close(out[:, start:end], alone, **TOL)
        torch.testing.assert_close(varlen[i], final[0], **TOL)


def test_causal_conv1d_honours_sequence_starts_forward_and_gradient():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 53, generator=gen, requires_grad=True)
    weight = torch.randn(6, 4, generator=gen, requires_grad=True)
    bias = torch.randn(6, generator=gen, requires_grad=True)
    for seq_idx in (None, PACKED_SEQ_IDX):
        out = mamba.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation="silu")
        ref = naive_conv(x, weight, bias, seq_idx)
        torch.testing.assert_close(out, ref, **TOL)
        for got, want in zip(grads((out,), {"x": x, "w": weight, "b": bias}),
                             grads((ref,), {"x": x, "w": weight, "b": bias})):
            torch.testing.assert_close(got, want, **TOL)
    # cu_seqlens (THD) is the same as the seq_idx it describes
    cu = torch.tensor([0, 7, 16, 17, 40, 53])
    torch.testing.assert_close(mamba.causal_conv1d(x[:1], weight, bias, cu_seqlens=cu, activation="silu"),
                               mamba.causal_conv1d(x[:1], weight, bias, seq_idx=PACKED_SEQ_IDX[:1], activation="silu"))


def test_causal_conv1d_update_token_by_token_equals_the_whole_sequence():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, generator=gen)
    weight, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    state = torch.zeros(2, 6, 3)
    steps = [mamba.causal_conv1d_update(x[:, :, t], state, weight, bias, activation="silu") for t in range(9)]
    torch.testing.assert_close(torch.stack(steps, -1), mamba.causal_conv1d_fn(x, weight, bias, activation="silu"))
    torch.testing.assert_close(state, x[..., -3:])
    cu = torch.tensor([0, 4, 9])
    states = mamba.causal_conv1d_varlen_states(x[0].T, cu, 3)
    torch.testing.assert_close(states[0, :, :], x[0, :, 1:4])
    torch.testing.assert_close(states[1, :, :], x[0, :, 6:9])


def _hf_nemotron_h_mixer(chunk_size=16, seed=5):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = NemotronHConfig(hidden_size=32, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
                             conv_kernel=4, chunk_size=chunk_size, use_mamba_kernels=False, time_step_min=0.0,
                             layers_block_type=["mamba"], num_hidden_layers=1)
    torch.manual_seed(seed)
    mixer = NemotronHMamba2Mixer(config, layer_idx=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's constant initialisations randomised, so a dropped or swapped one shows
        for param in (mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, mixer.conv1d.bias):
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return mixer


def _our_mixer(mixer, hidden, seq_idx=None):
    """megatron-core MambaMixer._ssm_training's calls, on the HF mixer's weights."""
    out = mamba.mamba_split_conv1d_scan_combined(
        mixer.in_proj(hidden), mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.dt_bias, -torch.exp(mixer.A_log),
        D=mixer.D, chunk_size=mixer.chunk_size, activation="silu", headdim=mixer.head_dim, ngroups=mixer.n_groups,
        norm_before_gate=False, seq_idx=seq_idx)
    norm = mamba.RMSNormGated(out.shape[-1], eps=mixer.norm.variance_epsilon,
                              group_size=out.shape[-1] // mixer.n_groups, norm_before_gate=False)
    norm.weight = mixer.norm.weight
    return mixer.out_proj(norm(out))


def test_hf_nemotron_h_torch_path_bug_is_known_and_fixed_for_the_references():
    """transformers' NemotronHMamba2Mixer.torch_forward passes chunk states summed over the wrong axis
    (tests/hf_reference.py): its output at token 48 depends on whether the sequence ends there. Fixed, it does not."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from hf_reference import fix_hf_nemotron_h_torch_path

    mixer = _hf_nemotron_h_mixer()
    hidden = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(6))
    original = NemotronHMamba2Mixer.torch_forward
    if not getattr(original, "_bridge_sft_fixed", False):  # an earlier test may have fixed it already
        assert (original(mixer, hidden[:, :49])[:, 48] - original(mixer, hidden)[:, 48]).abs().max() > 1e-3
    assert fix_hf_nemotron_h_torch_path()
    fixed = NemotronHMamba2Mixer.torch_forward
    torch.testing.assert_close(fixed(mixer, hidden[:, :49]), fixed(mixer, hidden)[:, :49], **TOL)


@pytest.mark.parametrize("length", [64, 53])
def test_split_conv1d_scan_and_gated_norm_equal_hf_nemotron_h_torch_path_forward_and_gradient(length):
    """HF's torch path (its inter-chunk bug fixed: tests/hf_reference.py), on 4 full chunks and on 3 and a part."""
    from hf_reference import fix_hf_nemotron_h_torch_path

    fix_hf_nemotron_h_torch_path()
    mixer = _hf_nemotron_h_mixer()
    hidden = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
    ours, theirs = _our_mixer(mixer, hidden), mixer.torch_forward(hidden)
    torch.testing.assert_close(ours, theirs, **TOL)
    params = {"hidden": hidden, **dict(mixer.named_parameters())}
    for got, want in zip(grads((ours,), params), grads((theirs,), params)):
        torch.testing.assert_close(got, want, **TOL)


def test_packed_mixer_equals_each_sample_alone():
    mixer = _hf_nemotron_h_mixer()
    hidden = torch.randn(1, 53, 32, generator=torch.Generator().manual_seed(7))
    packed = _our_mixer(mixer, hidden, seq_idx=PACKED_SEQ_IDX[:1])
    bounds = [0, 7, 16, 17, 40, 53]
    for start, end in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(packed[:, start:end], _our_mixer(mixer, hidden[:, start:end]), **TOL)


def test_gated_rms_norm_variants():
    gen = torch.Generator().manual_seed(8)
    x, z, w = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    groups = x.view(3, 2, 8)
    normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 16) * w
    torch.testing.assert_close(mamba.rms_norm_gated(x, w, eps=1e-5, group_size=8), normed)
    torch.testing.assert_close(mamba.rms_norm_gated(x, w, z=z, eps=1e-5, group_size=8, norm_before_gate=True),
                               normed * F.silu(z))
    gated = (x * F.silu(z)).view(3, 2, 8)
    torch.testing.assert_close(mamba.rms_norm_gated(x, w, z=z, eps=1e-5, group_size=8, norm_before_gate=False),
                               (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 16) * w)
    assert not math.isnan(float(mamba.rms_norm_gated(torch.zeros(2, 16), w, group_size=8).sum()))


def test_mamba_kernels_are_served_to_megatrons_mixer_only():
    """Without mamba_ssm / causal_conv1d, megatron-core's MambaMixer (and the version checks in
    megatron.core.utils) get bridge_sft.runtime.mamba; no other module sees those packages."""
    from launch import stand_in_facts

    facts = stand_in_facts(
        "from megatron.core.ssm import mamba_mixer\nfrom megatron.core import utils\nfrom bridge_sft.runtime import mamba",
        {"have_mamba_ssm": "mamba_mixer.HAVE_MAMBA_SSM",
         "scan_is_ours": "mamba_mixer.mamba_split_conv1d_scan_combined is mamba.mamba_split_conv1d_scan_combined",
         "conv_is_ours": "mamba_mixer.causal_conv1d_fn is mamba.causal_conv1d_fn",
         "norm_is_ours": "issubclass(mamba_mixer.ExtendedRMSNorm, mamba.RMSNormGated)",
         "packing_supported":
             "mamba_mixer._check_mamba_sequence_packing_support(for_inference_not_training=False)[0]"},
        ("mamba_ssm", "causal_conv1d"))
    assert facts == {"have_mamba_ssm": True, "scan_is_ours": True, "conv_is_ours": True, "norm_is_ours": True,
                     "packing_supported": True, "importable_elsewhere": False, "in_sys_modules": []}, facts
