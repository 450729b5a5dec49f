"""Mamba-2 kernels in plain torch: what megatron-core's ``MambaMixer`` imports from ``mamba_ssm`` and
``causal_conv1d`` (CUDA-only packages), for the CPU runtime and GPUs without them.

Served by ``no_te`` (``PROVIDES``) only to the megatron modules that import them, and only when the real
package is not installed. Every function follows the signature and layout of the kernel it replaces
(mamba_ssm 2.2.x, causal_conv1d 1.5.x); what it does not cover raises one clear error.

Packed sequences: ``seq_idx`` ``[b, l]`` int (non-decreasing along ``l``, the sequence each token belongs
to) or ``cu_seqlens`` ``[n + 1]`` (cumulative lengths over the flattened ``b * l`` tokens, ``b == 1``).
At every sequence start the convolution sees no earlier token and the scan state restarts from zero, so
nothing of one sample reaches the next.

The scan is the chunked SSD algorithm (Dao & Gu 2024, "Transformers are SSMs", Listing 1, as in
``mamba_ssm.modules.ssd_minimal``): quadratic attention-like products inside chunks of ``chunk_size``
tokens, a linear recurrence over chunk states between them. Masks on ``seq_idx`` cut every path between
tokens of different sequences, as the Triton kernels do (``_chunk_state``, ``_state_passing``,
``_chunk_scan`` with ``seq_idx``). The gradient is torch's autograd of the same operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The kernel versions whose API these stand-ins follow (megatron-core checks them before packed training).
MAMBA_SSM_VERSION = "2.2.6.post3"
CAUSAL_CONV1D_VERSION = "1.5.3.post1"


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, total]`` int32: for each of ``total`` tokens the index of its sequence in ``cu_seqlens``
    (tokens past ``cu_seqlens[-1]`` belong to the last sequence)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    idx = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    return idx.clamp_(max=max(len(cu_seqlens) - 2, 0)).to(torch.int32).unsqueeze(0)


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(x)
    if activation is None:
        return x
    raise ValueError(f"activation must be None, 'silu' or 'swish', not {activation!r}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                  initial_states: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """Causal depthwise convolution, per sequence: ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] *
    x[b, d, t - (w - 1) + k])``, a term counting only if that input belongs to the same sequence as ``t``.

    x ``[b, d, l]``; weight ``[d, w]``; bias ``[d]`` or None; seq_idx ``[b, l]`` or cu_seqlens (see the
    module docstring); initial_states ``[b, d, w - 1]``: the ``w - 1`` inputs before ``x`` (they count for
    the first sequence only). Returns ``[b, d, l]`` in x's dtype. General: any layer's short convolution
    (Mamba-2, gated DeltaNet) can use it.
    """
    b, d, length = x.shape
    width = weight.shape[-1]
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("causal_conv1d: give seq_idx or cu_seqlens, not both")
        if b != 1:
            raise ValueError(f"causal_conv1d: cu_seqlens needs x of batch 1 (packed THD), got batch {b}")
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, length)
    if initial_states is None:
        history = x.new_zeros(b, d, width - 1)
    else:
        history = initial_states.to(x.dtype)
    padded = torch.cat([history, x], dim=-1)
    if seq_idx is not None:
        # Positions before the first token belong to the first sequence (its initial state).
        seq = torch.cat([seq_idx[:, :1].expand(b, width - 1), seq_idx], dim=-1).to(torch.int64)
    out = x.new_zeros(b, d, length) if bias is None else bias.to(x.dtype)[None, :, None].expand(b, d, length)
    for k in range(width):
        tap = padded[..., k:k + length]
        if seq_idx is not None:
            tap = tap * (seq[:, k:k + length] == seq_idx.to(torch.int64)).unsqueeze(1).to(x.dtype)
        out = out + weight[:, k].to(x.dtype)[None, :, None] * tap
    return _activate(out, activation)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """``causal_conv1d.causal_conv1d_fn``: x ``[b, d, l]``, weight ``[d, w]``; returns ``[b, d, l]`` (and
    the last ``w - 1`` inputs ``[b, d, w - 1]`` when ``return_final_states``)."""
    out = causal_conv1d(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states, activation=activation)
    if not return_final_states:
        return out
    width = weight.shape[-1]
    history = x.new_zeros(x.shape[0], x.shape[1], width - 1) if initial_states is None else initial_states
    final = torch.cat([history.to(x.dtype), x], dim=-1)[..., -(width - 1):]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """``causal_conv1d.causal_conv1d_update`` (decoding): x ``[b, d]`` or ``[b, d, l]``, conv_state
    ``[b, d, state_len >= w - 1]`` updated in place (shifted left by ``l``); returns x's shape."""
    if cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError("causal_conv1d_update: bridge_sft's plain-torch stand-in has no circular "
                                  "buffer (cache_seqlens) or state indices (conv_state_indices)")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    width, length = weight.shape[-1], x.shape[-1]
    full = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    history = full[..., :conv_state.shape[-1]][..., conv_state.shape[-1] - (width - 1):]
    out = causal_conv1d(x, weight, bias, initial_states=history, activation=activation)
    conv_state.copy_(full[..., -conv_state.shape[-1]:])
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """``causal_conv1d.causal_conv1d_varlen.causal_conv1d_varlen_states``: x ``[total, d]``; for each
    sequence its last ``state_len`` inputs ``[n, d, state_len]``, zero on the left where it is shorter."""
    n = len(cu_seqlens) - 1
    states = x.new_zeros(n, x.shape[-1], state_len)
    for i in range(n):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        take = min(state_len, end - start)
        if take:
            states[i, :, state_len - take:] = x[end - take:end].transpose(0, 1)
    return states


