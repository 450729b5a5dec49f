"""Driver: the fused loss head (bridge_sft.loss_head) against megatron-core's own loss path.

Usage: ``loss_head_parity.py OUT_JSON`` (one process, TP=1) or under ``torchrun --nproc-per-node 2``
(TP=2 on gloo: vocabulary-parallel output layer, with and without sequence parallel; then PP=2 through
megatron-core's 1F1B schedule: ``model_pp``). Real
megatron-core GPTModels built by Megatron-Bridge's ``GPTModelProvider`` on the CPU runtime (local
layers, packed attention through ``bridge_sft.runtime``). Rank 0 writes ``{case: {metric: value}}``:

- ``head_*``: the output layer alone, on random hidden states ``[s, b, h]`` (leaf tensors): megatron-core's
  ``compute_language_model_loss(labels, output_layer(hidden)[0])`` vs ``loss_head.fused_loss`` in chunks
  of 16 tokens (the 74 tokens do not divide into chunks). Both backward through ``sum(losses * w)``, ``w``
  a mask-like weight with zeros (tokens outside ``loss_mask``) and unequal values. Reported: max |diff|
  of the per-token losses, of the hidden-state gradients and of the output-weight gradients, and the
  scales (max |value|) of each;
- ``model_*``: the whole model, ``model(..., labels=labels)`` vs the same call with
  ``output_processor=loss_head.output_processor_for(model, chunk_tokens=16)``: per-token losses and
  the gradients of every parameter (embedding, tied output weight, layers);
- ``all_masked``: ``w = 0`` everywhere: both paths' gradients must be exactly zero;
- ``main_grad``: the gradient-accumulation-fusion protocol (``weight.main_grad``, a dummy gradient
  flagged ``grad_added_to_main_grad``), against megatron-core's plain weight gradient;
- ``fallback``: ``unsupported_reason`` and the log records of ``output_processor_for`` for models the
  head cannot express (Gemma 2's soft-capping output layer as Bridge installs it, MTP), and that
  ``fused_loss_head=False`` turns it off;
- ``recipe``: the recipe argument ``fused_loss_head`` as the CLI resolves it (default on; ``=false``),
  after Bridge's own processing of dotted overrides.

Across TP ranks each metric is the maximum over ranks (diffs) or ranks agree by construction.
"""

import contextlib
import json
import logging
import os
import sys

import torch

from bridge_sft import runtime

runtime.enable()

import torch.nn.functional as F  # noqa: E402
from megatron.bridge.models.gpt_provider import GPTModelProvider  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402

from bridge_sft import loss_head  # noqa: E402

VOCAB, HIDDEN, SEQ, BATCH, CHUNK = 1000, 64, 40, 2, 16


def build(tp: int, dtype=torch.float32, tied=False, seed=0, pp: int = 1):
    provider = GPTModelProvider(
        num_layers=pp, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=4, num_query_groups=2,
        vocab_size=VOCAB, seq_length=SEQ, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        position_embedding_type="rope", share_embeddings_and_output_weights=tied, add_bias_linear=False,
        make_vocab_size_divisible_by=128, bf16=dtype == torch.bfloat16, params_dtype=dtype, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype if pp > 1 else None,
    )
    runtime.configure_model(provider)
    provider.finalize()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False, mixed_precision_wrapper=None)
    model.train()
    return model


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def scale(t):
    return t.float().abs().max().item()


def token_weights(shape, gen, zero_share=0.3):
    w = torch.rand(shape, generator=gen) + 0.5
    return w.masked_fill(torch.rand(shape, generator=gen) < zero_share, 0.0)


@contextlib.contextmanager
def current_device_is_cpu():
    """megatron-core's sequence-parallel backward passes allocate on ``torch.cuda.current_device()`` (0 on
    the CPU runtime). Backward passes run outside the CPU runtime's TorchFunctionMode (``loss.backward()``
    goes through the mode, and a mode is off while its own handler runs), so that would mean CUDA: here the
    current device is the CPU itself (a stand-in for a GPU-only call, local to the sequence-parallel case)."""
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = original


