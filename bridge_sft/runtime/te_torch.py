"""Transformer Engine's layers in plain torch: megatron-core's TE layer spec without TE.

Megatron-Bridge maps HF weights onto the module tree of megatron-core's
Transformer-Engine layer spec, and several families (Gemma 2/3, gpt-oss, OLMoE,
DeepSeek/GLM) build their layers from TE classes directly. This module implements
the few ``transformer_engine.pytorch`` classes those wrappers subclass, with TE's
constructor arguments, parameter names and shapes and TE's tensor-parallel
communication, in plain torch:

- ``Linear`` / ``LayerNormLinear`` (``parallel_mode`` ``"column"``/``"row"``/None,
  sequence parallel, ``return_bias``), ``LayerNorm`` / ``RMSNorm``
  (``zero_centered_gamma``: ``x * (1 + w)``);
- ``DotProductAttention``: ``sbhd`` and packed ``thd`` (``cu_seqlens``), causal,
  sliding windows (``window_size=(left, right)``), grouped-query attention,
  attention sinks (``softmax_type`` ``"off-by-one"``/``"learnable"``, the
  ``softmax_offset`` parameter), dropout on the model-parallel RNG, context parallelism
  (``cp_group``: exact attention over megatron-core's load-balanced sequence shards,
  ``bridge_sft.runtime.context_parallel``);
- ``transformer_engine_torch.thd_get_partitioned_indices`` (megatron-core's THD
  context-parallel split);
- ``_SplitAlongDim`` and the fp8 entry points megatron imports unconditionally
  (fp8 itself is not available: ``FP8GlobalStateManager.is_fp8_enabled()`` is False).

It is served by ``bridge_sft.runtime.no_te`` as ``transformer_engine`` to a fixed
list of megatron modules only (never through ``sys.modules``): the CPU, and a GPU
without TE, then build the SAME module tree as a TE GPU. Everything else TE offers
(fused kernels, fp8, grouped GEMM, userbuffers, ...) is absent: an import of it
raises ImportError, so megatron takes its non-TE fallbacks, and an attribute of it
is a placeholder class that cannot be instantiated.

Numerics follow the HF reference implementations (norms in fp32, softmax in fp32);
the kernels are torch's (``scaled_dot_product_attention`` where it applies).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from bridge_sft.runtime import context_parallel

__version__ = "2.9.0"  # the TE API these classes follow (megatron-core selects its code paths by version)


# ---------------------------------------------------------------------------
# Tensor-parallel helpers (megatron's own autograd communication functions).


def _tp(tp_group) -> tuple[Any, int]:
    if tp_group is None or not torch.distributed.is_initialized():
        return None, 1
    return tp_group, torch.distributed.get_world_size(tp_group)


def _mark_tensor_parallel(param: torch.Tensor, is_parallel: bool, dim: int) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = 1


def _init_weight(weight: Parameter, init_method: Callable | None, get_rng_state_tracker, rng_tracker_name) -> None:
    if init_method is None:
        return
    if get_rng_state_tracker is None:
        init_method(weight)
        return
    tracker = get_rng_state_tracker()
    with tracker.fork(rng_tracker_name) if rng_tracker_name else tracker.fork():
        init_method(weight)


def _device(device) -> torch.device:
    if device is None or (isinstance(device, str) and device == "cuda") or isinstance(device, int):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------
# Norms.


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """RMSNorm as HF computes it: statistics and scaling in fp32, cast back to the input dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    return (y * w).to(x.dtype)


