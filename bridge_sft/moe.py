"""Mixture-of-experts SFT: router losses weighted as in pretraining, router health in the log, MoE config checks.

Router losses under per-token averaging
---------------------------------------
megatron-core's router adds its load-balancing loss (``aux_loss``, ``seq_aux_loss``,
``global_aux_loss``) and z-loss to the backward pass through ``MoEAuxLossAutoScaler``.
With ``calculate_per_token_loss=True`` (bridge-sft's default) it multiplies each loss by
the number of tokens the router saw (``V``, times the TP x CP size) because
``finalize_model_grads`` later divides *every* gradient by the global token count ``N``;
megatron's derivation assumes ``N`` counts the same tokens as the routers, so the two
factors cancel to the pretraining weighting: each micro-batch's router loss enters the
gradient with ``1 / (num_micro_batches x dp_size)``.

In SFT, ``N`` counts the *supervised* tokens (``loss_mask.sum()`` over the global batch)
while the routers see every token: prompts, and padding unless a padding mask reaches them.
The router-loss gradient then comes out multiplied by (routed tokens / supervised tokens):
2.3-2.7x on the bundled chat dialogs, 20-72x on long-prompt data, a different factor every step
(``benchmarks/moe_aux_weighting.py``).

bridge-sft restores the pretraining weighting from its own forward step, without touching
megatron's code: at the first micro-batch of a training step it reads the step's
micro-batches ahead (``MicroBatchRouting.next``), sums their supervised tokens over the
data-parallel ranks (one scalar all-reduce per step: the same ``N`` that
``finalize_model_grads`` divides by), and registers a gradient hook on the micro-batch's
model output. When that micro-batch's backward pass starts (before any router's), the hook
sets ``MoEAuxLossAutoScaler``'s backward scale to ``N / (num_micro_batches x dp_size x V x
tp_cp_size)`` times the usual loss scale, so that after ``finalize_model_grads`` each
router loss contributes exactly ``coeff x d(aux)/dW / (num_micro_batches x dp_size)``:
independent of how many tokens are supervised. A hook per micro-batch (not megatron's
``moe_grad_scale_func``, which is read at the *forward* of a micro-batch) keeps the right
scale with pipeline parallelism, where forwards and backwards of different micro-batches
interleave (by construction: the CPU tests cover micro-batching, DP, EP and TP x EP, not PP).
Every pipeline stage reads the step's micro-batches from its own data iterator (Bridge builds
one on every rank), so stages without the loss know the supervised-token count too.

Padding is never counted as routed: datasets that mark padding slots with a
``padding_mask`` (bool, True = padding; bridge-sft's packed and unpacked datasets do) have
the mask passed to the model, which excludes those tokens from the routers' losses, token
counts and expert-bias statistics (megatron's ``padding_mask`` argument).

This module needs megatron at import time (bridge_sft's import gate prepares the runtime).
"""

from __future__ import annotations

import sys
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron.bridge.training.callbacks import Callback
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import unwrap_model


PADDING_MASK_KEY = "padding_mask"  # dataset key: bool [b, s], True at padding slots (megatron's convention)
_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def is_moe(model_config) -> bool:
    """True for a model with routed experts (``num_moe_experts`` set)."""
    return bool(getattr(model_config, "num_moe_experts", None))


def router_loss_coefficients(model_config) -> dict[str, float]:
    """The router losses a config turns on: ``{"aux_loss": c, "seq_aux_loss": c, "global_aux_loss": c,
    "z_loss": c}`` restricted to non-zero coefficients (megatron's ``TopKRouter.get_aux_loss_coeff`` rules:
    ``moe_router_load_balancing_type`` is one type or a list matched with a list of coefficients)."""
    types = getattr(model_config, "moe_router_load_balancing_type", None) or ""
    coeffs = getattr(model_config, "moe_aux_loss_coeff", 0.0) or 0.0
    active: dict[str, float] = {}
    if isinstance(types, str):
        if types in _AUX_LOSS_TYPES and coeffs:
            active[types] = float(coeffs)
    else:
        for name, coeff in zip(types, coeffs if isinstance(coeffs, (list, tuple)) else [coeffs] * len(types)):
            if name in _AUX_LOSS_TYPES and coeff:
                active[name] = float(coeff)
    z = getattr(model_config, "moe_z_loss_coeff", None)
    if z:
        active["z_loss"] = float(z)
    return active


