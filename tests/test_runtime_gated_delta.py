"""The plain-torch gated DeltaNet kernels (bridge_sft.runtime.gated_delta, served as ``fla``) against independent
references: HF Qwen3-Next's per-token ``torch_recurrent_gated_delta_rule`` and its chunked
``torch_chunk_gated_delta_rule``, torch's ``F.conv1d`` per sequence, and each packed sequence run alone.
Forward and gradient within 1e-5 (relative to the reference's largest value) in fp32. No Bridge: fast."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule as hf_chunk,
    torch_recurrent_gated_delta_rule as hf_recurrent,
)

from bridge_sft.runtime import gated_delta

TOL = 1e-5
KEYS = ("q", "k", "v", "g", "beta")


def assert_close(got, want, tol=TOL, what=""):
    """Max |got - want| within ``tol`` times the reference's scale (its largest |value|, at least 1)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape, want.dtype)
    got, want = got.detach().float(), want.detach().float()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max |difference| {err:.3g} > {tol} x {scale:.3g}"


def gdr_inputs(b=2, length=150, h=2, dk=16, dv=12, seed=0, initial=False, unit_keys=True):
    """Leaf tensors ``[b, t, h, d]`` as a trained layer sees them: decays g = logsigmoid(.) <= 0 (some near 0,
    so a state lives for many tokens), beta in (0, 1), unit keys (the delta rule is stable for |k| = 1)
    unless the kernel normalises them itself."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    k = r(b, length, h, dk)
    inputs = dict(q=r(b, length, h, dk), k=F.normalize(k, dim=-1) if unit_keys else k, v=r(b, length, h, dv),
                  g=F.logsigmoid(r(b, length, h) + 3), beta=torch.sigmoid(r(b, length, h)))
    if initial:
        inputs["initial_state"] = 0.5 * r(b, h, dk, dv)
    return {name: t.requires_grad_() for name, t in inputs.items()}


def ours(inputs, **kw):
    return gated_delta.chunk_gated_delta_rule(*(inputs[n] for n in KEYS), initial_state=inputs.get("initial_state"),
                                              output_final_state=True, **kw)


def hf(fn, inputs, l2norm=False):
    return fn(*(inputs[n] for n in KEYS), initial_state=inputs.get("initial_state"), output_final_state=True,
              use_qk_l2norm_in_kernel=l2norm)


def grads(outputs, inputs, seed=1):
    """The gradient of a random projection of ``outputs`` (the same for the same shapes); the graph is kept."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, list(inputs.values()), retain_graph=True)


def assert_same_and_same_gradient(got, want, inputs):
    for what, g, w in zip(("output", "final state"), got, want):
        assert_close(g, w, what=what)
    for name, g, w in zip(inputs, grads(got, inputs), grads(want, inputs)):
        assert_close(g, w, what=f"gradient of {name}")


@pytest.mark.parametrize("initial, l2norm", [(False, True), (True, False)], ids=["l2norm-in-kernel", "initial-state"])
def test_chunked_rule_equals_hf_recurrence_and_hf_chunked_forward_and_gradient(initial, l2norm):
    """Batch 2 of 150 tokens: two whole 64-token chunks and a part; the final state of each row."""
    inputs = gdr_inputs(initial=initial, unit_keys=not l2norm)
    got = ours(inputs, use_qk_l2norm_in_kernel=l2norm)
    assert got[0].shape == (2, 150, 2, 12) and got[1].shape == (2, 2, 16, 12)
    assert_same_and_same_gradient(got, hf(hf_recurrent, inputs, l2norm), inputs)
    assert_same_and_same_gradient(got, hf(hf_chunk, inputs, l2norm), inputs)


# A one-token sequence, sequences ending one before, at and one after a 64-token chunk boundary, several chunks.
PACKED_LENGTHS = [1, 63, 64, 65, 200]


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(lengths=PACKED_LENGTHS, initial=False, seed=2, unit_keys=True):
    inputs = gdr_inputs(b=1, length=sum(lengths), seed=seed, unit_keys=unit_keys)
    if initial:
        gen = torch.Generator().manual_seed(seed + 1)
        inputs["initial_state"] = (0.5 * torch.randn(len(lengths), 2, 16, 12, generator=gen)).requires_grad_()
    return inputs


