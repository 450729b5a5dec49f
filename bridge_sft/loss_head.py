"""A memory-efficient loss head: output projection + vocab-parallel cross-entropy in chunks of tokens.

Given labels, megatron-core's ``GPTModel`` computes the logits of every token,
``hidden [s, b, h] @ W^T -> [s, b, V/tp]``, and ``vocab_parallel_cross_entropy``
turns them into fp32 softmax probabilities that stay alive until the backward
pass. With today's vocabularies that is the largest activation of a small or
mid-size model (Gemma 3, 262,144 ids, seq 8192: 8.6 GB of fp32 per micro-batch).

``fused_loss`` computes the same per-token losses without ever holding them: the
tokens are taken in chunks, and for each chunk it computes the chunk's logits
against the local vocabulary shard, the row max (all-reduced MAX over the TP
group), the target logit and the sum of exponentials (all-reduced SUM), exactly
the operations of megatron-core's ``_VocabParallelCrossEntropy.forward``, and
keeps only the loss, max and sum-exp per token (fp32). The backward pass
recomputes the logits tile by tile and forms ``(softmax - one_hot) * grad``
(megatron-core's backward) from the saved max and sum-exp; its tiles are slices of
the vocabulary shard over all tokens at once, of the same size as a forward chunk,
so that each row of the output-weight gradient is computed by one GEMM and written
once (token chunks would re-read and re-write the whole ``[V, h]`` gradient per
chunk), while the hidden-state gradient ``[tokens, h]`` accumulates in fp32. No
logits outlive their tile. Rows whose loss gradient is exactly zero (tokens outside
``loss_mask``: Bridge's ``masked_next_token_loss`` multiplies them by 0) get an
exactly zero gradient in megatron-core too, so the backward skips them.

Peak memory of the head: one reused tile (``LOGITS_CHUNK_BYTES`` of fp32, plus one in
the model dtype for bf16) and the weight gradient, instead of all logits. Cost: one
more ``[tokens, h] x [h, V]`` GEMM (the recompute) over the supervised tokens.
Precision: the logits GEMMs run in the model dtype and everything after them in fp32,
as in megatron-core; the weight gradient is one GEMM per slice, as megatron-core's;
the hidden-state gradient sums per-slice products in fp32 (``_mm_fp32``).

The hook into megatron-core is ONE documented place: ``GPTModel.forward``'s
``output_processor`` argument (megatron-core 0.19: "custom postprocess hook that
receives decoder hidden states and output-layer helpers, then returns the model
output"). It runs after the decoder (and MTP) on the last pipeline stage only,
instead of ``output_layer`` + ``compute_language_model_loss``. The forward step
(``bridge_sft.step``) passes ``output_processor_for(model)``; nothing global is
patched, and the output layer's class is not touched. The processor reads the
output layer's own settings (TP group, sequence parallel, gradient all-reduce,
gradient-accumulation fusion) and reproduces what ``ColumnParallelLinear.forward``
does with them:

- sequence parallel: the hidden states are all-gathered along the sequence
  (backward: reduce-scatter), as the output layer's linear does;
- TP without sequence parallel: the hidden states' gradient is all-reduced over
  the TP group (the linear's ``allreduce_dgrad``);
- ``gradient_accumulation_fusion`` with a ``main_grad`` buffer (GPUs with TE or
  apex): the weight gradient is accumulated into ``weight.main_grad`` and a dummy
  gradient returned, Megatron DDP's ``grad_added_to_main_grad`` protocol;
- tied embeddings: the weight is the embedding's (``output_weight``), whose
  gradient accumulates with the embedding's own as in megatron-core.

Where the head cannot reproduce megatron-core's output exactly it is not used, and
one log line per model says why (``unsupported_reason``): multi-token prediction
heads, logit soft-capping (Gemma 2/4 replace the output layer's forward), MuP
output scaling, an output layer that is not a plain ``ColumnParallelLinear`` (a
LoRA adapter on it, TE's MXFP8 LM head, ...), an output bias, deferred embedding
weight-gradients, gathered (non-vocab-parallel) output, or a model whose forward
has no ``output_processor``. The combined-1F1B schedule plan (MoE expert-parallel
overlap) is not covered either (``log_not_in_schedule_plan``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any, Callable

import torch

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.utils import get_model_config, get_pg_rank, get_pg_size, unwrap_model

logger = logging.getLogger(__name__)

# The recipes' default for ``fused_loss_head`` (``bridge_sft.recipes.sft``); also what the forward step
# assumes when a config does not carry the attribute (a ConfigContainer built outside our recipes).
DEFAULT = True
# fp32 logits per tile. 256 MiB: chunks of 384 tokens at vocab 151,936, 256 at 262,144, 512 at 128,256
# (rounded down to a multiple of 64, at least 64). Smaller tiles make slower GEMMs (on 2 CPU cores, 192-token
# chunks ran at 70% of the full GEMM's FLOP/s, 384-token ones at 87%), larger ones hold more memory; either
# way small next to the weight gradient (vocab 151,936 x hidden 1024, fp32: 594 MiB).
LOGITS_CHUNK_BYTES = 256 * 2**20


def chunk_tokens_for(vocab_local: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's fp32 logits ``[tokens, vocab_local]`` take about ``chunk_bytes``."""
    return max(64, chunk_bytes // (4 * vocab_local) // 64 * 64)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """losses[i] = logsumexp(hidden[i] @ W^T) - (hidden[i] @ W^T)[target[i]], vocab sharded over ``tp_group``.

    ``hidden`` ``[n, h]`` (model dtype), ``weight`` ``[V/tp, h]``, ``target`` ``[n]`` (int64, global
    ids) -> ``[n]`` fp32. Forward in chunks of ``chunk_tokens`` tokens; only the per-token max and
    sum-exp are kept for the backward pass, which works in vocabulary slices of the same tile size.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, tp_group, chunk_tokens, main_grad):
        world = get_pg_size(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            weight.size(0), get_pg_rank(tp_group), world
        )
        n = hidden.size(0)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_max = torch.empty_like(losses)
        sum_exp = torch.empty_like(losses)
        tile = _Tile(min(n, chunk_tokens) * weight.size(0), weight)
        for lo in range(0, n, chunk_tokens):
            hi = min(n, lo + chunk_tokens)
            # The operations (and their order) of megatron-core's _VocabParallelCrossEntropy.forward.
            logits = tile.logits(hidden[lo:hi], weight)
            chunk_max = torch.amax(logits, dim=-1)  # = logits.max(dim=-1)[0], without the indices
            if world > 1:
                torch.distributed.all_reduce(chunk_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            logits -= chunk_max.unsqueeze(-1)
            target_local, outside = _local_target(target[lo:hi], vocab_start, vocab_end)
            predicted = logits.gather(1, target_local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
            torch.exp(logits, out=logits)
            reduced = torch.stack([predicted, logits.sum(dim=-1)])
            if world > 1:  # one collective for both SUMs
                torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=tp_group)
            predicted, chunk_sum_exp = reduced[0], reduced[1]
            losses[lo:hi] = torch.log(chunk_sum_exp) - predicted
            row_max[lo:hi] = chunk_max
            sum_exp[lo:hi] = chunk_sum_exp
        ctx.save_for_backward(hidden, weight, target, row_max, sum_exp)
        ctx.vocab_range = (vocab_start, vocab_end)
        ctx.chunk_elements = chunk_tokens * weight.size(0)  # the backward's tiles are as large
        ctx.main_grad = main_grad  # not saved for backward: Megatron swaps main_grad buffers in place
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, row_max, sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        main_grad = ctx.main_grad if need_weight else None

        # Rows with a zero loss gradient (outside loss_mask) have an exactly zero gradient: skip them.
        rows = torch.nonzero(grad_losses).squeeze(-1)
        if rows.numel() == hidden.size(0):
            rows = None

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        h = pick(hidden)
        m = h.size(0)
        grad_rows = pick(grad_losses).float()
        shift = pick(row_max).unsqueeze(-1)
        scale = (grad_rows / pick(sum_exp)).unsqueeze(-1)
        target_local, outside = _local_target(pick(target), *ctx.vocab_range)
        arange = torch.arange(m, device=h.device)
        grad_h = torch.zeros(m, h.size(1), dtype=torch.float32, device=h.device) if need_hidden else None
        grad_weight = None
        if need_weight and main_grad is None:
            grad_weight = torch.empty_like(weight) if m else torch.zeros_like(weight)

        # Slices of the local vocabulary, all (gradient-carrying) tokens at once: each row of the weight
        # gradient is written once (no [V, h] accumulator traffic per chunk); the hidden-state gradient
        # [tokens, h] accumulates in fp32.
        width = _slice_columns(m, weight.size(0), ctx.chunk_elements)
        tile = _Tile(m * width, weight)
        for v0 in range(0, weight.size(0) if m else 0, width):
            w = weight[v0:v0 + width]
            # megatron-core's backward, (softmax - one_hot(target)) * grad, from the saved max and sum-exp,
            # as exp(logits - max) * (grad / sum_exp) - one_hot * grad (one pass fewer over the tile); the
            # one-hot where the target is in this slice of this rank's shard; then cast to the model dtype
            # as the autograd of megatron-core's ``logits.float()`` does.
            g = tile.logits(h, w)
            g -= shift
            torch.exp(g, out=g)
            g *= scale
            column = target_local - v0
            here = ~outside & (column >= 0) & (column < w.size(0))
            g[arange, column.clamp(0, w.size(0) - 1)] -= grad_rows * here
            g = tile.in_weight_dtype(g)
            if need_hidden:
                grad_h += _mm_fp32(g, w)
            if grad_weight is not None:
                torch.matmul(g.t(), h, out=grad_weight[v0:v0 + width])
            elif main_grad is not None:
                main_grad[v0:v0 + width] += _mm_fp32(g.t(), h)

        grad_hidden = None
        if need_hidden:
            if rows is None:
                grad_hidden = grad_h.to(hidden.dtype)
            else:
                grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_h.to(hidden.dtype))
        if main_grad is not None:
            grad_weight = _main_grad_protocol(weight, hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class _Tile:
    """One reused fp32 buffer for a tile of logits (and one in the weight's dtype, if that is lower): on the
    CPU a fresh allocation of this size is a fresh mmap whose pages fault in every time."""

    def __init__(self, elements: int, weight: torch.Tensor):
        self.fp32 = torch.empty(elements, dtype=torch.float32, device=weight.device)
        self.low = None if weight.dtype == torch.float32 else torch.empty_like(self.fp32, dtype=weight.dtype)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``(hidden @ weight^T).float()``, the GEMM in the weight's dtype (as megatron-core's output layer)."""
        shape = (hidden.size(0), weight.size(0))
        out = self.fp32[: shape[0] * shape[1]].view(shape)
        if self.low is None:
            return torch.matmul(hidden, weight.t(), out=out)
        return out.copy_(torch.matmul(hidden, weight.t(), out=self.low[: out.numel()].view(shape)))

    def in_weight_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return grad_logits
        return self.low[: grad_logits.numel()].view(grad_logits.shape).copy_(grad_logits)


def _slice_columns(rows: int, vocab_local: int, elements: int) -> int:
    """Columns per backward slice so that a ``[rows, columns]`` tile has about ``elements`` elements."""
    return min(vocab_local, max(64, elements // max(rows, 1) // 64 * 64))


_MM_OUT_DTYPE: bool | None = None  # torch.mm(..., out_dtype=) works on this device (CUDA, recent torch)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, for partial products that are summed afterwards (a
    low-precision result would be rounded once per slice). fp32 inputs: a plain GEMM; bf16/fp16 on CUDA:
    ``torch.mm(out_dtype=float32)`` where torch has it (else the low-precision GEMM, upcast); on the CPU,
    where low-precision GEMMs are no faster, the GEMM of the upcast inputs."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type != "cuda":
        return torch.mm(a.float(), b.float())
    if _MM_OUT_DTYPE is not False:
        try:
            result = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return result
        except (TypeError, RuntimeError) as error:
            _MM_OUT_DTYPE = False
            logger.info("bridge_sft: torch.mm(out_dtype=float32) unavailable (%s): low-precision partial "
                        "products in the fused loss head's backward", error)
    return torch.mm(a, b).float()


def _local_target(target: torch.Tensor, vocab_start: int, vocab_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids in this rank's vocabulary shard (0 where outside) and the mask of outside targets."""
    outside = (target < vocab_start) | (target >= vocab_end)
    return (target - vocab_start).masked_fill(outside, 0), outside