# ---------------------------------------------------------------------------
# Router-loss weighting (see the module docstring).


@dataclass
class _StepLookahead:
    """One training step's micro-batches on this rank, read at its first micro-batch."""

    batches: deque
    supervised_tokens: torch.Tensor  # global supervised-token count of the step (fp64 scalar)


_LOOKAHEAD: "weakref.WeakKeyDictionary[Any, _StepLookahead]" = weakref.WeakKeyDictionary()


@dataclass
class MicroBatchRouting:
    """What the forward step needs to route one training micro-batch of an MoE model.

    ``batch``: the micro-batch without its padding mask (what Bridge's ``get_batch`` reads);
    ``padding_mask``: bool ``[b, s]`` (True = padding) or None when the dataset marks none;
    ``step_supervised_tokens``: the step's global supervised-token count, or None when the
    step has no router loss to weight.
    """

    batch: dict
    padding_mask: torch.Tensor | None
    step_supervised_tokens: torch.Tensor | None

    @classmethod
    def next(cls, data_iterator: Iterator, batches: Iterator[dict], model_config,
             pg_collection) -> "MicroBatchRouting":
        """Take the next training micro-batch from ``batches`` (normalised batches read from
        ``data_iterator``). At a step's first micro-batch with router losses on, read the step's
        ``get_num_microbatches()`` micro-batches ahead and all-reduce their supervised tokens over
        the data-parallel group; later micro-batches of the step come from that read-ahead."""
        ahead = _LOOKAHEAD.get(data_iterator) if data_iterator is not None else None
        if ahead is not None and ahead.batches:
            batch, supervised = ahead.batches.popleft(), ahead.supervised_tokens
        elif data_iterator is not None and router_loss_coefficients(model_config):
            step = [next(batches) for _ in range(get_num_microbatches())]
            local = sum(int(b["loss_mask"].float().sum().item()) for b in step)  # as masked_next_token_loss counts
            supervised = torch.tensor(float(local), dtype=torch.float64, device=torch.cuda.current_device())
            if pg_collection.dp.size() > 1:
                torch.distributed.all_reduce(supervised, group=pg_collection.dp)
            ahead = _StepLookahead(deque(step), supervised)
            _LOOKAHEAD[data_iterator] = ahead
            batch = ahead.batches.popleft()
        else:
            batch, supervised = next(batches), None
        batch = dict(batch)
        padding_mask = batch.pop(PADDING_MASK_KEY, None)
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            if padding_mask.dim() == 1:
                padding_mask = padding_mask.unsqueeze(0)
            if not padding_mask.any():  # the same as no mask, without the masked ops in every router
                padding_mask = None
        return cls(batch, padding_mask, supervised)

    def model_padding_mask(self, model, model_config, pg_collection) -> torch.Tensor | None:
        """The padding mask for ``model(..., padding_mask=...)``: sliced for this context-parallel rank
        as Bridge's ``get_batch`` slices the tokens; on pipeline stages after the first, also for this
        sequence-parallel rank (the embedding stage slices it inside ``GPTModel`` itself)."""
        if self.padding_mask is None:
            return None
        mask = _cp_slice(self.padding_mask, self.batch, pg_collection)
        if model_config.sequence_parallel and not unwrap_model(model).pre_process:
            mask = _sp_slice(mask, pg_collection.tp)
        return mask.to(device=torch.cuda.current_device(), non_blocking=True)

    def routed_tokens(self, model_config, pg_collection) -> int:
        """``V``: the tokens this rank's routers count for their loss scaling (non-padding tokens of the
        micro-batch on this CP rank and, with sequence parallelism, this TP rank's share of them).
        Counted on the host copy of the batch: no device synchronisation."""
        mask = self.padding_mask
        if mask is None:
            mask = torch.zeros(self.batch["tokens"].shape, dtype=torch.bool)
        mask = _cp_slice(mask, self.batch, pg_collection)
        if model_config.sequence_parallel:
            mask = _sp_slice(mask, pg_collection.tp)
        return int((~mask).sum())

    def weight_router_losses(self, output: torch.Tensor, model_config, pg_collection) -> None:
        """Register the hook that sets this micro-batch's router-loss backward scale (module docstring)."""
        if self.step_supervised_tokens is None or not output.requires_grad:
            return
        routed = self.routed_tokens(model_config, pg_collection)
        divisor = get_num_microbatches() * pg_collection.dp.size() * routed * pg_collection.tp_cp.size()
        # finalize_model_grads divides by max(N, 1); a micro-batch with no routed token has no router loss.
        supervised = self.step_supervised_tokens.clamp(min=1)
        scale = supervised / divisor if routed else torch.zeros_like(supervised)

        def set_router_loss_scale(grad: torch.Tensor) -> None:
            base = _loss_scale(model_config, grad.device)
            MoEAuxLossAutoScaler.set_loss_scale((base * scale.to(base.dtype)).reshape(base.shape))

        output.register_hook(set_router_loss_scale)


