"""``bridge-sft chat MODEL``: talk to a model with its chat template, the reply streamed as it is generated.

MODEL is an HF directory (``config.json``, weights, tokenizer), or a Megatron checkpoint
(a training run's ``checkpoints`` folder, whose latest ``iter_N`` is used, or one
``iter_N``), which is first exported to a temporary HF directory with
``bridge_sft.conversion.export_hf`` (the HF model it came from is read from the
checkpoint's ``run_config.yaml``, or given with ``--hf``). A LoRA checkpoint is exported
with the adapters merged.

Interactive by default (an empty line or Ctrl-D ends, ``/reset`` forgets the
conversation); ``--prompt TEXT`` prints one reply and exits, for scripts. The demo's
replies come from the same ``Chat.reply``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from bridge_sft.cli import UserError, enable_runtime


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with an HF model or a Megatron checkpoint",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("model", help="HF directory, or Megatron checkpoint (a run's checkpoints/ or one iter_N)")
    parser.add_argument("--prompt", help="print the reply to this one message and exit")
    parser.add_argument("--system", help="system message at the start of the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 for greedy decoding (default: %(default)s)")
    parser.add_argument("--hf", dest="hf_config", help="for a Megatron checkpoint: the HF model it was trained from "
                        "(default: read from its run_config.yaml)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the GPU if torch sees one (default)")
    parser.set_defaults(func=main)


class Chat:
    """An HF causal LM and its tokenizer, loaded for generation (bf16 on a GPU, fp32 on the CPU)."""

    def __init__(self, hf_dir: str | Path, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if device == "cuda" or device == "auto" and torch.cuda.is_available()
                                   else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        if not self.tokenizer.chat_template:
            raise UserError(f"{hf_dir}: the tokenizer has no chat template; chat needs one (use an Instruct model's "
                            "tokenizer, or train with one).")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(self.device).eval()

    def reply(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
              stream=None) -> str:
        """The model's next assistant message after ``messages`` (OpenAI-style ``{"role", "content"}``).

        ``temperature`` 0 decodes greedily. ``stream(text)`` is called with each piece of
        the reply as it is decoded. Generation stops at the model's end-of-turn token(s).
        """
        import torch
        from transformers import GenerationConfig

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=None, top_k=None, eos_token_id=self.stop_ids(),
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
        streamer = _streamer(self.tokenizer, stream) if stream is not None else None
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=config, streamer=streamer)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))


def _streamer(tokenizer, write):
    """A transformers ``TextStreamer`` that hands each decoded piece of the reply to ``write``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load(model: str, hf_config: str | None = None, device: str = "auto", say=print) -> Chat:
    """``Chat`` for an HF directory, or for a Megatron checkpoint exported to a temporary HF directory
    (``say(text)`` tells the user so)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return Chat(path, device)
    if not path.is_dir():
        raise UserError(f"{model}: no such HF directory or Megatron checkpoint.")
    enable_runtime(device)
    from bridge_sft.cli.convert import recorded_hf_source
    from bridge_sft.recipes.resolve import ConfigError, check_hf_checkpoint

    hf_config = hf_config or recorded_hf_source(model)
    try:
        check_hf_checkpoint(hf_config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    from bridge_sft.conversion import export_hf

    say(f"exporting the Megatron checkpoint {model} to a temporary HF directory (HF model: {hf_config})")
    tmp = Path(tempfile.mkdtemp(prefix="bridge-sft-chat-"))
    try:
        export_hf(model, tmp / "hf", hf_config_dir=hf_config)
        return Chat(tmp / "hf", device)  # the weights are in memory now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> int:
    from bridge_sft.console import TrainConsole

    console = TrainConsole("chat", passthrough=(UserError,))
    with console:  # Bridge's and transformers' loading chatter goes to memory; a failure shows its tail
        console.start_status(f"loading {args.model}")
        chat = load(args.model, args.hf_config, args.device, say=lambda text: console.say(text, error=True))
    if console.failed:
        return 1
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stream": write}
    if args.prompt is not None:
        chat.reply([*messages, {"role": "user", "content": args.prompt}], **options)
        write("\n")
        return 0

    print(f"chatting with {args.model} on {chat.device.type}; an empty line or Ctrl-D ends, /reset starts over",
          file=sys.stderr)
    history = list(messages)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        if not text.strip():
            return 0
        if text.strip() == "/reset":
            history = list(messages)
            continue
        history.append({"role": "user", "content": text})
        write("model> ")
        answer = chat.reply(history, **options)
        write("\n")
        history.append({"role": "assistant", "content": answer})