def each_alone(inputs, lengths, l2norm=False):
    """Each sequence through HF's per-token recurrence on its own: (outputs concatenated, final states stacked)."""
    cu = cu_seqlens_of(lengths).tolist()
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        piece = {n: inputs[n][:, start:end] for n in KEYS}
        if "initial_state" in inputs:
            piece["initial_state"] = inputs["initial_state"][i:i + 1]
        out, final = hf(hf_recurrent, piece, l2norm)
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals)


@pytest.mark.parametrize("lengths, initial, l2norm", [(PACKED_LENGTHS, False, False), (PACKED_LENGTHS, True, True),
                                                     ([5, 0, 70], True, False)],
                         ids=["zero-state", "initial-state-l2norm", "empty-sequence-keeps-its-initial-state"])
def test_packed_rule_equals_each_sequence_alone_with_its_final_state(lengths, initial, l2norm):
    inputs = packed_inputs(lengths, initial=initial, unit_keys=not l2norm)
    got = ours(inputs, cu_seqlens=cu_seqlens_of(lengths), use_qk_l2norm_in_kernel=l2norm)
    assert got[1].shape == (len(lengths), 2, 16, 12)
    assert_same_and_same_gradient(got, each_alone(inputs, lengths, l2norm), inputs)


def test_no_state_crosses_a_packed_sequence_boundary():
    """A first sequence with large values leaves a large state; the next sequences (one starting mid-chunk of the
    unpadded stream) do not see it: their outputs equal those of the same sequences after a quiet first one, and
    no gradient of theirs reaches the first sequence's inputs."""
    lengths = [40, 30, 70]
    loud = packed_inputs(lengths, seed=4)
    quiet = {n: t.detach().clone() for n, t in loud.items()}
    with torch.no_grad():
        loud["v"][:, :40] *= 100
        loud["g"][:, :40] = 0.0  # no decay: the first sequence's whole history stays in the state
        quiet["v"][:, :40] = 0.0
    cu = cu_seqlens_of(lengths)
    out_loud, final_loud = ours(loud, cu_seqlens=cu)
    out_quiet, final_quiet = ours(quiet, cu_seqlens=cu)
    assert float(final_loud[0].detach().abs().max()) > 100  # the state that would leak is there
    assert_close(out_loud[:, 40:], out_quiet[:, 40:], what="later outputs")
    assert_close(final_loud[1:], final_quiet[1:], what="later final states")
    later = torch.autograd.grad((out_loud[:, 40:] ** 2).sum() + (final_loud[1:] ** 2).sum(), list(loud.values()))
    for name, grad in zip(loud, later):
        assert float(grad[:, :40].abs().max()) == 0.0, name


def test_custom_scale_and_bf16_in_bf16_out():
    inputs = gdr_inputs(seed=5)
    dk = inputs["q"].shape[-1]
    out, _ = ours(inputs, scale=0.3)
    # HF's references fix scale = dk ** -0.5: the same rule with scale 0.3 is theirs on q * 0.3 * sqrt(dk).
    want, _ = hf_recurrent(inputs["q"] * (0.3 * dk ** 0.5), *(inputs[n] for n in KEYS[1:]), None, False)
    assert_same_and_same_gradient((out,), (want,), inputs)
    low = {n: t.detach().to(torch.bfloat16) for n, t in inputs.items()}
    out, final = ours(low)
    want, want_final = hf(hf_recurrent, low)  # fp32 inside, bf16 out
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close(out, want, tol=1e-2)
    assert_close(final, want_final)


def reference_conv(x, weight, bias, residual, activation, lengths):
    """[b, t, d] per sequence: torch's grouped F.conv1d with causal (left) padding, then activation and residual."""
    width = weight.shape[-1]
    rows = []
    for row in range(x.shape[0]):
        cu = cu_seqlens_of(lengths).tolist() if lengths else [0, x.shape[1]]
        pieces = [F.conv1d(F.pad(x[row, s:e].T[None], (width - 1, 0)), weight[:, None], bias, groups=x.shape[-1])[0].T
                  for s, e in zip(cu[:-1], cu[1:])]
        rows.append(torch.cat(pieces))
    y = torch.stack(rows)
    y = F.silu(y) if activation == "silu" else y
    return y + residual if residual is not None else y


