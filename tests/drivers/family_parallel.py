"""Driver (under torchrun, 2 ranks, gloo): forward losses of MoE families with model parallelism.

Usage: ``torchrun --nproc-per-node 2 family_parallel.py OUT.json HF_DIR [HF_DIR ...]``.

For each HF directory, the Megatron model is built from the HF weights (fp32, CPU runtime) three
times, with megatron's parallel state set up anew each time: no model parallelism (each rank holds
the whole model: the reference), tensor parallel 2 (attention, dense MLPs and experts split over the
ranks), and expert parallel 2 (half the experts on each rank, tokens exchanged by the alltoall
dispatcher). Every layout computes the per-token losses of the same two dialogs through
``model(..., labels=...)``. Rank 0 writes ``{family: {"tp2": max |diff| vs reference, "ep2": ...,
"scale": mean reference loss}}``; a layout ``bridge_sft.models.check_provider`` refuses is recorded as
``"unsupported: <the message>"``, a family that fails as ``{"error": ...}``.
"""

import json
import sys
import traceback
from pathlib import Path

import torch

from bridge_sft import runtime

runtime.enable()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bridge_sft.models import UnsupportedModelError, check_provider, megatron_provider  # noqa: E402

# Experts are not split by tensor parallelism (expert_tensor_parallel_size 1), as Bridge's MoE recipes do.
LAYOUTS = {"reference": {}, "tp2": {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1},
           "ep2": {"expert_model_parallel_size": 2}}


def batch(hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    chats = [[{"role": "user", "content": "Hello, how are you doing today? Tell me about your day."},
              {"role": "assistant", "content": "I am fine, thank you. I read a book and went for a walk."}],
             [{"role": "user", "content": "What is your favourite colour, and why do you like it?"},
              {"role": "assistant", "content": "Blue, because it reminds me of the sea and the summer sky."}]]
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in chats]
    n = min(map(len, ids)) // 2 * 2 + 1  # an even number of positions: sequence parallelism splits them in 2
    n = n if n <= min(map(len, ids)) else n - 2
    ids = torch.tensor([row[:n] for row in ids])
    return ids[:, :-1], ids[:, 1:]


def losses(hf_dir, tokens, labels, layout):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**LAYOUTS[layout])
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    provider = megatron_provider(str(hf_dir), load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.tensor_model_parallel_size = LAYOUTS[layout].get("tensor_model_parallel_size", 1)
    provider.expert_model_parallel_size = LAYOUTS[layout].get("expert_model_parallel_size", 1)
    provider.expert_tensor_parallel_size = LAYOUTS[layout].get("expert_tensor_parallel_size", 1)
    provider.sequence_parallel = provider.tensor_model_parallel_size > 1 and provider.num_moe_experts is not None
    check_provider(provider)
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].eval()
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels).float()


def main(out, hf_dirs):
    torch.distributed.init_process_group("gloo")
    results = {}
    for hf_dir in hf_dirs:
        name = Path(hf_dir).name
        try:
            tokens, labels = batch(hf_dir)
            reference = losses(hf_dir, tokens, labels, "reference")
            results[name] = {"scale": reference.mean().item()}
            for layout in ("tp2", "ep2"):
                try:
                    results[name][layout] = (losses(hf_dir, tokens, labels, layout) - reference).abs().max().item()
                except UnsupportedModelError as exc:  # refused at config time, as a user would see it
                    results[name][layout] = f"unsupported: {exc}"
        except Exception as exc:  # recorded per family so one failure does not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, results[name], flush=True)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
