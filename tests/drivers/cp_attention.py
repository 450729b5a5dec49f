"""Driver (torchrun, 2 ranks, gloo): context-parallel ``te_torch.DotProductAttention`` against the
1-process attention on the unsplit inputs, fp32, forward and gradients.

Each rank builds the same random q/k/v, splits them as megatron-core does for CP=2 (``sbhd``:
``get_batch_on_this_cp_rank``; packed ``thd``: Bridge's ``get_thd_cp_partition_indices``, which goes
through megatron-core to ``transformer_engine_torch.thd_get_partitioned_indices``, served by te_torch),
runs the attention with megatron-core's CP group, and back-propagates a fixed weighting of the output.
The reference is the same class without a CP group on the whole, unpadded input. Gradients of K/V
come back to their owner rank through the reduce-scatter; the sink parameter's gradient is summed over
the CP ranks (megatron-core all-reduces parameter gradients over DP x CP).

Cases (causal GQA; a 5-token sliding window; learnable sinks with a window) x layouts: ``sbhd``
(24 tokens, batch 2), ``thd`` (three sequences of lengths divisible by 2 x CP) and ``thd_padded``
(lengths 7, 13, 13: each padded to a multiple of 4 as megatron-core requires, ``cu_seqlens_q`` the real
and ``cu_seqlens_q_padded`` the physical boundaries, plus trailing padding; the reference runs the
unpadded pack and its outputs/gradients are compared at the real tokens, the padded slots' gradients
must be 0). Also checks the THD split against megatron-core's own per-sequence zigzag, sequence by
sequence. Rank 0 prints ``FACTS {json}``: per case/layout the max |difference| of outputs and of
q/k/v/sink gradients (max over ranks) and their scales; and ``config_check``: what
``bridge_sft.models.check_provider`` says to CP=2, to fp8 and to hierarchical CP (None: accepted).
"""

import json

import torch

from bridge_sft import runtime


