"""Gated DeltaNet kernels in plain torch: what megatron-core's ``GatedDeltaNet`` imports from ``fla``
(flash-linear-attention, Triton/CUDA-only), for the CPU runtime and GPUs without it.

Served by ``no_te`` (``PROVIDES_FLA``) only to the megatron module that imports them
(``megatron.core.ssm.gated_delta_net.common``), and only when ``fla`` is not installed. Each function follows
the signature and ``[batch, time, heads, dim]`` layout of the fla 0.4 function it replaces.

The gated delta rule (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks"), per head, with a state
``S`` of ``[dk, dv]``, for each token t::

    S = exp(g_t) * S                              # g_t <= 0: the gate (log decay)
    S = S + beta_t * k_t (v_t - S^T k_t)^T        # the delta rule: write v_t at k_t, in place of what was there
    o_t = scale * S^T q_t

``chunk_gated_delta_rule`` computes it in chunks of 64 tokens as fla's ``chunk`` kernels do (the WY
representation): inside a chunk, attention-like products and one unit-lower-triangular solve; between chunks,
a recurrence on ``S``. Packed sequences (``cu_seqlens``, batch 1) are laid out with each sequence padded to a
whole number of chunks, so every chunk holds one sequence and the state restarts (from zero, or that
sequence's ``initial_state``) at each sequence's first chunk: nothing of one sample reaches the next. Padding
tokens have ``k = v = beta = 0`` and ``g = 0``, which leaves the state and every real output unchanged.
The gradient is torch's autograd of the same operations. (megatron-core's own torch path,
``torch_chunk_gated_delta_rule`` for its deterministic mode, takes no ``cu_seqlens``, so it cannot train packed
batches, and inverts each chunk's triangular matrix in a 64-step Python loop.)
"""

from __future__ import annotations

import torch

from bridge_sft.runtime import mamba

FLA_VERSION = "0.4.0"  # the fla API these stand-ins follow
CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fla.modules.l2norm.l2norm``: ``x / sqrt(sum(x ** 2) + eps)`` over the last dimension, computed in fp32."""
    y = x.float() * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, activation: str | None = None,
                  cu_seqlens: torch.Tensor | None = None, **unused) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla.modules.convolution.causal_conv1d``: x ``[b, t, d]``, weight ``[d, w]``, bias ``[d]``; the causal
    depthwise convolution of each sequence (``cu_seqlens``: packed, batch 1), then ``activation``, then
    ``+ residual``. Returns ``(y [b, t, d], final_state [n, d, w] or None)``.
    """
    if initial_state is not None:
        raise NotImplementedError("causal_conv1d: bridge_sft's plain-torch stand-in for fla takes no "
                                  "initial_state (training starts every sequence from zero)")
    _bounds(x, cu_seqlens)  # checks cu_seqlens covers x's tokens, as chunk_gated_delta_rule does
    y = mamba.causal_conv1d(x.transpose(1, 2), weight, bias, cu_seqlens=cu_seqlens,
                            activation=activation).transpose(1, 2)
    if residual is not None:
        y = y + residual
    final = None
    if output_final_state:  # each sequence's last w inputs; an unpacked batch is b sequences of t tokens
        b, t = x.shape[:2]
        bounds = cu_seqlens if cu_seqlens is not None else torch.arange(0, (b + 1) * t, t)
        final = mamba.causal_conv1d_varlen_states(x.reshape(b * t, -1), bounds, weight.shape[-1])
    return y, final