def _main_grad_protocol(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """What megatron-core's linear returns as weight gradient after accumulating into ``main_grad``
    (``LinearWithGradAccumulationAndAsyncCommunication.backward``): a dummy gradient flagged
    ``grad_added_to_main_grad`` so that Megatron DDP's hook does not add it again; None without DDP."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    weight.grad_added_to_main_grad = True
    return make(weight.main_grad.shape, dtype=dtype, device=weight.device, requires_grad=False)


def fused_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token losses ``[b, s]`` (fp32) of ``output_layer`` on ``hidden_states`` ``[s, b, h]``.

    Equal to megatron-core's ``compute_language_model_loss(labels, output_layer(hidden_states)[0])``
    (``labels`` ``[b, s]``, global vocabulary ids) without holding the logits. ``output_layer`` is the
    model's ``ColumnParallelLinear`` (vocabulary sharded over its TP group); ``output_weight`` the tied
    embedding weight, if any. ``chunk_tokens``: tokens per chunk (default ``chunk_tokens_for``).
    """
    weight = output_layer.weight if output_weight is None else output_weight
    tp_group = output_layer.tp_group
    # The input side of ColumnParallelLinear.forward with these settings.
    if output_layer.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, True, group=tp_group)
    elif output_layer.allreduce_dgrad:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states [s={s}, b={b}]")
    main_grad = None
    if output_layer.gradient_accumulation_fusion and weight.requires_grad and hasattr(weight, "main_grad"):
        main_grad = weight.main_grad
    losses = _ChunkedVocabParallelCrossEntropy.apply(
        hidden_states.reshape(s * b, h),
        weight,
        labels.transpose(0, 1).reshape(s * b),
        tp_group,
        chunk_tokens or chunk_tokens_for(weight.size(0)),
        main_grad,
    )
    return losses.view(s, b).transpose(0, 1).contiguous()  # [s b] => [b s], like compute_language_model_loss