def main():
    runtime.enable()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron.bridge.training.utils.packed_seq_utils import get_thd_cp_partition_indices

    from bridge_sft.runtime.te_torch import DotProductAttention

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    group = parallel_state.get_context_parallel_group()
    rank = torch.distributed.get_rank(group)

    def zigzag(n: int) -> torch.Tensor:  # megatron-core's unpacked split of positions 0..n-1
        return get_batch_on_this_cp_rank({"idx": torch.arange(n).unsqueeze(0), "cu_seqlens": None},
                                         is_hybrid_cp=False, cp_group=group)["idx"][0]

    def thd_split(bounds: list[int]) -> torch.Tensor:
        index = get_thd_cp_partition_indices(torch.tensor(bounds, dtype=torch.int32), total_tokens=bounds[-1],
                                             cp_group=group, device=torch.device("cpu"))
        per_sequence = torch.cat([a + zigzag(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
        assert torch.equal(index, per_sequence), (bounds, index, per_sequence)
        return index

    def max_over_ranks(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    cases = {"causal_gqa": {}, "window": {"window_size": (5, 0)},
             "sinks_window": {"window_size": (5, 0), "softmax_type": "learnable"}}
    gen = torch.Generator().manual_seed(0)
    facts = {}
    for name, extra in cases.items():
        def attention(cp: bool) -> DotProductAttention:
            module = DotProductAttention(4, 16, num_gqa_groups=2, attention_dropout=0.0, device="cpu",
                                         window_size=extra.get("window_size"),
                                         softmax_type=extra.get("softmax_type", "vanilla"),
                                         cp_group=group if cp else None, cp_comm_type="p2p")
            if module.softmax_type == "learnable":
                with torch.no_grad():
                    module.softmax_offset.copy_(torch.linspace(-1.0, 1.5, 4))
            return module

        def run(module, inputs, weight, **kwargs):
            q, k, v = (x.clone().requires_grad_() for x in inputs)
            out = module(q, k, v, None, **kwargs)
            (out * weight).sum().backward()
            sink = [] if module.softmax_type == "vanilla" else [module.softmax_offset.grad.clone()]
            return out.detach(), [q.grad, k.grad, v.grad], sink

        def compare(layout, ours, reference):
            (out, grads, sink), (ref_out, ref_grads, ref_sink) = ours, reference
            if sink:
                torch.distributed.all_reduce(sink[0], group=group)  # as megatron reduces parameter gradients
            pairs = list(zip(grads + sink, ref_grads + ref_sink))
            facts[f"{name}/{layout}"] = {
                "out_diff": max_over_ranks((out - ref_out).abs().max().item()),
                "out_scale": ref_out.abs().max().item(),
                "grad_diff": max_over_ranks(max((a - b).abs().max().item() for a, b in pairs)),
                "grad_scale": min(b.abs().max().item() for _, b in pairs),
            }

        # sbhd: [s, b, heads, dim], split along s.
        inputs = [torch.randn(24, 2, heads, 16, generator=gen) for heads in (4, 2, 2)]
        weight = torch.randn(24, 2, 64, generator=gen)
        ref_out, ref_grads, ref_sink = run(attention(False), inputs, weight)
        idx = zigzag(24)
        ours = run(attention(True), [x[idx] for x in inputs], weight[idx])
        compare("sbhd", ours, (ref_out[idx], [g[idx] for g in ref_grads], ref_sink))

        # thd, every sequence a multiple of 2 x CP (and the pack): cu_seqlens only.
        bounds = [0, 8, 20, 40]
        inputs = [torch.randn(40, heads, 16, generator=gen) for heads in (4, 2, 2)]
        weight = torch.randn(40, 64, generator=gen)
        cu = torch.tensor(bounds, dtype=torch.int32)
        thd = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, attn_mask_type="padding_causal")
        ref_out, ref_grads, ref_sink = run(attention(False), inputs, weight, **thd)
        idx = thd_split(bounds)
        ours = run(attention(True), [x[idx] for x in inputs], weight[idx], **thd)
        compare("thd", ours, (ref_out[idx], [g[idx] for g in ref_grads], ref_sink))

        # thd_padded: real lengths 7, 13, 13 padded to 8, 16, 16, then 8 slots of trailing padding (48).
        real, padded = [0, 7, 20, 33, 33], [0, 8, 24, 40, 48]
        slots = torch.cat([torch.arange(p, p + (b - a)) for a, b, p in zip(real[:-1], real[1:], padded)])
        inputs = [torch.randn(33, heads, 16, generator=gen) for heads in (4, 2, 2)]
        weight = torch.randn(33, 64, generator=gen)
        cu = torch.tensor(real[:-1], dtype=torch.int32)
        ref_out, ref_grads, ref_sink = run(attention(False), inputs, weight, qkv_format="thd", cu_seqlens_q=cu,
                                           cu_seqlens_kv=cu, attn_mask_type="padding_causal")

        def to_padded(x: torch.Tensor) -> torch.Tensor:  # real tokens into their slots, zeros elsewhere
            out = x.new_zeros(48, *x.shape[1:])
            out[slots] = x
            return out

        cu_real, cu_padded = torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)
        idx = thd_split(padded)
        gen_pad = torch.Generator().manual_seed(1)  # padding slots hold garbage, as after an embedding
        padded_inputs = [to_padded(x) + (to_padded(torch.ones_like(x)) == 0) * torch.randn(48, *x.shape[1:],
                                                                                           generator=gen_pad)
                         for x in inputs]
        out, grads, sink = run(attention(True), [x[idx] for x in padded_inputs], to_padded(weight)[idx],
                               qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                               cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                               attn_mask_type="padding_causal")
        real_here = (to_padded(torch.ones(33)) != 0)[idx]  # this rank's real-token rows
        out = torch.where(real_here[:, None], out, torch.zeros_like(out))  # outputs at padding: unspecified
        compare("thd_padded", (out, grads, sink),
                (to_padded(ref_out)[idx], [to_padded(g)[idx] for g in ref_grads], ref_sink))
    facts["config_check"] = config_check()
    if torch.distributed.get_rank() == 0:
        print("FACTS " + json.dumps(facts))
    torch.distributed.destroy_process_group()


def config_check() -> dict:
    from types import SimpleNamespace

    from bridge_sft.models import UnsupportedModelError, check_provider

    result = {}
    for name, extra in {"cp2": {}, "fp8": {"fp8": "hybrid"}, "cp_comm_type": {"cp_comm_type": "a2a+p2p"}}.items():
        model = SimpleNamespace(**{"context_parallel_size": 2, "cp_comm_type": "p2p", "fp8": None, "fp4": None,
                                   **extra})
        try:
            check_provider(model)
            result[name] = None
        except UnsupportedModelError as exc:
            result[name] = str(exc)
    return result


if __name__ == "__main__":
    main()
