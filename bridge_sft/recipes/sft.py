"""The generic SFT recipe: an HF checkpoint and chat data in, a Bridge ``ConfigContainer`` out.

Like Bridge's own recipe functions, ``sft()`` is a plain function returning a
plain config; every field can be changed afterwards (or from the command line
with ``key=value`` overrides). What it always sets, and the reason:

- ``model.calculate_per_token_loss=True`` and ``ddp.average_in_collective=False``:
  the loss is a true mean over the supervised tokens of the global batch
  (``bridge_sft.train.use_per_token_loss``);
- ``checkpoint.pretrained_checkpoint=hf_path``: Bridge loads the HF weights
  directly at start-up, no conversion step;
- ``checkpoint.load == checkpoint.save``: re-running the same command resumes;
- ``model.fused_loss_head`` (recipe argument ``fused_loss_head``, default on): the
  forward step computes the output projection and cross-entropy in chunks of tokens
  without holding the logits (``bridge_sft.loss_head``; same per-token losses as
  megatron-core's path). It is an attribute the forward step reads from the model
  config, not a field of Bridge's provider: set it with the recipe argument.
"""

from __future__ import annotations

import os

import torch
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedInitConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.data.base import DatasetProvider
from megatron.core.distributed import DistributedDataParallelConfig

from bridge_sft import loss_head
from bridge_sft.models import megatron_provider
from bridge_sft.train import use_per_token_loss

PRECISIONS = ("bf16-mixed", "fp16-mixed", "fp32")


