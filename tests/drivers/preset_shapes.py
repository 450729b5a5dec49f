"""Driver: build every preset's ConfigContainer from a local HF config; print the model shapes as JSON.

Usage: ``preset_shapes.py HF_CONFIGS_DIR DATA_FILE``: ``HF_CONFIGS_DIR/<preset>/config.json`` holds the
published HF config of each preset's model (written by the test; no downloads). Built through
``build_config`` exactly as ``bridge-sft train <preset> hf_path=... data=... --dry-run`` does.
"""

import json
import sys
from pathlib import Path

from bridge_sft.recipes import PRESETS
from bridge_sft.recipes.resolve import build_config
from bridge_sft.train import check_config

FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "vocab_size", "share_embeddings_and_output_weights", "seq_length", "tensor_model_parallel_size",
          "calculate_per_token_loss", "rotary_base", "window_size", "interleaved_attn_pattern",
          "context_parallel_size", "cp_comm_type", "cross_entropy_loss_fusion", "position_embedding_type",
          "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings")
MOE_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
              "moe_layer_freq", "multi_latent_attention", "kv_lora_rank", "expert_model_parallel_size",
              "expert_tensor_parallel_size", "pipeline_model_parallel_size", "sequence_parallel")
MAMBA_FIELDS = ("hybrid_layer_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups",
                "mamba_chunk_size")
GATED_DELTANET_FIELDS = ("experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
                         "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                         "linear_num_value_heads", "rotary_percent", "attention_output_gate",
                         "moe_shared_expert_gate")


def shapes(config):
    model = {name: getattr(config.model, name, None) for name in FIELDS}
    model["average_in_collective"] = config.ddp.average_in_collective
    model["dataset_seq_length"] = config.dataset.seq_length
    model["lr"] = config.optimizer.lr
    model["peft"] = type(config.peft).__name__ if config.peft else None
    model.update({name: getattr(config.model, name, None) for name in MOE_FIELDS + MAMBA_FIELDS
                  + GATED_DELTANET_FIELDS})
    model["global_batch_size"] = config.train.global_batch_size
    model["pad_seq_to_mult"] = config.dataset.pad_seq_to_mult
    model["distributed_optimizer"] = config.optimizer.use_distributed_optimizer
    model["lora"] = [config.peft.target_modules, config.peft.dim, config.peft.alpha] if config.peft else None
    return model


def main(root, data):
    result = {}
    for name in PRESETS:
        hf = str(Path(root) / name)
        full = build_config(name, [f"hf_path={hf}", f"data={data}"])
        try:
            lora = build_config(name, [f"hf_path={hf}", f"data={data}", "peft=lora", "train.train_iters=7"])
        except ValueError as error:  # a preset Bridge has no LoRA recipe for refuses peft=lora, in one line
            if "has no LoRA preset" not in str(error):
                raise
            lora = error
        for config in (full, lora):
            if not isinstance(config, ValueError):
                check_config(config)
        from_yaml = build_config(str(Path(__file__).parents[2] / "recipes" / f"{name}.yaml"),
                                 [f"hf_path={hf}", f"data={data}"])
        refused = isinstance(lora, ValueError)
        result[name] = {"full": shapes(full), "lora": {"refused": str(lora)} if refused else shapes(lora),
                        "lora_train_iters": None if refused else lora.train.train_iters,
                        "yaml": {**shapes(from_yaml), "train_iters": from_yaml.train.train_iters,
                                 "save_interval": from_yaml.checkpoint.save_interval}}
    print("SHAPES " + json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