def _loss_scale(model_config, device) -> torch.Tensor:
    """The loss scale megatron gives the router losses (``schedules._get_moe_loss_scale``): the MoE or
    main gradient scale function's value (fp16 loss scaling), else 1."""
    if getattr(model_config, "moe_grad_scale_func", None) is not None:
        return torch.as_tensor(model_config.moe_grad_scale_func(), device=device).reshape(1).float()
    if getattr(model_config, "grad_scale_func", None) is not None:
        return torch.as_tensor(model_config.grad_scale_func(torch.ones(1, device=device)), device=device).reshape(1)
    return torch.ones(1, device=device)


def _cp_slice(mask: torch.Tensor, batch: dict, pg_collection) -> torch.Tensor:
    """``mask`` [b, s] sliced for this context-parallel rank exactly as Bridge's ``get_batch`` slices
    the tokens of ``batch`` (packed: per-document partition; else megatron's zigzag)."""
    cp_group = pg_collection.cp
    if cp_group.size() == 1:
        return mask
    from megatron.bridge.training import gpt_step
    from megatron.core.utils import get_batch_on_this_cp_rank

    side = {k: v for k, v in batch.items() if k.startswith("cu_seqlens") or k.startswith("max_seqlen")}
    side["padding_mask"] = mask
    if gpt_step._has_packed_sequence_metadata(side):
        side = gpt_step._partition_packed_batch_for_cp(side, cp_group)
    else:
        side = get_batch_on_this_cp_rank(side, is_hybrid_cp=False, cp_group=cp_group)
    return side["padding_mask"]


def _sp_slice(mask: torch.Tensor, tp_group) -> torch.Tensor:
    """This tensor-parallel rank's share of the sequence dimension (what sequence parallelism scatters)."""
    size = tp_group.size()
    if size == 1:
        return mask
    chunk = mask.shape[1] // size
    rank = tp_group.rank()
    return mask[:, rank * chunk:(rank + 1) * chunk]


# ---------------------------------------------------------------------------
# Config checks (bridge_sft.train.check_config runs them before anything is written).

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
DISPATCHERS = ("alltoall", "allgather", "flex")