def _layer_norm(x, weight, bias, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    w = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    y = F.layer_norm(x.float(), (x.size(-1),), w, bias.float() if bias is not None else None, eps)
    return y.to(x.dtype)


def _normalize(x, normalization: str, weight, bias, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    if normalization == "RMSNorm":
        return _rms_norm(x, weight, eps, zero_centered_gamma)
    return _layer_norm(x, weight, bias, eps, zero_centered_gamma)


def _norm_parameters(shape, dtype, device, zero_centered_gamma: bool, has_bias: bool, sequence_parallel: bool):
    """A norm's gamma (zeros when zero-centred: the scale is 1 + gamma) and optional beta, marked
    ``sequence_parallel`` so that megatron all-reduces their gradients over the TP group."""
    init = torch.zeros if zero_centered_gamma else torch.ones
    weight = Parameter(init(shape, dtype=dtype, device=_device(device)))
    bias = Parameter(torch.zeros(shape, dtype=dtype, device=_device(device))) if has_bias else None
    for param in (weight, bias):
        if param is not None:
            param.sequence_parallel = sequence_parallel
    return weight, bias


class _Norm(torch.nn.Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, sequence_parallel: bool = False,
                 params_dtype: torch.dtype | None = None, zero_centered_gamma: bool = False, device="cuda",
                 has_bias: bool = False, **unused: Any):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        dtype = params_dtype or torch.get_default_dtype()
        self.normalized_shape = shape
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.sequence_parallel = sequence_parallel
        self.weight, self.bias = _norm_parameters(shape, dtype, device, zero_centered_gamma, has_bias,
                                                  sequence_parallel)

    def reset_parameters(self, defer_init: bool = False) -> None:
        with torch.no_grad():
            (self.weight.zero_() if self.zero_centered_gamma else self.weight.fill_(1.0))
            if self.bias is not None:
                self.bias.zero_()


class RMSNorm(_Norm):
    """``te.pytorch.RMSNorm``: parameter ``weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps, self.zero_centered_gamma)


class LayerNorm(_Norm):
    """``te.pytorch.LayerNorm``: parameters ``weight`` and ``bias``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, **kwargs: Any):
        super().__init__(normalized_shape, eps, has_bias=True, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x, self.weight, self.bias, self.eps, self.zero_centered_gamma)


# ---------------------------------------------------------------------------
# Linear layers.


class Linear(torch.nn.Module):
    """``te.pytorch.Linear``: ``y = x W^T + b`` with TE's tensor-parallel modes.

    ``parallel_mode="column"``: ``W`` is ``[out/tp, in]``; the input is all-gathered
    over the sequence (dim 0) first under sequence parallelism. ``"row"``: ``W`` is
    ``[out, in/tp]``; the output is all-reduced (reduce-scattered over the sequence
    under sequence parallelism) before the bias. None: no communication.
    ``return_bias=True`` returns ``(y_without_bias, b)``.
    """

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Callable | None = None, rng_tracker_name: str | None = None,
                 init_method: Callable | None = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: torch.dtype | None = None, parallel_mode: str | None = None, device="cuda",
                 **unused: Any):
        super().__init__()
        group, size = _tp(tp_group)
        self.tp_group, self.tp_size = group, size if tp_group is not None else tp_size
        self.parallel_mode = parallel_mode
        self.sequence_parallel = sequence_parallel
        self.return_bias = return_bias
        self.use_bias = bias
        self.in_features, self.out_features = in_features, out_features
        if parallel_mode == "column":
            out_features //= self.tp_size
        elif parallel_mode == "row":
            in_features //= self.tp_size
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = Parameter(torch.empty(out_features, in_features, dtype=dtype, device=_device(device)))
        _init_weight(self.weight, init_method, get_rng_state_tracker, rng_tracker_name)
        _mark_tensor_parallel(self.weight, parallel_mode in ("column", "row"), 1 if parallel_mode == "row" else 0)
        if bias:
            self.bias = Parameter(torch.zeros(out_features, dtype=dtype, device=_device(device)))
            _mark_tensor_parallel(self.bias, parallel_mode == "column", 0)
            if parallel_mode == "row":
                self.bias.sequence_parallel = sequence_parallel
        else:
            self.bias = None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_mode != "column" or self.tp_group is None or self.tp_size == 1:
            return x
        from megatron.core.tensor_parallel import mappings

        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, group=self.tp_group)
        return mappings.copy_to_tensor_model_parallel_region(x, group=self.tp_group)

    def _linear(self, x: torch.Tensor):
        bias = self.bias if self.use_bias and self.bias is not None and self.bias.numel() else None
        if self.parallel_mode == "row" and self.tp_group is not None and self.tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            out = F.linear(x, self.weight)
            if self.sequence_parallel:
                out = mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = mappings.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
            if self.return_bias:
                return out, bias
            return out + bias if bias is not None else out
        if self.return_bias:
            return F.linear(x, self.weight), bias
        return F.linear(x, self.weight, bias)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None, **unused: Any):
        return self._linear(self._input(inp))