def sft(
    hf_path: str,
    data: str | list | None = None,
    *,
    dataset: DatasetProvider | None = None,
    output_dir: str = "outputs/sft",
    seq_length: int = 2048,
    validation_data: str | list[str] | None = None,
    validation_samples: int = 200,
    validation_fraction: float | None = None,
    packing: bool = True,
    padding: str = "longest",
    mix_by: str = "samples",
    train_on: str = "assistant",
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    micro_batch_size: int = 1,
    global_batch_size: int = 32,
    train_iters: int = 1000,
    lr: float = 5e-6,
    min_lr: float = 0.0,
    warmup_iters: int = 50,
    weight_decay: float = 0.1,
    adam_beta2: float = 0.98,
    clip_grad: float = 1.0,
    precision: str = "bf16-mixed",
    distributed_optimizer: bool = True,
    peft: str | None = None,
    lora_dim: int = 32,
    lora_alpha: int = 32,
    lora_targets: list[str] | None = None,
    eval_interval: int | None = 100,
    eval_iters: int = 8,
    eval_samples: int = 0,
    eval_sample_tokens: int = 48,
    save_interval: int | None = 100,
    save_hf: bool = False,
    log_interval: int = 1,
    seed: int = 1234,
    fused_loss_head: bool = loss_head.DEFAULT,
) -> ConfigContainer:
    """Full fine-tuning (or LoRA with ``peft="lora"``) of the HF model at ``hf_path``.

    ``data``: chat data file(s) or directory for ``SFTDatasetProvider``, or several
    weighted sources (``["chat.jsonl:0.7", "code.jsonl:0.3"]``, ``PATH:Nx`` for epochs, or
    ``{path, weight, format, columns, train_on, system_prompt, validation}`` mappings),
    mixed by ``mix_by`` (``"samples"`` or ``"tokens"``; see ``bridge_sft.data.mixing``);
    or pass a ready ``dataset`` provider. Validation uses ``validation_data``, or else
    ``validation_samples`` of ``data`` (of each source; at most a fifth of it) held out, chosen with
    ``seed`` (``validation_fraction``, if given, holds out that share instead). 200 by default: a
    fixed number, so that small data keeps most of itself for training and large data does not spend
    its evaluations on thousands of samples (one pass over 200 costs a few training steps' worth of
    forward passes). Every evaluation covers the whole
    held-out set once (``bridge_sft.train.plan_full_validation``): ``eval_iters`` is then derived
    from its size, and is used as given only with another ``dataset`` provider. ``eval_samples``: at each
    evaluation, the greedy answers (at most ``eval_sample_tokens`` tokens) to that many fixed held-out
    prompts, from the model being trained (``bridge_sft.eval_samples``).
    ``padding`` (``packing=False``): ``"longest"`` pads each micro-batch to its longest
    sample (a multiple of 64 and of the parallelism's needs; pipeline stages then
    exchange shapes, ``model.variable_seq_lengths``), ``"seq_length"`` pads every sample
    to ``seq_length``.
    ``precision``: ``"bf16-mixed"``, ``"fp16-mixed"`` or ``"fp32"``. Outputs
    (checkpoints, TensorBoard logs, data cache) go under ``output_dir``.
    ``expert_parallel`` / ``expert_tensor_parallel``: how a mixture-of-experts model's experts are
    split (megatron's EP and ETP; ETP 1 as in Bridge's MoE recipes). ``lora_targets``: the
    linear layers LoRA adapts (default: attention and MLP, which in an MoE model includes the experts).
    ``save_hf``: with every checkpoint also write the HF weights to
    ``checkpoints/iter_N/hf`` (Bridge's ``also_save_hf_checkpoint``; LoRA runs write
    an HF PEFT adapter there, ``bridge-sft convert export`` merges it).
    ``fused_loss_head``: the memory-efficient loss head (``bridge_sft.loss_head``); ``False`` for
    megatron-core's output layer + cross-entropy over the full logits.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if peft not in (None, "none", "lora"):
        raise ValueError(f"peft must be None or 'lora', not {peft!r}")
    if (data is None) == (dataset is None):
        raise ValueError("give exactly one of data= (files for SFTDatasetProvider) or dataset= (a provider)")

    model = megatron_provider(hf_path)
    model.seq_length = seq_length
    model.fused_loss_head = fused_loss_head  # read by bridge_sft.step (not a provider field: see above)
    model.tensor_model_parallel_size = tensor_parallel
    model.pipeline_model_parallel_size = pipeline_parallel
    model.context_parallel_size = context_parallel
    model.sequence_parallel = sequence_parallel
    model.expert_model_parallel_size = expert_parallel
    model.expert_tensor_parallel_size = expert_tensor_parallel
    model.pipeline_dtype = torch.bfloat16 if pipeline_parallel > 1 and precision == "bf16-mixed" else None
    # Micro-batches of different lengths (dynamic padding): pipeline stages must exchange tensor shapes. Bridge's
    # provider turns model.variable_seq_lengths on when it finalizes with PP > 1 and this flag (its in-batch
    # packing's), after megatron-core's own checks, which reject variable lengths with the default MoE dispatcher
    # even for dense models; setting variable_seq_lengths here would trip that check.
    model._enable_in_batch_packing = not packing and padding == "longest"
    if precision == "fp32":
        model.bf16, model.fp16, model.params_dtype = False, False, torch.float32

    if dataset is None:
        from bridge_sft.data.provider import SFTDatasetProvider

        dataset = SFTDatasetProvider(
            data_path=data,
            tokenizer_path=hf_path,
            seq_length=seq_length,
            packing=packing,
            padding=padding,
            mix_by=mix_by,
            train_on=train_on,
            validation_path=validation_data,
            validation_fraction=0.0 if validation_data else (validation_fraction or 0.0),
            validation_samples=0 if validation_data or validation_fraction else validation_samples,
            pad_seq_to_mult=2 * context_parallel if context_parallel > 1 else 1,
            cache_dir=os.path.join(output_dir, "data_cache"),
            seed=seed,
            eval_samples=eval_samples,
            eval_sample_tokens=eval_sample_tokens,
        )

    config = ConfigContainer(
        model=model,
        train=TrainingConfig(
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
        ),
        validation=ValidationConfig(eval_interval=eval_interval, eval_iters=eval_iters),
        optimizer=OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=min_lr,
            weight_decay=weight_decay,
            adam_beta1=0.9,
            adam_beta2=adam_beta2,
            adam_eps=1e-8,
            clip_grad=clip_grad,
            bf16=precision == "bf16-mixed",
            fp16=precision == "fp16-mixed",
            use_distributed_optimizer=distributed_optimizer,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style="cosine",
            lr_warmup_iters=warmup_iters,
            lr_warmup_init=0.0,
            lr_decay_iters=None,  # train_iters
            start_weight_decay=weight_decay,
            end_weight_decay=weight_decay,
            weight_decay_incr_style="constant",
            override_opt_param_scheduler=True,  # as Bridge's recipes: the config, not the checkpoint, sets the schedule
        ),
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=precision != "fp32",
            use_distributed_optimizer=distributed_optimizer,
        ),
        dataset=dataset,
        logger=LoggerConfig(
            log_interval=log_interval, log_throughput=True, tensorboard_dir=os.path.join(output_dir, "tb_logs")
        ),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_path),
        checkpoint=CheckpointConfig(
            save=os.path.join(output_dir, "checkpoints"),
            load=os.path.join(output_dir, "checkpoints"),
            save_interval=save_interval,
            pretrained_checkpoint=hf_path,
            ckpt_format="torch_dist",
            fully_parallel_save=True,
            also_save_hf_checkpoint=save_hf,
        ),
        rng=RNGConfig(seed=seed),
        dist=DistributedInitConfig(),
        mixed_precision=None if precision == "fp32" else precision,  # Bridge's named mixed-precision recipes
        peft=LoRA(target_modules=lora_targets or ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                  dim=lora_dim, alpha=lora_alpha) if peft == "lora" else None,
    )
    return use_per_token_loss(config)