def check_moe_config(config, world_size: int | None = None) -> None:
    """Reject expert-parallel and router settings that cannot train, with one line naming the key and
    the fix (megatron-core would stop later, in setup or at the first forward, with its own wording).
    ``world_size``: the run's number of processes, when known (not in a dry run)."""
    model = config.model
    ep = getattr(model, "expert_model_parallel_size", 1) or 1
    if not is_moe(model):
        if ep > 1:
            raise ValueError(
                f"model.expert_model_parallel_size={ep}, but this model has no experts (model.num_moe_experts is "
                "unset): expert parallelism splits the experts of a mixture-of-experts model. Set "
                "model.expert_model_parallel_size=1 (use tensor_parallel or data parallelism for a dense model).")
        return
    experts = model.num_moe_experts
    if experts % ep:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        raise ValueError(
            f"model.expert_model_parallel_size={ep} does not divide model.num_moe_experts={experts}: every "
            f"expert-parallel rank holds the same number of experts. Use one of {divisors}.")
    etp = model.expert_tensor_parallel_size or model.tensor_model_parallel_size or 1
    pp = model.pipeline_model_parallel_size or 1
    if world_size is not None and world_size % (ep * etp * pp):
        raise ValueError(
            f"the world size {world_size} is not a multiple of model.expert_model_parallel_size={ep} x "
            f"model.expert_tensor_parallel_size={etp} x model.pipeline_model_parallel_size={pp} = {ep * etp * pp}: "
            "the expert layers need whole expert-parallel groups. Change expert_model_parallel_size or the "
            "number of processes (torchrun --nproc-per-node).")
    topk = model.moe_router_topk
    if not 1 <= topk <= experts:
        raise ValueError(f"model.moe_router_topk={topk} must be between 1 and model.num_moe_experts={experts}.")
    types = model.moe_router_load_balancing_type
    type_list = [types] if isinstance(types, str) else list(types)
    unknown = [t for t in type_list if t not in LOAD_BALANCING_TYPES]
    if unknown:
        raise ValueError(f"model.moe_router_load_balancing_type={types!r}: unknown {unknown}; use one of "
                         f"{list(LOAD_BALANCING_TYPES)} (or a list of aux-loss types).")
    coeffs = model.moe_aux_loss_coeff
    if not isinstance(types, str) and (not isinstance(coeffs, (list, tuple)) or len(coeffs) != len(type_list)):
        raise ValueError(f"model.moe_router_load_balancing_type is a list ({types}), so model.moe_aux_loss_coeff "
                         f"must be a list of as many coefficients (got {coeffs!r}).")
    for exclusive in ("sinkhorn", "quantile_balancing"):
        if exclusive in type_list and any(c > 0 for c in (coeffs if isinstance(coeffs, (list, tuple)) else [coeffs])):
            raise ValueError(f"model.moe_router_load_balancing_type={exclusive!r} balances the load without an "
                             f"auxiliary loss: set model.moe_aux_loss_coeff=0 (got {coeffs}).")
    if model.moe_router_score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"model.moe_router_score_function={model.moe_router_score_function!r}: use one of "
                         f"{list(SCORE_FUNCTIONS)}.")
    if model.moe_router_enable_expert_bias and model.moe_router_score_function == "softmax":
        raise ValueError("model.moe_router_enable_expert_bias=true needs model.moe_router_score_function='sigmoid' "
                         "(or 'sqrtsoftplus'): set it, or model.moe_router_enable_expert_bias=false.")
    groups = model.moe_router_num_groups
    if model.moe_router_group_topk and (not groups or experts % groups or model.moe_router_group_topk > groups):
        raise ValueError(f"model.moe_router_group_topk={model.moe_router_group_topk} needs "
                         f"model.moe_router_num_groups dividing num_moe_experts={experts} and at least group_topk "
                         f"(got {groups}).")
    if model.moe_token_dispatcher_type not in DISPATCHERS:
        raise ValueError(f"model.moe_token_dispatcher_type={model.moe_token_dispatcher_type!r}: use one of "
                         f"{list(DISPATCHERS)}.")
    capacity = model.moe_expert_capacity_factor
    if capacity is not None and any(t in ("sinkhorn", "quantile_balancing") for t in type_list):
        raise ValueError(f"model.moe_expert_capacity_factor={capacity} (token dropping) works with the aux-loss "
                         f"load-balancing types or 'none', not {types!r}: unset one of them.")
    cp = getattr(model, "context_parallel_size", 1) or 1
    if cp > 1 and model.moe_z_loss_coeff and not getattr(config.dataset, "packing", True):
        # megatron-core averages the z-loss per rank over that rank's unpadded tokens, and a padded (unpacked)
        # micro-batch puts different numbers of padding slots on each CP rank: one loss scale per micro-batch
        # cannot make both the z-loss and the load-balancing loss exact (measured: z-loss 3 % off at CP=2).
        raise ValueError(f"model.moe_z_loss_coeff={model.moe_z_loss_coeff} with context_parallel={cp} and "
                         "unpacked data: the router z-loss would be weighted per context-parallel rank. Use "
                         "packing=true (the default), or model.moe_z_loss_coeff=0.")
    if model.moe_pad_expert_input_to_capacity and capacity is None:
        raise ValueError("model.moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor "
                         "(e.g. 1.0): set it, or moe_pad_expert_input_to_capacity=false.")
    if (model.tensor_model_parallel_size or 1) > 1 and not model.sequence_parallel:
        raise ValueError(f"model.tensor_model_parallel_size={model.tensor_model_parallel_size} with experts needs "
                         "sequence parallelism (megatron-core's MoE layer refuses to train without it): set "
                         "sequence_parallel=true.")
    overlap = getattr(getattr(config, "comm_overlap", None), "overlap_moe_expert_parallel_comm", False)
    if overlap and router_loss_coefficients(model) and model.calculate_per_token_loss:
        raise ValueError(
            "comm_overlap.overlap_moe_expert_parallel_comm=true runs the forward and backward of two "
            "micro-batches interleaved, where bridge-sft cannot give each micro-batch its router-loss weight "
            "(README 'Mixture-of-experts models'). Set it to false, or turn the router losses off "
            "(model.moe_aux_loss_coeff=0, model.moe_z_loss_coeff=null).")


