"""The SFT forward step: the model computes per-token losses, Bridge reduces them.

``forward_step`` is what ``finetune(config, forward_step)`` calls once per
micro-batch. It

1. takes the micro-batch through Bridge's own ``gpt_step.get_batch`` (pipeline
   stages, packed ``cu_seqlens`` metadata, context-parallel slicing), after
   normalising it (``normalize_batch``: ``[batch, seq]`` shapes, position ids,
   HF ``-100`` labels);
2. calls ``model(tokens, position_ids, attention_mask, labels=labels)``: with
   labels, megatron-core's GPTModel returns per-token losses ``[b, s]``
   (fp32, vocab-parallel cross-entropy, no logits materialised by us). With
   ``fused_loss_head`` on (the recipes' default) the call also passes
   GPTModel's ``output_processor`` hook: ``bridge_sft.loss_head`` computes the
   same per-token losses in chunks of tokens, without holding the logits;
3. returns them with Bridge's ``masked_next_token_loss``, which sums
   ``losses * loss_mask`` and returns ``(loss_sum, num_tokens, {"lm loss": ...})``
   so Megatron divides by the number of supervised tokens of the whole global
   batch (with ``model.calculate_per_token_loss=True``, see ``bridge_sft.train``).

There is no cross-entropy, label shift or reduction here: the dataset shifts
labels (``tokens = ids[:-1]``, ``labels = ids[1:]``), the model computes the
loss, Bridge reduces it.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron.bridge.training.gpt_step import get_batch
from megatron.bridge.training.losses import create_masked_next_token_loss_function
from megatron.bridge.training.state import GlobalState
from megatron.bridge.training.utils.flop_utils import accumulate_flops_metadata, get_model_chunk_vp_stage
from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params
from megatron.bridge.training.utils.pg_utils import get_pg_collection
from megatron.core.utils import get_model_config

from bridge_sft import loss_head, moe
from bridge_sft.batch import normalize_batch
from bridge_sft.callbacks import count_tokens
from bridge_sft.data.mixing import SOURCE_ID, add_source_losses


class DataExhaustedError(RuntimeError):
    """The data iterator ran out in the middle of a training or evaluation step."""


class _SFTBatches:
    """Wraps the data iterator: normalises each batch, explains exhaustion."""

    def __init__(self, data_iterator: Iterator, state: GlobalState, training: bool):
        self._iterator = data_iterator
        self._state = state
        self._training = training
        self.source_id = None  # the last batch's per-row data source (mixtures), for per-source losses

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise DataExhaustedError(self._exhausted_message()) from None
        self.source_id = batch.get(SOURCE_ID)
        return normalize_batch(batch)

    def _exhausted_message(self) -> str:
        cfg, train_state = self._state.cfg, self._state.train_state
        if not self._training:
            return (
                f"the validation/test data ran out during evaluation at iteration {train_state.step}: "
                f"validation.eval_iters={cfg.validation.eval_iters} x "
                f"train.global_batch_size={cfg.train.global_batch_size} samples are needed per evaluation. "
                "Lower validation.eval_iters, or give the validation split more samples."
            )
        return (
            f"the training data ran out at iteration {train_state.step + 1} of {cfg.train.train_iters} "
            f"after {train_state.consumed_train_samples} samples: the dataset is smaller than "
            f"train.train_iters x train.global_batch_size = "
            f"{cfg.train.train_iters * cfg.train.global_batch_size} samples. Lower train.train_iters, "
            "or let the data repeat for several epochs (dataset.dataloader_type='cyclic')."
        )


def forward_step(
    state: GlobalState,
    data_iterator: Iterator | None,
    model: torch.nn.Module,
    return_schedule_plan: bool = False,
):
    """One SFT micro-batch: ``(output_tensor, loss_func)`` for Megatron's schedule.

    ``output_tensor`` is the per-token loss ``[b, s]`` (fp32) on the last
    pipeline stage, hidden states on the others. ``loss_func(output_tensor)``
    returns ``(loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens])})``.
    """
    config = get_model_config(model)
    pg_collection = get_pg_collection(model)
    vp_stage = get_model_chunk_vp_stage(model)
    batches = _SFTBatches(data_iterator, state, training=model.training)
    routing = None  # MoE training: padding mask for the routers, router losses weighted as in pretraining
    if model.training and moe.is_moe(config):
        routing = moe.MicroBatchRouting.next(data_iterator, batches, config, pg_collection)
        batches = iter([routing.batch])

    state.timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_metadata = get_batch(
        batches,
        state.cfg,
        use_mtp=bool(getattr(config, "mtp_num_layers", None)),
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    state.timers("batch-generator").stop()
    if loss_mask is not None:  # supervised vs padded-slot tokens/s, and what an evaluation covered (callbacks)
        count_tokens(state, loss_mask, evaluation=not model.training)

    packed_seq_params = None
    if packed_seq_metadata is not None:
        if getattr(config, "is_hybrid_model", False):  # as gpt_step: the pack's length, for Mamba's seq_idx
            rows = tokens if tokens is not None else labels  # both None on middle pipeline stages
            packed_seq_metadata["total_tokens"] = rows.size(1) if rows is not None else config.seq_length
        packed_seq_params = get_packed_seq_params(packed_seq_metadata)
    # FLOPs accounting for Bridge's throughput log; like gpt_step, the packed
    # (sum of s_i^2) attention term only for CP=1, whose cu_seqlens are not CP-sliced.
    use_thd_flops = packed_seq_params is not None and pg_collection.cp.size() == 1
    accumulate_flops_metadata(
        state,
        tokens,
        vp_stage=vp_stage,
        config_seq_len=config.seq_length,
        cu_seqlens=packed_seq_params.cu_seqlens_q if use_thd_flops else None,
    )

    loss_func = create_masked_next_token_loss_function(
        loss_mask,
        check_for_nan_in_loss=state.cfg.rerun_state_machine.check_for_nan_in_loss,
        check_for_spiky_loss=state.cfg.rerun_state_machine.check_for_spiky_loss,
    )
    if not model.training:  # a validation loss per data source of a mixture, beside "lm loss"
        loss_func = add_source_losses(loss_func, loss_mask, batches.source_id, state.cfg.dataset)
    router_inputs = {}
    if routing is not None and routing.padding_mask is not None:
        router_inputs["padding_mask"] = routing.model_padding_mask(model, config, pg_collection)
    if return_schedule_plan:  # MoE expert-parallel communication overlap (bridge_sft.train rejects router losses)
        loss_head.log_not_in_schedule_plan(model)
        plan = model.build_schedule_plan(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask,
                                         **router_inputs)
        return plan, loss_func
    # The fused loss head through GPTModel's output_processor hook, unless it is off or cannot apply
    # (then megatron-core's own output layer + cross-entropy; bridge_sft.loss_head logs why, once).
    processor = loss_head.output_processor_for(model) if labels is not None else None
    output = model(
        input_ids=tokens,
        position_ids=position_ids,
        attention_mask=attention_mask,
        labels=labels,
        packed_seq_params=packed_seq_params,
        **router_inputs,
        **({"output_processor": processor} if processor is not None else {}),
    )
    if routing is not None:
        routing.weight_router_losses(output, config, pg_collection)
    return output, loss_func