def sequence_parallel_output_layer(model):
    """The output layer as megatron-core builds it with sequence_parallel=True (input all-gathered along the
    sequence, gradient reduce-scattered; no all-reduce). A whole model cannot be built with sequence
    parallelism here: the output layer alone is the part the fused head replaces."""
    model.output_layer.sequence_parallel = True
    model.output_layer.allreduce_dgrad = False
    return model


def head_case(model, gen, dtype, sequence_parallel=False, zero_weights=False):
    """Output layer alone: megatron-core's path vs fused_loss."""
    layer = model.output_layer
    tp = parallel_state.get_tensor_model_parallel_world_size()
    s_local = SEQ // tp if sequence_parallel else SEQ
    hidden_full = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(dtype)
    rank = parallel_state.get_tensor_model_parallel_rank()
    hidden_in = hidden_full[rank * s_local:(rank + 1) * s_local] if sequence_parallel else hidden_full
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    w = torch.zeros(BATCH, SEQ) if zero_weights else token_weights((BATCH, SEQ), gen)

    def run(fused):
        layer.weight.grad = None
        hidden = hidden_in.clone().requires_grad_()
        if fused:
            losses = loss_head.fused_loss(hidden, labels, layer, chunk_tokens=CHUNK)
        else:
            logits, _ = layer(hidden)
            losses = model.compute_language_model_loss(labels, logits)
        (losses * w).sum().backward()
        return losses.detach(), hidden.grad, layer.weight.grad.clone()

    ref, ours = run(False), run(True)
    extra = {}
    if dtype != torch.float32 and parallel_state.get_tensor_model_parallel_world_size() == 1:
        # Both against fp64 on the same low-precision inputs: the accuracy each path has.
        hidden64 = hidden_in.double().requires_grad_()
        weight64 = layer.weight.detach().double().requires_grad_()
        logits64 = (hidden64 @ weight64.t()).transpose(0, 1)  # [b, s, V]
        losses64 = torch.logsumexp(logits64, -1) - logits64.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (losses64 * w).sum().backward()
        paths = {"loss": (ours[0], ref[0], losses64), "hidden_grad": (ours[1], ref[1], hidden64.grad),
                 "weight_grad": (ours[2], ref[2], weight64.grad)}
        for name, (a, b, exact) in paths.items():
            extra[f"{name}_err_vs_fp64"] = max_diff(a.double(), exact)
            extra[f"ref_{name}_err_vs_fp64"] = max_diff(b.double(), exact)
    return {**extra,
        "loss_diff": max_diff(ours[0], ref[0]), "loss_scale": scale(ref[0]),
        "loss_dtype": str(ours[0].dtype), "ref_loss_dtype": str(ref[0].dtype),
        "hidden_grad_diff": max_diff(ours[1], ref[1]), "hidden_grad_scale": scale(ref[1]),
        "weight_grad_diff": max_diff(ours[2], ref[2]), "weight_grad_scale": scale(ref[2]),
        "hidden_grad_dtype": str(ours[1].dtype), "weight_grad_dtype": str(ours[2].dtype),
    }


