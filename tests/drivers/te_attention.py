"""Driver: ``bridge_sft.runtime.te_torch.DotProductAttention`` against megatron-core's own unfused
``DotProductAttention`` (an independent kernel), fp32 on CPU, forward and gradients.

Cases: causal GQA; a sliding window (5 tokens back); learnable attention sinks with a window. Each is
run packed (THD: three sequences and trailing padding in one row, the reference run per sequence)
and unpacked (``sbhd``, batch 2). Prints ``FACTS {json}``: per case and layout, the max |difference|
of the outputs, of the q/k/v (and sink) gradients, their scales, and the output shape.
"""

import json

import torch

from bridge_sft import runtime


def main():
    runtime.enable()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from bridge_sft.runtime.te_torch import DotProductAttention as TorchTEAttention

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cases = {"causal_gqa": {}, "window": {"window_size": (5, 0)},
             "sinks_window": {"window_size": (5, 0), "softmax_type": "learnable"}}
    gen = torch.Generator().manual_seed(0)
    cu = [0, 7, 20, 33]  # and 7 slots of trailing padding up to 40
    facts = {}
    for name, extra in cases.items():
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                   kv_channels=16, attention_dropout=0.0, masked_softmax_fusion=False, **extra)
        reference = DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                        attention_type="self")
        ours = TorchTEAttention(4, 16, num_gqa_groups=2, attention_dropout=0.0, window_size=extra.get("window_size"),
                                softmax_type=extra.get("softmax_type", "vanilla"), device="cpu")
        if extra.get("softmax_type") == "learnable":
            with torch.no_grad():
                reference.softmax_offset.copy_(torch.randn(4, generator=gen))
                ours.softmax_offset.copy_(reference.softmax_offset)

        def grads(module, out, tensors):
            module.zero_grad()
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            sink = [module.softmax_offset.grad] if extra.get("softmax_type") == "learnable" else []
            return out.detach().reshape(-1), [t.grad for t in tensors] + sink

        def compare(layout, ours_result, reference_result, shape):
            (a, ga), (b, gb) = ours_result, reference_result
            facts[f"{name}/{layout}"] = {
                "shape": list(shape), "out_diff": (a - b).abs().max().item(), "out_scale": b.abs().max().item(),
                "grad_diff": max((x - y).abs().max().item() for x, y in zip(ga, gb)),
                "grad_scale": min(y.abs().max().item() for y in gb),
            }

        # THD: [t, heads, dim]; the reference runs [s, 1, heads, dim] per sequence.
        inputs = [torch.randn(40, heads, 16, generator=gen) for heads in (4, 2, 2)]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=13,
                                 max_seqlen_kv=13)
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = ours(q, k, v, None, qkv_format="thd", cu_seqlens_q=params.cu_seqlens_q,
                   cu_seqlens_kv=params.cu_seqlens_kv, attn_mask_type="padding_causal")
        ours_thd = grads(ours, out, (q, k, v))
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        bounds = cu + [40]
        ref = torch.cat([reference(q[a:b].unsqueeze(1), k[a:b].unsqueeze(1), v[a:b].unsqueeze(1), None)[:, 0]
                         for a, b in zip(bounds[:-1], bounds[1:])])
        compare("thd", ours_thd, grads(reference, ref, (q, k, v)), out.shape)

        # sbhd: [s, b, heads, dim]
        inputs = [torch.randn(24, 2, heads, 16, generator=gen) for heads in (4, 2, 2)]
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = ours(q, k, v, None)
        ours_sbhd = grads(ours, out, (q, k, v))
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        compare("sbhd", ours_sbhd, grads(reference, reference(q, k, v, None), (q, k, v)), out.shape)
    print("FACTS " + json.dumps(facts))


if __name__ == "__main__":
    main()