CONV_LENGTHS = [1, 3, 4, 9, 20]  # shorter than, as long as and longer than the width of 4


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("activation, with_bias, with_residual", [("silu", True, True), (None, False, False)],
                         ids=["silu-bias-residual", "plain"])
def test_causal_conv1d_equals_torch_conv1d_per_sequence_forward_and_gradient(packed, activation, with_bias,
                                                                           with_residual):
    gen = torch.Generator().manual_seed(6)
    b, length, d, width = (1, sum(CONV_LENGTHS), 6, 4) if packed else (2, 29, 6, 4)
    params = dict(x=torch.randn(b, length, d, generator=gen), weight=torch.randn(d, width, generator=gen),
                  bias=torch.randn(d, generator=gen) if with_bias else None,
                  residual=torch.randn(b, length, d, generator=gen) if with_residual else None)
    params = {n: t.requires_grad_() for n, t in params.items() if t is not None}
    lengths = CONV_LENGTHS if packed else None
    y, final = gated_delta.causal_conv1d(**params, activation=activation, output_final_state=True,
                                         cu_seqlens=cu_seqlens_of(lengths) if packed else None)
    want = reference_conv(params["x"], params["weight"], params.get("bias"), params.get("residual"), activation,
                          lengths)
    assert_close(y, want)
    for name, got, ref in zip(params, grads((y,), params), grads((want,), params)):
        assert_close(got, ref, what=f"gradient of {name}")
    # final_state [n, d, w]: each sequence's last w inputs, zeros on the left of a shorter one
    cu = cu_seqlens_of(lengths).tolist() if packed else None
    x = params["x"].detach()
    seqs = [x[0, s:e] for s, e in zip(cu[:-1], cu[1:])] if packed else list(x)
    assert final.shape == (len(seqs), d, width)
    for state, seq in zip(final, seqs):
        want_state = F.pad(seq[-width:].T, (width - min(width, len(seq)), 0))
        torch.testing.assert_close(state, want_state, rtol=0, atol=0)


def test_l2norm():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 32, generator=gen)
    want = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(gated_delta.l2norm(x), want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gated_delta.l2norm(x, eps=0.5), x / torch.sqrt((x * x).sum(-1, keepdim=True) + 0.5),
                               rtol=TOL, atol=TOL)
    low = gated_delta.l2norm(x.bfloat16())
    assert low.dtype == torch.bfloat16 and gated_delta.l2norm(x.bfloat16(), output_dtype=torch.float32).dtype == \
        torch.float32
    assert float((low.float() - want).abs().max()) < 1e-2
    assert not torch.isnan(gated_delta.l2norm(torch.zeros(2, 8))).any()


@pytest.mark.parametrize("fn", ["chunk_gated_delta_rule", "causal_conv1d"])
def test_bad_cu_seqlens_raise_one_clear_error(fn):
    inputs = gdr_inputs(b=2, length=10, seed=8)
    args = [inputs[n].detach() for n in KEYS] if fn == "chunk_gated_delta_rule" else \
        [inputs["q"].detach().flatten(2), torch.randn(32, 4)]
    call = getattr(gated_delta, fn)
    with pytest.raises(ValueError, match="cu_seqlens.*batch"):
        call(*args, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 10 tokens"):
        call(*(a[:1] if a.dim() > 2 else a for a in args), cu_seqlens=torch.tensor([0, 4, 9]))


def test_fla_kernels_are_served_to_megatrons_gated_delta_net_only():
    """Without fla, megatron-core's GatedDeltaNet module gets bridge_sft.runtime.gated_delta; no other module
    sees an ``fla`` package."""
    from launch import stand_in_facts

    facts = stand_in_facts(
        "from megatron.core.ssm.gated_delta_net import common\nfrom bridge_sft.runtime import gated_delta",
        {"have_fla": "common.HAVE_FLA",
         "rule_is_ours": "common.chunk_gated_delta_rule is gated_delta.chunk_gated_delta_rule",
         "conv_is_ours": "common.causal_conv1d is gated_delta.causal_conv1d",
         "l2norm_is_ours": "common.l2norm is gated_delta.l2norm"}, ("fla",))
    assert facts == {"have_fla": True, "rule_is_ours": True, "conv_is_ours": True, "l2norm_is_ours": True,
                     "importable_elsewhere": False, "in_sys_modules": []}, facts