def _segsum_masked(dA: torch.Tensor) -> torch.Tensor:
    """``[..., l] -> [..., l, l]``: ``out[..., i, j] = sum(dA[..., j+1 : i+1])`` for ``j <= i``, -inf above
    the diagonal (the stable form of Listing 1: cumulative sums of masked copies, no differences)."""
    length = dA.shape[-1]
    x = dA.unsqueeze(-1).expand(*dA.shape, length)  # x[..., i, j] = dA[..., i]
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=dA.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=dA.device))
    return out.masked_fill(~lower, -math.inf)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   dt_softplus=False, dt_limit=(0.0, math.inf), state_positions=None):
    """The Mamba-2 selective scan, chunked; returns ``(out, final_states, states_at)``.

    Shapes: x ``[b, l, h, p]``; dt ``[b, l, h]``; A ``[h]`` (negative); B, C ``[b, l, g, n]`` (head ``i``
    reads group ``i // (h / g)``); D ``[h]`` or ``[h, p]``; z ``[b, l, h, p]``; dt_bias ``[h]``;
    initial_states ``[b, h, p, n]``; seq_idx ``[b, l]``. Per token, with ``dt = softplus?(dt + dt_bias)``
    clamped to dt_limit: ``state = exp(dt A) state + dt B x`` (``state`` restarting at zero at every new
    sequence), ``y = C state + D x``, ``out = y * silu(z)`` if z is given. Computed in fp32, returned in x's
    dtype. ``final_states`` ``[b, h, p, n]`` (fp32): the state after the last token. ``states_at``
    ``[k, h, p, n]``: the states after the tokens ``state_positions`` ``[k, 2]`` (batch, position) list,
    or None.
    """
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"mamba scan: {h} heads do not split into {g} groups")
    dtype = x.dtype
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, as the kernels' `dt <= 20 ? softplus(dt) : dt`
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    xf, Bf, Cf = x.float(), B.float(), C.float()
    pad = (-length) % chunk_size
    if pad:  # padded tokens: dt = 0 (no decay, no input), same sequence as the last token
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    total = length + pad
    c, cl = total // chunk_size, chunk_size
    heads_per_group = h // g
    # [b, c, l, ...] chunk views
    X = (xf * dt.unsqueeze(-1)).view(b, c, cl, h, p)
    dA = (dt * A.float()).view(b, c, cl, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    Bc, Cc = Bf.view(b, c, cl, g, n), Cf.view(b, c, cl, g, n)
    dA_cs = torch.cumsum(dA, dim=-1)  # [b, h, c, l]
    same = None
    if seq_idx is not None:
        sq = seq_idx.to(torch.int64).view(b, c, cl)
        same = sq.unsqueeze(-1) == sq.unsqueeze(-2)  # [b, c, l, s]
        last = sq[..., -1]  # [b, c]: the sequence alive at each chunk's end

    # Heads as [groups, heads per group]: B and C are read per group, never copied per head.
    r = heads_per_group
    Xg = X.view(b, c, cl, g, r, p)

    # 1. inside each chunk: y_l += sum_{s <= l, same sequence} C_l.B_s exp(sum dA(s, l]) X_s
    decay = torch.exp(_segsum_masked(dA))  # [b, h, c, l, s]
    if same is not None:
        decay = decay * same.unsqueeze(1)
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # [b, g, c, l, s]
    scores = decay.view(b, g, r, c, cl, cl) * CB.unsqueeze(2)
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, Xg).reshape(b, c, cl, h, p)

    # 2. each chunk's own state at its end (tokens of the sequence alive at the end only)
    to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # [b, h, c, l]
    if same is not None:
        to_end = to_end * (sq == last.unsqueeze(-1)).unsqueeze(1)
    chunk_states = torch.einsum("bclgn,bgrcl,bclgrp->bcgrpn", Bc, to_end.view(b, g, r, c, cl), Xg)
    chunk_states = chunk_states.reshape(b, c, h, p, n)

    # 3. states between chunks: H_c = chunk_states_c + exp(sum dA over chunk c) H_{c-1} (same sequence)
    state = (torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device) if initial_states is None
             else initial_states.float())
    carry = torch.exp(dA_cs[..., -1])  # [b, h, c]
    prev_seq = seq_idx[:, :1].to(torch.int64).squeeze(1) if seq_idx is not None else None
    entering = []
    for ci in range(c):
        entering.append(state)
        keep = carry[:, :, ci]
        if seq_idx is not None:
            keep = keep * (last[:, ci] == prev_seq).unsqueeze(1)
            prev_seq = last[:, ci]
        state = chunk_states[:, ci] + keep[..., None, None] * state
    entering = torch.stack(entering, dim=1)  # [b, c, h, p, n]: the state before each chunk

    # 4. the entering state's share of each output: C_l exp(sum dA[0..l]) H_{c-1} (same sequence)
    from_start = torch.exp(dA_cs)  # [b, h, c, l]
    if seq_idx is not None:
        before = torch.cat([seq_idx[:, :1].to(torch.int64), last[:, :-1]], dim=1)  # [b, c]
        from_start = from_start * (sq == before.unsqueeze(-1)).unsqueeze(1)
    y = y + torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, entering.view(b, c, g, r, p, n),
                         from_start.view(b, g, r, c, cl)).reshape(b, c, cl, h, p)

    states_at = None
    if state_positions is not None:
        states_at = _states_after(state_positions, chunk_size, entering, from_start, decay, Bc, X, r)
    y = y.reshape(b, total, h, p)[:, :length]
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df.view(1, 1, h, 1) if Df.dim() == 1 else Df.view(1, 1, h, p))
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype), state, states_at


