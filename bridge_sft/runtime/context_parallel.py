"""Context parallelism for the plain-torch attention (``te_torch.DotProductAttention``) without TE.

Megatron-core splits every sequence over the ``C`` ranks of its context-parallel (CP)
group before the model sees it, load-balanced for causal attention: the sequence is cut
into ``2C`` equal chunks and rank ``r`` holds chunks ``r`` and ``2C-1-r``, in that order
(``sbhd``: the whole row, ``get_batch_on_this_cp_rank``; packed ``thd``: each sequence of
the pack on its own, by Transformer Engine's ``thd_get_partitioned_indices``, each padded
sequence length a multiple of ``2C``). Everything but attention is per token; attention
needs the keys and values of the whole sequence.

Here every rank all-gathers K and V over the CP group (an autograd all-gather whose
backward reduce-scatters the K/V gradients back to their owners), puts
them back in sequence order, and attends its two query chunks to the keys they can see,
with the query chunk's true offset in the sequence: causal, sliding windows and attention
sinks give exactly the attention of the unsplit sequence (the kernel is the caller's
``attend``, the same one the CP=1 path uses).

Cost: each rank holds the full K and V of its micro-batch, kept for the backward:
``2 x seq x kv_heads/TP x head_dim x bytes`` per layer (Qwen3-8B, 32k, bf16, TP=1:
128 MiB a layer, 4.5 GiB over 36 layers without recomputation), where TE's ring (p2p)
holds two chunks at a time. Acceptable for a path that exists to run CP on a CPU or a
GPU without TE (tests, small models); long-context training at scale belongs on TE. A query chunk
that does not start at its sequence's first key needs a mask (torch's flash kernel aligns causal
masks top-left), and torch's CPU SDPA with a mask keeps the attention probabilities for the
backward: on the CPU, CP=2 took 1.9x the 1-process peak memory per rank at seq 8192 on the tiny
Llama (benchmarks/context_parallel.py), where the 1-process causal kernel keeps none.
"""

from __future__ import annotations

from typing import Callable

import torch