class LayerNormLinear(Linear):
    """``te.pytorch.LayerNormLinear``: a norm (``layer_norm_weight``/``layer_norm_bias``)
    then a ``Linear``; ``return_layernorm_output`` also returns the normalised input."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, normalization: str = "LayerNorm",
                 zero_centered_gamma: bool = False, return_layernorm_output: bool = False,
                 return_layernorm_output_gathered: bool = False, params_dtype: torch.dtype | None = None,
                 device="cuda", sequence_parallel: bool = False, **kwargs: Any):
        super().__init__(in_features, out_features, params_dtype=params_dtype, device=device,
                         sequence_parallel=sequence_parallel, **kwargs)
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization must be 'LayerNorm' or 'RMSNorm', not {normalization!r}")
        dtype = params_dtype or torch.get_default_dtype()
        self.normalization = normalization
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.layer_norm_weight, self.layer_norm_bias = _norm_parameters(
            in_features, dtype, device, zero_centered_gamma, normalization == "LayerNorm", sequence_parallel)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None, **unused: Any):
        normed = _normalize(inp, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps,
                            self.zero_centered_gamma)
        out = self._linear(self._input(normed))
        if self.return_layernorm_output:
            return (*out, normed) if isinstance(out, tuple) else (out, normed)
        return out


class GroupedLinear(torch.nn.Module):
    """``te.pytorch.GroupedLinear``: ``num_gemms`` linears (``weight0..``, ``bias0..``) over
    consecutive row blocks of the input (``m_splits`` rows each), as MoE experts use them.

    megatron calls it with ``parallel_mode=None`` whenever experts are split over
    ranks (the token dispatcher communicates), so only that mode is implemented.
    ``return_bias=True`` returns ``(y_without_bias, [b_0, b_1, ...])``.
    """

    def __init__(self, num_gemms: int, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Callable | None = None, rng_tracker_name: str | None = None,
                 init_method: Callable | None = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: torch.dtype | None = None, parallel_mode: str | None = None, device="cuda",
                 **unused: Any):
        super().__init__()
        if parallel_mode is not None and tp_size > 1:
            raise NotImplementedError("GroupedLinear with TE-side tensor parallelism needs Transformer Engine")
        self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
        self.use_bias, self.return_bias = bias, return_bias
        self.parallel_mode = parallel_mode
        # TE's fp8 bookkeeping that megatron's checkpoint hooks read: no fp8 here.
        self.fp8 = self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False, "recipe": None}
        dtype = params_dtype or torch.get_default_dtype()
        for i in range(num_gemms):
            weight = Parameter(torch.empty(out_features, in_features, dtype=dtype, device=_device(device)))
            _init_weight(weight, init_method, get_rng_state_tracker, rng_tracker_name)
            self.register_parameter(f"weight{i}", weight)
            self.register_parameter(f"bias{i}", Parameter(torch.zeros(out_features, dtype=dtype,
                                                                       device=_device(device))) if bias else None)

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        pass

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)  # TE's encoding of "no fp8 state"

    def set_extra_state(self, state: Any) -> None:
        pass

    def forward(self, inp: torch.Tensor, m_splits, is_first_microbatch: bool | None = None, **unused: Any):
        splits = m_splits.tolist() if isinstance(m_splits, torch.Tensor) else list(m_splits)
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        add_bias = self.use_bias and not self.return_bias
        parts = [F.linear(x, w, b if add_bias else None)
                 for x, w, b in zip(torch.split(inp, splits), weights, biases)]
        out = torch.cat(parts) if parts else inp.new_zeros(0, self.out_features)
        if self.return_bias:
            return out, biases if self.use_bias else None
        return out


# ---------------------------------------------------------------------------
# Attention.


class DotProductAttention(torch.nn.Module):
    """``te.pytorch.DotProductAttention`` for ``sbhd`` and packed ``thd`` inputs.

    ``sbhd``: query ``[s, b, h, d]``, key/value ``[s, b, g, d]`` -> ``[s, b, h * d_v]``.
    ``thd``: ``[t, h, d]`` with ``cu_seqlens_q`` (sequences attend only to themselves;
    ``cu_seqlens_*_padded`` when given) -> ``[t, h * d_v]``. Heads and groups are this
    tensor-parallel rank's. Masks: ``causal``/``padding_causal`` (``no_mask``/``padding``
    attend everywhere within the sequence), ``window_size=(left, right)``: query ``i``
    sees keys ``i - left .. i + right`` (-1: unbounded). ``softmax_type``: ``vanilla``,
    ``off-by-one`` (a sink logit of 0) or ``learnable`` (a sink logit per head, the
    ``softmax_offset`` parameter ``[heads]``).

    Context parallelism (``cp_group`` of more than one rank, as megatron-core passes it, or
    ``set_context_parallel_group``): the inputs are this rank's shards of each sequence
    (chunks ``r`` and ``2C-1-r`` of ``2C``, per packed sequence for ``thd``, whose
    ``cu_seqlens`` stay the unsplit ones) and the output is exact attention for them;
    every ``cp_comm_type`` computes the same result (K/V by all-gather,
    ``bridge_sft.runtime.context_parallel``).

    Kernel: torch's ``scaled_dot_product_attention`` (flash / memory-efficient on a GPU: no
    ``s x s`` probabilities kept for backward); with attention sinks, or ``use_sdpa = False``
    (the GPU check's comparison), an explicit fp32 softmax over ``q k^T``.
    """

    use_sdpa = True

    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups: int | None = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 window_size: tuple[int, int] | None = None, sequence_parallel: bool = False, tp_size: int = 1,
                 get_rng_state_tracker: Callable | None = None, tp_group=None, layer_number: int | None = None,
                 attention_type: str = "self", softmax_scale: float | None = None, softmax_type: str = "vanilla",
                 return_max_logit: bool = False, **unused: Any):
        super().__init__()
        if return_max_logit:
            raise NotImplementedError("qk-clip / max-logit logging needs Transformer Engine's attention")
        group, size = _tp(tp_group)
        tp_size = size if tp_group is not None else tp_size
        self.heads = num_attention_heads // tp_size
        self.groups = (num_gqa_groups or num_attention_heads) // tp_size
        k_channels = kv_channels[0] if isinstance(kv_channels, (tuple, list)) else kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type
        self.window_size = window_size
        self.dropout_p = attention_dropout
        self.get_rng_state_tracker = get_rng_state_tracker
        self.softmax_type = softmax_type
        if softmax_type == "learnable":
            self.softmax_offset = Parameter(torch.zeros(self.heads, device=_device(unused.get("device"))))
            _mark_tensor_parallel(self.softmax_offset, True, 0)
        elif softmax_type not in ("vanilla", "off-by-one"):
            raise ValueError(f"softmax_type {softmax_type!r} is not supported")
        self.set_context_parallel_group(unused.get("cp_group"), unused.get("cp_global_ranks"),
                                        unused.get("cp_stream"), unused.get("cp_comm_type", "p2p"))

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type: str = "p2p") -> None:
        """TE's API: attend over the sequence shards of ``cp_group`` (None: no context parallelism)."""
        if isinstance(cp_group, (list, tuple)):  # "a2a+p2p": TE's hierarchical groups
            raise NotImplementedError(f"cp_comm_type {cp_comm_type!r} (hierarchical context parallelism) needs "
                                      "Transformer Engine's attention: use cp_comm_type 'p2p', 'all_gather' or 'a2a'")
        self.cp_group = cp_group
        self.cp_global_ranks = cp_global_ranks
        self.cp_comm_type = cp_comm_type

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else torch.distributed.get_world_size(self.cp_group)

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format: str | None = None,
                cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
                max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type: str | None = None, window_size=None,
                core_attention_bias_type: str = "no_bias", core_attention_bias=None, **unused: Any):
        qkv_format = qkv_format or self.qkv_format
        mask_type = attn_mask_type or self.attn_mask_type
        window = window_size if window_size is not None else self.window_size
        if "arbitrary" in mask_type or (attention_mask is not None and mask_type not in ("causal", "padding_causal")):
            raise NotImplementedError(f"attention mask type {mask_type!r} needs Transformer Engine's attention")
        causal = "causal" in mask_type
        bias = core_attention_bias if core_attention_bias_type != "no_bias" else None
        rng = self.get_rng_state_tracker().fork() if self.get_rng_state_tracker and self.training and self.dropout_p \
            else contextlib.nullcontext()
        with rng:
            if self._cp_size() > 1:
                bounds = cu_seqlens_q_padded if cu_seqlens_q_padded is not None else cu_seqlens_q
                return context_parallel.attention(self._attend, query_layer, key_layer, value_layer, qkv_format,
                                                  self.cp_group, causal, window, bias, bounds)
            if qkv_format == "thd":
                bounds = cu_seqlens_q_padded if cu_seqlens_q_padded is not None else cu_seqlens_q
                bounds = bounds.tolist()
                if bounds[-1] < query_layer.size(0):  # trailing padding: a sequence of its own
                    bounds.append(query_layer.size(0))
                # [t, h, d] -> per sequence [1, h, s, d]
                outputs = [
                    self._attend(*(x[a:b].transpose(0, 1).unsqueeze(0) for x in (query_layer, key_layer, value_layer)),
                                 causal, window, bias)[0].transpose(0, 1)
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a
                ]
                out = torch.cat(outputs, dim=0)
                return out.reshape(out.size(0), -1)
            if qkv_format != "sbhd":
                raise NotImplementedError(f"qkv_format {qkv_format!r}")
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query_layer, key_layer, value_layer))
            out = self._attend(q, k, v, causal, window, bias)  # [b, h, s, d]
            return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)

    def _visible(self, sq: int, sk: int, causal: bool, window, device, q_offset: int | None = None):
        """Boolean ``[sq, sk]`` mask of the keys each query sees, or None for all. Query ``i`` is at key
        position ``q_offset + i`` (default ``sk - sq``: bottom-right aligned)."""
        left, right = window if window is not None else (-1, 0 if causal else -1)
        if causal:
            right = 0
        if left < 0 and right < 0:
            return None
        q_offset = sk - sq if q_offset is None else q_offset
        # Comparisons of a key row against a query column: no [sq, sk] integer matrix (long sequences).
        keys = torch.arange(sk, device=device)[None, :]
        queries = torch.arange(sq, device=device)[:, None] + q_offset
        visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if right >= 0:
            visible &= keys <= queries + right
        if left >= 0:
            visible &= keys >= queries - left
        return visible

    def _attend(self, q, k, v, causal: bool, window, bias=None, q_offset: int | None = None) -> torch.Tensor:
        """``[b, h, sq, d]`` query, ``[b, g, sk, d]`` key/value -> ``[b, h, sq, d_v]``; query ``i`` sits at key
        position ``q_offset + i`` (default: the last ``sq`` keys')."""
        if self.heads != self.groups:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        plain_causal = (causal and bias is None and (window is None or window[0] < 0) and q.size(2) == k.size(2)
                        and not q_offset)
        if self.softmax_type == "vanilla" and self.use_sdpa and plain_causal:  # no mask tensor: flash kernels apply
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
        visible = self._visible(q.size(2), k.size(2), causal, window, q.device, q_offset)
        if self.softmax_type == "vanilla" and self.use_sdpa:
            mask = visible if bias is None else (bias if visible is None else bias.masked_fill(~visible, -math.inf))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale)
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * self.softmax_scale
        if bias is not None:
            scores = scores + bias.float()
        if visible is not None:
            scores = scores.masked_fill(~visible, -math.inf)
        if self.softmax_type == "vanilla":
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
        else:  # attention sinks: one extra logit per head that takes probability mass and contributes no value
            sink = self.softmax_offset.float() if self.softmax_type == "learnable" else scores.new_zeros(self.heads)
            sink = sink.view(1, -1, 1, 1).expand(scores.size(0), -1, scores.size(2), 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1].to(v.dtype)
        probs = F.dropout(probs, dropout, training=dropout > 0)
        return torch.matmul(probs, v)