def model_case(model, gen, packed=False, zero_weights=False):
    """Whole model: model(..., labels) vs the same call with the fused head as output_processor."""
    b = 1 if packed else BATCH
    tokens = torch.randint(0, VOCAB, (b, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (b, SEQ), generator=gen)
    w = torch.zeros(b, SEQ) if zero_weights else token_weights((b, SEQ), gen)
    kwargs = {}
    if packed:  # three sequences and 4 slots of padding, THD
        cu = torch.tensor([0, 9, 25, 36, 40], dtype=torch.int32)
        kwargs["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                      max_seqlen_q=16, max_seqlen_kv=16)
        positions = torch.cat([torch.arange(int(e - s)) for s, e in zip(cu[:-1], cu[1:])])[None]
    else:
        positions = torch.arange(SEQ).expand(b, SEQ)
    processor = loss_head.output_processor_for(model, chunk_tokens=CHUNK)
    assert processor is not None, loss_head.unsupported_reason(model)

    def run(fused):
        model.zero_grad(set_to_none=True)
        extra = {"output_processor": processor} if fused else {}
        losses = model(tokens, positions, None, labels=labels, **kwargs, **extra)
        (losses * w).sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ref_losses, ref_grads), (losses, grads) = run(False), run(True)
    assert grads.keys() == ref_grads.keys(), (sorted(grads), sorted(ref_grads))
    grad_diffs = {n: max_diff(grads[n], ref_grads[n]) for n in grads}
    out = {
        "loss_diff": max_diff(losses, ref_losses), "loss_scale": scale(ref_losses),
        "shape": list(losses.shape), "params_with_grads": len(grads),
        "grad_diff": max(grad_diffs.values()), "grad_scale": max(scale(g) for g in ref_grads.values()),
        "max_abs_grad": max(scale(g) for g in grads.values()),
        "output_weight_grad_diff": grad_diffs.get("output_layer.weight",
                                                  grad_diffs.get("embedding.word_embeddings.weight")),
    }
    return out


def main_grad_case(model, gen):
    """gradient_accumulation_fusion: the weight gradient lands in main_grad, a flagged dummy is returned."""
    layer = model.output_layer
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    w = token_weights((BATCH, SEQ), gen)
    layer.weight.grad = None
    logits, _ = layer(hidden)
    (model.compute_language_model_loss(labels, logits) * w).sum().backward()
    ref = layer.weight.grad.clone()
    layer.weight.grad = None
    before = torch.randn(layer.weight.shape, generator=gen)
    layer.weight.main_grad = before.clone()
    layer.weight.grad_added_to_main_grad = False
    layer.gradient_accumulation_fusion = True
    try:
        (loss_head.fused_loss(hidden, labels, layer, chunk_tokens=CHUNK) * w).sum().backward()
        return {"main_grad_diff": max_diff(layer.weight.main_grad - before, ref), "scale": scale(ref),
                "flagged": bool(layer.weight.grad_added_to_main_grad),
                "dummy_grad_shape": list(layer.weight.grad.shape)}
    finally:
        layer.gradient_accumulation_fusion = False
        del layer.weight.main_grad, layer.weight.grad_added_to_main_grad
        layer.weight.grad = None


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def fallback_case():
    from megatron.bridge.models.gemma.gemma2_provider import Gemma2OutputLayer
    from megatron.bridge.models.gemma.modules import extend_instance

    handler = Records()
    logging.getLogger("bridge_sft.loss_head").addHandler(handler)
    logging.getLogger("bridge_sft.loss_head").setLevel(logging.INFO)
    out = {}

    def decide(name, model):
        start = len(handler.records)
        processors = [loss_head.output_processor_for(model) for _ in range(3)]  # three micro-batches
        out[name] = {"reason": loss_head.unsupported_reason(model), "processor": processors[0] is not None,
                     "same_every_call": len({p is None for p in processors}) == 1,
                     "log": handler.records[start:]}

    plain = build(1)
    decide("plain", plain)
    softcap = build(1)
    softcap.config.final_logit_softcapping = 30.0  # what Bridge's Gemma 2 provider sets, with the layer below
    extend_instance(softcap.output_layer, Gemma2OutputLayer)
    decide("gemma2_softcap", softcap)
    layer_only = build(1)
    extend_instance(layer_only.output_layer, Gemma2OutputLayer)  # the replaced forward alone is detected too
    layer_only.config.final_logit_softcapping = None
    decide("replaced_output_layer", layer_only)
    mtp = build(1)
    mtp.config.mtp_num_layers = 1
    decide("mtp", mtp)
    off = build(1)
    off.config.fused_loss_head = False
    decide("off", off)
    return out


def pipeline_case(gen):
    """PP=2 (one layer per stage, tied embeddings), megatron-core's 1F1B schedule over 2 micro-batches: the
    fused head runs on the last stage only, its hidden-state gradient goes back to the first stage. Each
    rank compares its own stage's parameter gradients and (last stage) the losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build(1, tied=True, pp=2)
    processor = loss_head.output_processor_for(model, chunk_tokens=CHUNK)
    batches = []
    for _ in range(2):
        batches.append({"tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
                        "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
                        "w": token_weights((BATCH, SEQ), gen)})
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    def run(fused):
        model.zero_grad(set_to_none=True)
        losses = []

        def forward_step(data_iterator, model_chunk):
            batch = next(data_iterator)
            extra = {"output_processor": processor} if fused else {}
            output = model_chunk(batch["tokens"], positions, None, labels=batch["labels"], **extra)

            def loss_func(output_tensor):
                losses.append(output_tensor.detach().clone())
                loss = (output_tensor * batch["w"]).sum()
                return loss, {"loss": loss.detach()}

            return output, loss_func

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                    num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=BATCH)
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ref_losses, ref_grads), (losses, grads) = run(False), run(True)
    assert grads.keys() == ref_grads.keys() and grads, (sorted(grads), sorted(ref_grads))
    last = parallel_state.is_pipeline_last_stage()
    return {
        "loss_diff": max((max_diff(a, b) for a, b in zip(losses, ref_losses)), default=0.0),
        "losses_on_last_stage": len(losses) if last else -1,
        "grad_diff": max(max_diff(grads[n], ref_grads[n]) for n in grads),
        "grad_scale": max(scale(g) for g in ref_grads.values()),
        "stage_params_with_grads": len(grads),
        "processor_on_last_stage": processor is not None if last else None,
    }


def recipe_case(tmp_dir):
    """The recipe argument reaches the model config and survives Bridge's override processing."""
    from bridge_sft.recipes.resolve import build_config
    from bridge_sft.tiny import build_tiny_model

    hf = build_tiny_model(os.path.join(tmp_dir, "tiny"), arch="llama")
    overrides = [f"hf_path={hf}", f"output_dir={tmp_dir}/run", "train.train_iters=3", "model.seq_length=256"]
    default = build_config("tiny", overrides)
    off = build_config("tiny", overrides + ["fused_loss_head=false"])
    return {"default": getattr(default.model, "fused_loss_head", None), "off": off.model.fused_loss_head,
            "train_iters": off.train.train_iters}


def main(out_path):
    torchrun = "RANK" in os.environ
    if torchrun:
        torch.distributed.init_process_group("gloo")
    else:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    tp = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank: same inputs
    result = {}
    if tp == 1:
        result["head_fp32"] = head_case(build(1), gen, torch.float32)
        result["all_masked"] = head_case(build(1), gen, torch.float32, zero_weights=True)
        result["head_bf16"] = head_case(build(1, dtype=torch.bfloat16), gen, torch.bfloat16)
        result["model_tied"] = model_case(build(1, tied=True), gen)
        result["model_packed"] = model_case(build(1, tied=True), gen, packed=True)
        result["model_all_masked"] = model_case(build(1), gen, zero_weights=True)
        result["main_grad"] = main_grad_case(build(1), gen)
        result["fallback"] = fallback_case()
        result["recipe"] = recipe_case(os.path.dirname(os.path.abspath(out_path)))
    else:
        result["head_tp"] = head_case(build(tp), gen, torch.float32)
        with current_device_is_cpu():
            result["head_tp_sp"] = head_case(sequence_parallel_output_layer(build(tp)), gen, torch.float32,
                                             sequence_parallel=True)
        result["model_tp"] = model_case(build(tp), gen)
        result["model_tp_tied"] = model_case(build(tp, tied=True), gen)
        result["model_tp_packed"] = model_case(build(tp, tied=True), gen, packed=True)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=tp)
        pipeline = pipeline_case(gen)
        rank_facts = [None] * tp
        torch.distributed.all_gather_object(rank_facts, pipeline)
        result["model_pp"] = {
            "loss_diff": max(f["loss_diff"] for f in rank_facts),
            "grad_diff": max(f["grad_diff"] for f in rank_facts),
            "grad_scale": min(f["grad_scale"] for f in rank_facts),  # each stage's gradients must be real
            "losses_on_last_stage": rank_facts[-1]["losses_on_last_stage"],
            "processor_on_last_stage": rank_facts[-1]["processor_on_last_stage"],
            "stage_params_with_grads": [f["stage_params_with_grads"] for f in rank_facts],
        }
        for case in (c for name, c in result.items() if name != "model_pp"):  # worst rank
            for key, value in case.items():
                if key.endswith(("_diff", "_scale")) or key in ("grad_scale", "max_abs_grad"):
                    t = torch.tensor([value], dtype=torch.float64)
                    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                    case[key] = t.item()
        result["tp"] = tp
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