def _states_after(positions, chunk_size, entering, from_start, decay, Bc, X, heads_per_group):
    """The scan state right after each (batch, position) in ``positions`` ``[k, 2]``: the entering state of
    its chunk decayed to it plus the chunk's own tokens up to it (same-sequence masks already in
    ``from_start`` and ``decay``)."""
    out = []
    for bi, pos in positions.tolist():
        ci, li = divmod(int(pos), chunk_size)
        state = from_start[bi, :, ci, li][:, None, None] * entering[bi, ci]
        weights = decay[bi, :, ci, li, :li + 1]  # [h, s]
        Bh = Bc[bi, ci, :li + 1].repeat_interleave(heads_per_group, dim=1)  # [s, h, n]
        state = state + torch.einsum("hs,shn,shp->hpn", weights, Bh, X[bi, ci, :li + 1])
        out.append(state)
    return torch.stack(out)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                              return_final_states=False, return_varlen_states=False):
    """``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` (shapes: ``ssd_chunk_scan``).

    Returns out ``[b, l, h, p]``; with ``return_final_states`` also the state after the last token
    ``[b, h, p, n]``; with ``return_varlen_states`` (needs ``cu_seqlens``) also each sequence's final
    state ``[len(cu_seqlens) - 1, h, p, n]``.
    """
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("mamba_chunk_scan_combined: return_varlen_states needs cu_seqlens")
    if cu_seqlens is not None and seq_idx is None:
        if x.shape[0] != 1:
            raise ValueError(f"mamba_chunk_scan_combined: cu_seqlens needs x of batch 1, got {x.shape[0]}")
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    positions = None
    if return_varlen_states:
        ends = cu_seqlens[1:].to(torch.int64) - 1
        positions = torch.stack([torch.zeros_like(ends), ends], dim=1)
    out, final, varlen = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                                        dt_limit=dt_limit, state_positions=positions)
    if not (return_final_states or return_varlen_states):
        return out
    results = (out,) + ((final.to(x.dtype),) if return_final_states else ())
    return results + ((varlen.to(x.dtype),) if return_varlen_states else ())