# ---------------------------------------------------------------------------
# Router health in the log.

IMBALANCE_THRESHOLD = 3.0  # busiest expert / mean tokens per expert of a layer over one log interval
IMBALANCE_INTERVALS = 5  # consecutive log intervals above the threshold before the warning


class RouterHealth(Callback):
    """Per log interval (``logger.log_interval``): each MoE layer's expert load imbalance and, with a
    capacity factor, the dropped tokens; in the console and in TensorBoard.

    - imbalance of layer L = max over experts / mean over experts of the tokens routed to each expert
      of L during the interval (all ranks, padding excluded, after token dropping): 1.0 is perfectly
      balanced, ``num_experts / topk`` means every token went to the same ``topk`` experts. TensorBoard:
      ``moe/expert_load_imbalance_layer_L`` and ``moe/expert_load_imbalance_max``.
    - dropped tokens (only when ``model.moe_expert_capacity_factor`` is set): token-to-expert
      assignments the capacity limit removed, as a count and as a share of all assignments;
      TensorBoard ``moe/dropped_token_assignments``.
    - a warning when a layer's imbalance stays above ``imbalance_threshold`` for ``intervals``
      consecutive log intervals (the fine-tune is collapsing onto few experts).

    The load-balancing loss and z-loss values are in Bridge's own iteration line and TensorBoard
    (``load_balancing_loss``, ``z_loss``; per layer with ``model.moe_per_layer_logging=true``) whenever
    their coefficients are non-zero. Counting runs on the device in the routers' forward hooks (no
    synchronisation inside a step); one small all-reduce per log interval.
    """

    def __init__(self, imbalance_threshold: float = IMBALANCE_THRESHOLD, intervals: int = IMBALANCE_INTERVALS):
        self.imbalance_threshold = imbalance_threshold
        self.intervals = intervals
        self.history: list[dict] = []  # per logged interval: iteration, imbalance per layer, dropped
        self._counts: torch.Tensor | None = None  # [layers, experts] token assignments kept
        self._offered: torch.Tensor | None = None  # [layers] token assignments asked for (tokens x topk)
        self._streak: dict[int, int] = {}
        self._hooks: list = []

    def on_train_start(self, context) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        config = context.state.cfg.model
        routers = [m for chunk in context.model for m in unwrap_model(chunk).modules() if isinstance(m, TopKRouter)]
        layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self._counts = torch.zeros(layers, config.num_moe_experts, dtype=torch.float64, device=device)
        self._offered = torch.zeros(layers, dtype=torch.float64, device=device)
        self._hooks = [router.register_forward_hook(self._count) for router in routers]

    def _count(self, router, args, output) -> None:
        if not (router.training and torch.is_grad_enabled()):  # training forwards once (recompute: the 2nd pass)
            return
        probs, routing_map = output
        kept = routing_map.bool() & (probs != 0)  # with pad-to-capacity the map also marks the padded slots
        tokens = routing_map.shape[0]
        padding = args[1] if len(args) > 1 else None
        if padding is not None:
            valid = ~padding.reshape(-1, 1)
            kept = kept & valid
            tokens = valid.sum()
        layer = router.layer_number - 1 + (router.config.num_layers if router.is_mtp_layer else 0)
        self._counts[layer] += kept.sum(dim=0)
        self._offered[layer] += tokens * router.topk

    def on_train_step_end(self, context) -> None:
        state = context.state
        iteration = state.train_state.step + 1
        if self._counts is None or iteration % (state.cfg.logger.log_interval or 1):
            return
        both = torch.cat([self._counts, self._offered[:, None]], dim=1)
        torch.distributed.all_reduce(both)  # every rank holds its own tokens (DP, EP, CP, SP shards) or zeros
        counts, offered = both[:, :-1], both[:, -1]
        self._counts.zero_()
        self._offered.zero_()
        moe_layers = (counts.sum(dim=1) > 0).nonzero().flatten().tolist()
        imbalance = {layer + 1: (counts[layer].max() / counts[layer].mean()).item() for layer in moe_layers}
        dropped = (offered.sum() - counts.sum()).item()
        share = dropped / max(offered.sum().item(), 1.0)
        capacity = getattr(state.cfg.model, "moe_expert_capacity_factor", None) is not None
        self.history.append({"iteration": iteration, "imbalance": imbalance, "dropped": dropped if capacity else None})
        if not imbalance:
            return
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            layers = " ".join(f"{value:.2f}" for value in imbalance.values())
            line = f" [bridge-sft] iteration {iteration:>8} | expert load max/mean per layer: {layers}"
            if capacity:
                line += f" | dropped token assignments: {dropped:,.0f} ({share:.2%})"
            print(line, flush=True)
            writer = getattr(state, "tensorboard_logger", None)
            if writer is not None:
                for layer, value in imbalance.items():
                    writer.add_scalar(f"moe/expert_load_imbalance_layer_{layer}", value, iteration)
                writer.add_scalar("moe/expert_load_imbalance_max", max(imbalance.values()), iteration)
                if capacity:
                    writer.add_scalar("moe/dropped_token_assignments", dropped, iteration)
        for layer, value in imbalance.items():
            self._streak[layer] = self._streak.get(layer, 0) + 1 if value > self.imbalance_threshold else 0
            if self._streak[layer] == self.intervals and torch.distributed.get_rank() == 0:
                # print, not logging: Bridge's logging setup filters out WARNING records
                print(f"WARNING: router health: MoE layer {layer} has routed more than "
                      f"{self.imbalance_threshold:.1f}x the mean tokens per expert to its busiest expert for "
                      f"{self.intervals} log intervals in a row (now {value:.2f}x, iteration {iteration}): the "
                      "fine-tune is collapsing onto few experts. Raise model.moe_aux_loss_coeff, lower the learning "
                      "rate, or freeze the routers; see README 'Mixture-of-experts models'.",
                      file=sys.stderr, flush=True)

    def on_train_end(self, context) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def callbacks_for(config, given=()) -> list:
    """The MoE callbacks ``bridge_sft.train.run`` adds: a ``RouterHealth`` for an MoE model, unless the
    caller passed one of their own (to set its threshold)."""
    if not is_moe(config.model) or any(isinstance(c, RouterHealth) for c in given or ()):
        return []
    return [RouterHealth()]