def thd_get_partitioned_indices(cu_seqlens: torch.Tensor, total_tokens: int, world_size: int,
                                rank: int) -> torch.Tensor:
    """``transformer_engine_torch.thd_get_partitioned_indices`` in torch: the positions of a packed
    ``[total_tokens]`` stream that CP rank ``rank`` of ``world_size`` holds, int32 ``[total_tokens / world_size]``.

    ``cu_seqlens`` (int32 ``[n + 1]``) are the sequence boundaries; every sequence length must be a
    multiple of ``2 x world_size``. Rank ``r`` gets, sequence after sequence, chunks ``r`` and
    ``2 x world_size - 1 - r`` of that sequence's ``2 x world_size`` chunks. Tokens after
    ``cu_seqlens[-1]`` are mapped with TE's kernel's formula (as if they continued the last sequence).
    """
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(torch.int64).cpu()
    if cu.numel() < 2:
        raise ValueError("thd_get_partitioned_indices: cu_seqlens needs at least two boundaries")
    if total_tokens % world_size or bool((cu % (2 * world_size)).any()):
        raise ValueError(
            f"context parallelism over {world_size} ranks needs every packed sequence (and the pack) padded to a "
            f"multiple of {2 * world_size} tokens, got boundaries {cu.tolist()} in {total_tokens} tokens: pack with "
            f"pad_seq_to_mult={2 * world_size} (bridge_sft.recipes sets it from context_parallel)"
        )
    local = cu // world_size  # the boundaries on one rank
    token = torch.arange(total_tokens // world_size, dtype=torch.int64)
    # TE's binary search: the last sequence starting at or before the token (never past the last one).
    seq = torch.searchsorted(local[1:-1], token, right=True)
    shard = local[seq + 1] - local[seq]  # this sequence's tokens on one rank: two chunks
    index = token - local[seq]
    offset = torch.where(index < shard // 2, rank, 2 * (world_size - 1) - rank)
    index = index + local[seq] * world_size + shard // 2 * offset
    return index.to(torch.int32).to(torch.as_tensor(cu_seqlens).device)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 (rank order); backward: reduce-scatter (sum) the gradient back.

    megatron-core's ``gather_from_sequence_parallel_region`` does the same, but its backward allocates
    on ``torch.cuda.current_device()``, which the CPU runtime cannot redirect there: autograd runs the
    backward outside the torch-function mode that maps CUDA devices to the CPU. Buffers here follow
    the input's device.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = torch.distributed.get_world_size(group)
        out = x.new_empty(size * x.size(0), *x.shape[1:])
        torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = torch.distributed.get_world_size(ctx.group)
        out = grad.new_empty(grad.size(0) // size, *grad.shape[1:])
        torch.distributed.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` along dim 0 over ``group`` (rank order); the backward reduce-scatters the gradient."""
    return _GatherSequence.apply(x, group)


def _natural_order(bounds: list[int], world_size: int) -> torch.Tensor:
    """For each position of the unsplit stream (sequences ``bounds``), its row in the rank-ordered gather."""
    total = bounds[-1]
    per_rank = total // world_size
    order = torch.empty(total, dtype=torch.int64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * world_size)
        if chunk == 0:
            continue
        for i in range(2 * world_size):
            owner, half = (i, 0) if i < world_size else (2 * world_size - 1 - i, 1)
            src = owner * per_rank + start // world_size + half * chunk
            order[start + i * chunk: start + (i + 1) * chunk] = torch.arange(src, src + chunk)
    return order


Attend = Callable[..., torch.Tensor]  # (q [b,h,sq,d], k, v [b,g,sk,d], causal, window, *, q_offset) -> [b,h,sq,dv]


def _attend_chunks(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: tuple[int, int],
                   causal: bool, window) -> torch.Tensor:
    """One rank's two query chunks of one sequence against its full keys, ``[b, *, s, d]`` layout.

    ``q`` holds the chunks starting at ``starts`` (sequence positions) back to back; ``k``/``v`` the whole
    sequence. Each chunk sees only the keys its mask can reach (causal: up to its end; a window: from
    ``start - left``), with its true position offset.
    """
    chunk = q.size(2) // 2
    left = window[0] if window is not None else -1
    out = []
    for i, start in enumerate(starts):
        key_end = start + chunk if causal else k.size(2)
        key_start = max(0, start - left) if left >= 0 else 0
        out.append(attend(q[:, :, i * chunk:(i + 1) * chunk], k[:, :, key_start:key_end], v[:, :, key_start:key_end],
                          causal, window, q_offset=start - key_start))
    return torch.cat(out, dim=2)


def attention(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv_format: str, group,
              causal: bool, window, bias=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """CP attention of this rank's shards: ``attention_sbhd`` or ``attention_thd`` (``cu_seqlens``: the unsplit
    stream's padded sequence boundaries)."""
    if bias is not None:
        raise NotImplementedError("an attention bias with context parallelism needs Transformer Engine's attention")
    if qkv_format == "thd":
        return attention_thd(attend, q, k, v, cu_seqlens.reshape(-1).tolist(), group, causal, window)
    if qkv_format != "sbhd":
        raise NotImplementedError(f"qkv_format {qkv_format!r} with context parallelism")
    return attention_sbhd(attend, q, k, v, group, causal, window)


def attention_sbhd(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, causal: bool,
                   window) -> torch.Tensor:
    """CP attention of ``[s/C, b, h, d]`` query, ``[s/C, b, g, d]`` key/value shards -> ``[s/C, b, h * d_v]``."""
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    local = q.size(0)
    if local % 2:
        raise ValueError(f"context parallelism: a rank's sequence shard ({local} tokens) must be two equal chunks")
    order = _natural_order([0, local * size], size).to(q.device)
    k_full, v_full = (gather_sequence(x, group).index_select(0, order) for x in (k, v))
    chunk = local // 2
    starts = (rank * chunk, (2 * size - 1 - rank) * chunk)
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k_full, v_full))  # [b, h, s, d]
    out = _attend_chunks(attend, qb, kb, vb, starts, causal, window)
    return out.permute(2, 0, 1, 3).reshape(local, q.size(1), -1)


def attention_thd(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], group,
                  causal: bool, window) -> torch.Tensor:
    """CP attention of a packed ``[t/C, h, d]`` shard (sequences at ``bounds`` of the unsplit ``t``-token stream,
    split per sequence by ``thd_get_partitioned_indices``) -> ``[t/C, h * d_v]``."""
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    total = q.size(0) * size
    if bounds[-1] != total:
        raise ValueError(f"context parallelism: the packed sequences end at token {bounds[-1]} of {total}; "
                         "the padded boundaries (cu_seqlens_q_padded) must cover the whole pack")
    thd_get_partitioned_indices(torch.tensor(bounds), total, size, rank)  # the same checks as the split
    order = _natural_order(bounds, size).to(q.device)
    k_full, v_full = (gather_sequence(x, group).index_select(0, order) for x in (k, v))
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        chunk = (end - start) // (2 * size)
        lo, hi = start // size, end // size  # this sequence's rows in the local shard
        qb = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, h, 2 * chunk, d]
        kb, vb = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (k_full, v_full))
        starts = (rank * chunk, (2 * size - 1 - rank) * chunk)
        out.append(_attend_chunks(attend, qb, kb, vb, starts, causal, window)[0].transpose(0, 1))
    result = torch.cat(out, dim=0)
    return result.reshape(result.size(0), -1)