def _bounds(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """``(start, end)`` of each sequence along x's time axis (dim 1): the rows of an unpacked batch, or the
    ``cu_seqlens`` sequences of a packed one (batch 1, ``cu_seqlens[-1]`` = the number of tokens)."""
    b, t = x.shape[:2]
    if cu_seqlens is None:
        return [(0, t)] * b
    if b != 1:
        raise ValueError(f"cu_seqlens needs a batch of 1 (packed THD), got batch {b}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != t or any(e < s for s, e in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the {t} tokens packed, got {cu}")
    return list(zip(cu[:-1], cu[1:]))


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           cu_seqlens: torch.Tensor | None = None, chunk_size: int = CHUNK_SIZE,
                           **unused) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla.ops.gated_delta_rule.chunk_gated_delta_rule``.

    q, k ``[b, t, h, dk]``; v ``[b, t, h, dv]``; g (log decay, fp32 or not) and beta ``[b, t, h]``;
    ``scale`` defaults to ``dk ** -0.5``; initial_state ``[n, h, dk, dv]`` (n: the batch, or the number of
    ``cu_seqlens`` sequences). Computed in fp32. Returns ``(o [b, t, h, dv] in v's dtype,
    final_state [n, h, dk, dv] fp32 or None)``.
    """
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = _bounds(q, cu_seqlens)
    packed = cu_seqlens is not None
    # Each sequence padded to whole chunks and laid end to end (one row when packed, one row per sample if not).
    lengths = [end - start for start, end in bounds]
    padded = [-(-n // chunk_size) * chunk_size for n in lengths]
    row_len = sum(padded) if packed else padded[0]
    if packed:
        offsets = [sum(padded[:i]) for i in range(len(bounds))]
        slots = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths)]).to(q.device)
        starts = {o // chunk_size: i for i, (o, n) in enumerate(zip(offsets, lengths)) if n}
    else:
        slots = torch.arange(lengths[0], device=q.device)
        starts = {0: slice(None)}

    unpadded = row_len == q.shape[1]  # then slots are 0, 1, ..., t - 1

    def lay_out(x: torch.Tensor) -> torch.Tensor:  # [b, t, h, ...] -> [b, h, row_len, ...] fp32, contiguous
        x = x.float().transpose(1, 2)
        if unpadded:
            return x.contiguous()
        return x.new_zeros(x.shape[:2] + (row_len,) + x.shape[3:]).index_copy_(2, slots, x)  # one pass over x

    o, finals = _chunk_scan(lay_out(q) * scale, lay_out(k), lay_out(v), lay_out(g), lay_out(beta),
                            chunk_size, starts, initial_state)
    o = o.transpose(1, 2)
    o = (o.contiguous() if unpadded else o.index_select(1, slots)).to(v.dtype)
    if not output_final_state:
        return o, None
    if not packed:
        return o, finals[0][1]
    finals = dict(finals)  # sequence -> its last state; an empty sequence keeps its initial state
    empty = initial_state.float() if initial_state is not None else q.new_zeros(
        len(bounds), k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)
    return o, torch.cat([finals[i] if i in finals else empty[i:i + 1] for i in range(len(bounds))])


def _chunk_scan(q, k, v, g, beta, chunk: int, starts: dict, initial_state):
    """The chunked gated delta rule on rows laid out by ``chunk_gated_delta_rule``: q, k ``[b, h, T, dk]``,
    v ``[b, h, T, dv]``, g, beta ``[b, h, T]``, fp32, q already scaled, T a multiple of ``chunk``. ``starts``
    maps the chunks where a sequence begins to the rows of ``initial_state`` it starts from. Returns
    ``(o [b, h, T, dv], [(starts' value, the state at the end of that sequence [rows, h, dk, dv])] in order)``."""
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    n = length // chunk
    q, k, v = (x.reshape(b, h, n, chunk, -1) for x in (q, k, v))
    g = g.reshape(b, h, n, chunk).cumsum(-1)  # log decay from the chunk's start to each token (inclusive)
    beta = beta.reshape(b, h, n, chunk)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # [.., i, j]: j <= i
    k_beta = k * beta.unsqueeze(-1)
    # WY representation: T = (I + strictly_lower(beta_i k_i.k_j decay_ij))^-1 turns the chunk's sequential
    # delta-rule writes into two matrix products, u (values to write) and w (how much the old state is read).
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    a = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    t_inv = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
    u = t_inv @ (v * beta.unsqueeze(-1))
    w = t_inv @ (k_beta * g.exp().unsqueeze(-1))
    intra = (q @ k.transpose(-1, -2)) * decay
    q_from_start = q * g.exp().unsqueeze(-1)
    k_to_end = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]
    state, rows, outs, finals = None, None, [], []
    for c in range(n):
        if c in starts:
            if state is not None:
                finals.append((rows, state))
            rows = starts[c]
            state = (initial_state[rows].float() if initial_state is not None
                     else q.new_zeros(b, h, dk, dv))
            if state.dim() == 3:
                state = state.unsqueeze(0)
        v_new = u[:, :, c] - w[:, :, c] @ state
        outs.append(q_from_start[:, :, c] @ state + intra[:, :, c] @ v_new)
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ v_new
    finals.append((rows, state))
    return torch.stack(outs, dim=2).reshape(b, h, length, dv), finals


# What no_te serves as `fla` (module name -> the names it provides).
PROVIDES_FLA = {
    "fla": {"__version__": FLA_VERSION},
    "fla.modules": {},
    "fla.modules.convolution": {"causal_conv1d": causal_conv1d},
    "fla.modules.l2norm": {"l2norm": l2norm},
    "fla.ops": {},
    "fla.ops.gated_delta_rule": {"chunk_gated_delta_rule": chunk_gated_delta_rule},
}