def fused_output_processor(
    *,
    hidden_states,
    output_layer,
    output_weight,
    labels,
    runtime_gather_output=None,
    compute_language_model_loss=None,
    scale_logits=None,
    chunk_tokens: int | None = None,
    **_unused,
):
    """``GPTModel``'s ``output_processor``: per-token losses from ``fused_loss`` when labels are given;
    without labels (or with logits gathered over TP) the model's own path, unchanged."""
    gather = output_layer.gather_output if runtime_gather_output is None else runtime_gather_output
    if labels is None or (gather and output_layer.tp_group is not None and output_layer.tp_group.size() > 1):
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        logits = scale_logits(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return compute_language_model_loss(labels, logits)
    return fused_loss(hidden_states, labels, output_layer, output_weight, chunk_tokens)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fused head cannot replace this model's loss path exactly, or None where it can.

    ``model``: a model chunk as the forward step gets it (DDP / Float16Module wrappers allowed).
    """
    gpt = unwrap_model(model)
    if not isinstance(gpt, GPTModel):
        return f"{type(gpt).__name__} is not a megatron-core GPTModel"
    for method in ("forward", "_postprocess"):  # a subclass may override either without the hook
        if "output_processor" not in inspect.signature(getattr(type(gpt), method)).parameters:
            return f"{type(gpt).__name__}.{method} takes no output_processor"
    config = gpt.config
    if getattr(config, "mtp_num_layers", None):
        return f"multi-token prediction (mtp_num_layers={config.mtp_num_layers}) computes its own logits"
    if getattr(config, "final_logit_softcapping", None):
        return f"logit soft-capping (final_logit_softcapping={config.final_logit_softcapping})"
    if getattr(config, "use_mup", False) and getattr(config, "mup_output_mult", 1.0) != 1.0:
        return f"MuP output scaling (mup_output_mult={config.mup_output_mult})"
    if getattr(config, "defer_embedding_wgrad_compute", False):
        return "defer_embedding_wgrad_compute=True (deferred output-layer weight gradients)"
    if not gpt.post_process:
        return None  # no output layer on this pipeline stage: nothing to replace
    layer = gpt.output_layer
    if type(layer).forward is not ColumnParallelLinear.forward:
        owner = next((c for c in type(layer).__mro__ if "forward" in vars(c)), type(layer))
        return (f"the output layer's forward is {owner.__qualname__}.forward, not ColumnParallelLinear's: it may "
                "change the logits (soft-capping, a LoRA adapter, an MXFP8 LM head ...)")
    if layer.bias is not None:
        return "the output layer has a bias"
    if getattr(layer, "gtp_remat_size", 1) > 1:
        return "the output layer's weight is sharded for GTP re-materialisation"
    if layer.gather_output and layer.tp_group is not None and layer.tp_group.size() > 1:
        return "the model gathers its logits over TP (parallel_output=False)"
    return None


# Per model (weak keys: an id() could be reused by a later model): why the head does not apply, and which
# lines were logged.
_REASONS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()
_LOGGED: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def _log_once(model: torch.nn.Module, key: str, level: int, message: str) -> None:
    logged = _LOGGED.setdefault(model, set())
    if key not in logged:
        logged.add(key)
        logger.log(level, message)


def enabled(model_config: Any) -> bool:
    """The ``fused_loss_head`` setting of a model config (the provider; ``DEFAULT`` when it has none)."""
    return bool(getattr(model_config, "fused_loss_head", DEFAULT))


def output_processor_for(model: torch.nn.Module, chunk_tokens: int | None = None) -> Callable | None:
    """The ``output_processor`` to pass to ``model(...)``: the fused head, or None for megatron-core's path.

    None when the model's config has ``fused_loss_head=False``, or when ``unsupported_reason`` finds one
    (then logged once per model, as a warning: the run continues on megatron-core's loss path).
    """
    if not enabled(get_model_config(model)):
        _log_once(model, "off", logging.INFO, "bridge_sft: fused loss head off (fused_loss_head=false): "
                  "megatron-core's output layer + vocab-parallel cross-entropy")
        return None
    if model not in _REASONS:
        _REASONS[model] = unsupported_reason(model)
    reason = _REASONS[model]
    if reason is not None:
        _log_once(model, "fallback", logging.WARNING,
                  f"bridge_sft: fused loss head not used for this model: {reason}; "
                  "using megatron-core's output layer + vocab-parallel cross-entropy (full logits)")
        return None
    chunks = f"{chunk_tokens} tokens" if chunk_tokens else f"~{LOGITS_CHUNK_BYTES >> 20} MiB of fp32 logits"
    _log_once(model, "on", logging.INFO, "bridge_sft: fused loss head on: output projection + cross-entropy in "
              f"chunks of {chunks}, logits recomputed in backward")
    if chunk_tokens is None:
        return fused_output_processor
    return functools.partial(fused_output_processor, chunk_tokens=chunk_tokens)


def log_not_in_schedule_plan(model: torch.nn.Module) -> None:
    """One log line when the combined-1F1B schedule plan (MoE communication overlap) runs instead."""
    if enabled(get_model_config(model)):
        _log_once(model, "plan", logging.WARNING,
                  "bridge_sft: fused loss head not used with the combined-1F1B schedule plan "
                  "(overlap_moe_expert_parallel_comm): megatron-core's loss path (full logits)")