class _SplitAlongDim(torch.autograd.Function):
    """``te.pytorch.attention._SplitAlongDim``: ``torch.split`` along ``dim`` into ``split_sizes``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int, split_sizes, *unused):
        ctx.dim = dim
        return tuple(part.contiguous() for part in torch.split(tensor, list(split_sizes), dim=dim))

    @staticmethod
    def backward(ctx, *grads):
        return (torch.cat(grads, dim=ctx.dim), None, None, *([None] * 0))


# ---------------------------------------------------------------------------
# fp8 entry points megatron imports unconditionally; fp8 is not available.


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def is_first_fp8_module() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


def _no_fp8(enabled: bool = False, **unused: Any):
    if enabled:
        raise NotImplementedError("fp8 needs Transformer Engine: run on a GPU host with TE")
    return contextlib.nullcontext()


fp8_autocast = fp8_model_init = autocast = quantized_model_init = _no_fp8


# What the stand-in provides, by module path: ``from transformer_engine.X import name`` works
# for these names only (any other import raises ImportError, so megatron takes its non-TE path).
PROVIDES = {
    "transformer_engine": {"__version__": __version__},
    "transformer_engine.pytorch": {
        "Linear": Linear, "LayerNormLinear": LayerNormLinear, "LayerNorm": LayerNorm, "RMSNorm": RMSNorm,
        "DotProductAttention": DotProductAttention, "GroupedLinear": GroupedLinear, "autocast": autocast,
        "quantized_model_init": quantized_model_init, "fp8_autocast": fp8_autocast,
        "fp8_model_init": fp8_model_init,
    },
    "transformer_engine.pytorch.fp8": {
        "FP8GlobalStateManager": FP8GlobalStateManager, "fp8_autocast": fp8_autocast,
        "fp8_model_init": fp8_model_init,
    },
    "transformer_engine.pytorch.attention": {"_SplitAlongDim": _SplitAlongDim},
    # TE's C++ extension module: megatron-core's utils import it beside transformer_engine (THD CP split).
    "transformer_engine_torch": {"thd_get_partitioned_indices": context_parallel.thd_get_partitioned_indices},
    # Imported without a guard for TE >= 2.7; megatron uses them only with moe_router_fusion (off without TE).
    "transformer_engine.pytorch.router": {"fused_topk_with_score_function": None,
                                          "fused_compute_score_for_moe_aux_loss": None, "fused_moe_aux_loss": None},
}
