"""Watching the model learn: its greedy answers to a few fixed held-out prompts at every evaluation.

``EvalSamples`` (a Bridge callback, added by ``bridge_sft.train.run`` when the dataset provider has
``eval_samples > 0``) takes the first ``eval_samples`` held-out samples of the validation split, as training
encoded them: the prompt is a sample's tokens up to its first supervised token (the conversation up to the
first trained assistant turn, rendered by the chat template exactly as in training, generation prompt
included), the reference is that turn's supervised span. At the end of each evaluation the Megatron model of
the training process (no export) answers each prompt greedily, stopping at the template's end-of-turn token
(the last token of the reference span) or the tokenizer's end of sequence, and the prompt's last words,
the answer and the reference go to the console (or rank 0's output), the rank logs and TensorBoard
(``eval_samples/N`` text).

Decoding recomputes the whole sequence for every new token (no KV cache): a few prompts of a few dozen
tokens cost a few hundred forward passes per evaluation (``benchmarks/eval_samples.py`` measures it).
Every rank decodes the same prompts (tensor- and expert-parallel layers need all their ranks); pipeline
and context parallelism are refused at config time (``check``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.bridge.training.callbacks import Callback

SHOWN_CHARS = 160  # of the prompt's end and of each answer, on the console


@dataclass
class HeldOutPrompt:
    """A prompt (token ids, the template's generation prompt included), its reference answer ids (the first
    supervised span, ending with the end-of-turn token) and where they came from."""

    prompt: list[int]
    reference: list[int]


def held_out_prompts(samples: list[tuple[list[int], list[int]]]) -> list[HeldOutPrompt]:
    """Prompt/reference pairs of ``(ids, loss_mask)`` samples (the mask aligned with the ids); samples
    whose first token is already supervised (``train_on=all``) have no prompt and are left out."""
    prompts = []
    for ids, mask in samples:
        start = next((i for i, m in enumerate(mask) if m), None)
        if not start:
            continue
        end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
        prompts.append(HeldOutPrompt(list(ids[:start]), list(ids[start:end])))
    return prompts


def check(config) -> None:
    """``eval_samples`` needs a model that one process can run to the logits: no PP, no CP."""
    n = getattr(config.dataset, "eval_samples", 0)
    if not n:
        return
    pp, cp = config.model.pipeline_model_parallel_size, config.model.context_parallel_size
    if pp > 1 or cp > 1:
        raise ValueError(f"eval_samples={n} decodes with the model of the training process, which needs the whole "
                         f"model on each rank's pipeline and the whole sequence (pipeline_parallel={pp}, "
                         f"context_parallel={cp}). Set eval_samples=0, or use `bridge-sft eval` on a checkpoint.")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def greedy_answer(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int], vocab_size: int) -> list[int]:
    """Greedy continuation of ``prompt`` by a megatron-core GPT model (eval mode), at most ``max_new_tokens``
    ids, the stop id included when reached. ``vocab_size``: ids at or above it (vocabulary padding) are never
    chosen."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    answer: list[int] = []
    for _ in range(max_new_tokens):
        positions = torch.arange(tokens.size(1), device=device)[None]
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        if getattr(model.config, "tensor_model_parallel_size", 1) > 1:  # vocabulary-parallel logits
            logits = gather_from_tensor_model_parallel_region(logits)
        next_id = int(logits[0, -1, :vocab_size].argmax())
        answer.append(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return answer


def _text(tokenizer, ids: list[int]) -> str:
    """``ids`` as one line of text; special tokens (turn headers, end of turn) become spaces, so that
    ``<|start_header_id|>user<|end_header_id|>Hi`` reads ``user Hi``."""
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces, run = [], []
    for i in [*ids, None]:
        if i is None or i in specials:
            if run:
                pieces.append(tokenizer.decode(run))
            run = []
        else:
            run.append(i)
    return re.sub(r"\s+", " ", " ".join(pieces)).strip()


def _clip(text: str, head: bool) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return text[:SHOWN_CHARS] + "…" if head else "…" + text[-SHOWN_CHARS:]


class EvalSamples(Callback):
    """Greedy answers to ``count`` fixed held-out prompts after each evaluation (see the module docstring).
    ``console``: a ``TrainConsole`` to show them on (else rank 0 prints them). ``answers``: every round, as
    ``(iteration, [answer ids, ...])``."""

    def __init__(self, count: int, max_new_tokens: int = 48, console=None):
        self.count, self.max_new_tokens, self.console = count, max_new_tokens, console
        self.prompts: list[HeldOutPrompt] | None = None
        self.tokenizer = None
        self.answers: list[tuple[int, list[str]]] = []

    def _setup(self, config) -> None:
        from transformers import AutoTokenizer

        dataset = config.dataset
        self.prompts = held_out_prompts(dataset.held_out_samples(self.count))
        self.tokenizer = AutoTokenizer.from_pretrained(str(dataset.tokenizer_path))  # to decode ids only

    def on_eval_end(self, context) -> None:
        state = context.state
        if self.prompts is None:
            self._setup(state.cfg)
        model, vocab = _unwrap(context.model[0]), len(self.tokenizer)
        eos = {self.tokenizer.eos_token_id} - {None}
        iteration = state.train_state.step
        if self.answers and self.answers[-1][0] == iteration:  # the evaluation after training: same weights
            return
        with torch.no_grad():
            answers = [greedy_answer(model, p.prompt, self.max_new_tokens, eos | {p.reference[-1]}, vocab)
                       for p in self.prompts]
        self.answers.append((iteration, answers))
        if int(torch.distributed.get_rank()) != 0:
            return
        writer = getattr(state, "tensorboard_logger", None)
        for i, (p, ids) in enumerate(zip(self.prompts, answers), 1):
            prompt, reference = _text(self.tokenizer, p.prompt), _text(self.tokenizer, p.reference)
            answer = _text(self.tokenizer, ids)
            lines = [f"sample {i}/{len(answers)} at iteration {iteration}: …{_clip(prompt, head=False)}",
                     f"  answer:    {_clip(answer, head=True)}", f"  reference: {_clip(reference, head=True)}"]
            if self.console is not None:
                for line in lines:
                    self.console.say(line)
            else:
                print("\n".join(f"[bridge-sft] {line}" for line in lines), flush=True)
            if writer is not None:
                writer.add_text(f"eval_samples/{i}", f"**prompt** {prompt}\n\n**answer** {answer}\n\n"
                                f"**reference** {reference}", iteration)
