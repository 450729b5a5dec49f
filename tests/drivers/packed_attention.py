"""Driver: ``PackedDotProductAttention`` (THD packs without TE), SDPA path vs the parent's unfused
kernel, on one packed row of three sequences plus trailing padding, with GQA, in fp32 on CPU.
Prints ``FACTS {json}``: max |difference| of outputs and of q/k/v gradients, and the output shape.
"""

import json

import torch

import bridge_sft.cpu as cpu


def main():
    cpu.enable()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from bridge_sft.no_te import _packed_dot_product_attention_class

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               kv_channels=16, attention_dropout=0.0, masked_softmax_fusion=False)
    attention = _packed_dot_product_attention_class()(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                                      attention_type="self")
    cu = torch.tensor([0, 7, 20, 33], dtype=torch.int32)  # 7 slots of trailing padding after 33
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(40, heads, 16, generator=gen) for heads in (4, 2, 2)]

    def run(use_sdpa):
        attention.use_sdpa = use_sdpa
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = attention(q, k, v, None, packed_seq_params=params)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [x.grad for x in (q, k, v)]

    sdpa, sdpa_grads = run(True)
    unfused, unfused_grads = run(False)
    print("FACTS " + json.dumps({
        "shape": list(sdpa.shape),
        "out_diff": (sdpa - unfused).abs().max().item(),
        "out_scale": unfused.abs().max().item(),
        "grad_diff": max((a - b).abs().max().item() for a, b in zip(sdpa_grads, unfused_grads)),
        "grad_scale": min(g.abs().max().item() for g in unfused_grads),
    }))


if __name__ == "__main__":
    main()