def rms_norm_gated(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm's gated RMSNorm (``layernorm_gated.rms_norm_ref``): with ``norm_before_gate=False``
    ``norm(x * silu(z)) * weight (+ bias)``, else ``norm(x) * weight * silu(z)``; the norm is over groups of
    ``group_size`` channels (all channels when None), in fp32, returned in x's dtype."""
    dtype = x.dtype
    xf = x.float()
    zf = z.float() if z is not None else None
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    size = group_size or xf.shape[-1]
    grouped = xf.unflatten(-1, (xf.shape[-1] // size, size))
    out = (grouped * torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if zf is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)


class RMSNormGated(torch.nn.Module):
    """``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``: ``forward(x, z=None)`` is ``rms_norm_gated``."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined`` (the training path of
    megatron-core's MambaMixer): zxbcdt ``[b, l, 2 * d_nonssm + 2 * dim + 2 * ngroups * n + h]`` split into
    an optional SwiGLU part, z, xBC (through ``causal_conv1d``) and dt; the scan with ``dt_softplus``;
    gated by z (``rmsnorm_weight`` given: the gated RMSNorm, else ``* silu(z)``); optional out projection.
    Returns ``[b, l, dim]`` (or the projection), and the final states with ``return_final_states``.
    """
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("mamba_split_conv1d_scan_combined: headdim is needed when D is per head")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    b, length, _ = zxbcdt.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or zxbcdt.shape[-1] != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"mamba_split_conv1d_scan_combined: zxbcdt's last dimension {zxbcdt.shape[-1]} does not "
                         f"split into z, x, B, C, dt for {nheads} heads of {headdim}, {ngroups} groups")
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                        activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.unflatten(-1, (nheads, headdim))
    B, C = B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate))
    z = z.unflatten(-1, (nheads, headdim))
    gate_in_scan = rmsnorm_weight is None
    out, final, _ = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z if gate_in_scan else None,
                                   dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
                                   dt_softplus=True, dt_limit=dt_limit)
    out = out.flatten(-2)
    if not gate_in_scan:
        out = rms_norm_gated(out, rmsnorm_weight, None, z=z.flatten(-2), eps=rmsnorm_eps,
                             group_size=dim // ngroups, norm_before_gate=norm_before_gate)
    if d_nonssm > 0:
        gate, up = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(gate) * up, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final.to(out.dtype)) if return_final_states else out


# What no_te serves as `mamba_ssm` / `causal_conv1d` (module name -> the names it provides).
PROVIDES_MAMBA_SSM = {
    "mamba_ssm": {"__version__": MAMBA_SSM_VERSION},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": RMSNormGated, "rmsnorm_fn": rms_norm_gated},
    "mamba_ssm.ops.triton.ssd_combined": {
        "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
        "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
    },
}
PROVIDES_CAUSAL_CONV1D = {
    "causal_conv1d": {"__version__": CAUSAL_CONV1D_VERSION, "causal_conv1d_fn": causal_conv1d_fn,
                      "causal_conv1d_update": causal_conv1d_update},
    "causal_conv1d.causal_conv1d_varlen": {"causal_conv1d_varlen_states": causal_conv1d_varlen_states},
}
