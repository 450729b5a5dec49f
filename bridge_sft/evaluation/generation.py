"""Batched answers and teacher-forced losses of an HF causal LM.

``generate_answers`` answers many tokenised prompts with HF ``generate``, ``batch_size`` at a time:
prompts sorted by length (longest first, so a batch that does not fit fails first), left-padded with
an attention mask, greedy unless a temperature is given, each answer ending at the first of
``stop_ids`` (the template's end-of-turn / eos tokens) or after ``max_new_tokens``. HF derives the
position ids from the attention mask, so a left-padded prompt is the same computation as the prompt
alone; in fp32 the answers equal one-prompt-at-a-time ``generate`` token for token (tests/test_eval.py).

``reference_losses`` is the supervised loss of reference answers by teacher forcing: for each
sample ``(ids, loss_mask)``, the summed negative log-likelihood (nats, fp32) of the tokens whose
mask is 1 given everything before them (the first token is never a label), and their count.
Only the positions that predict a supervised token go through the output layer (HF's
``logits_to_keep``), so long samples with large vocabularies do not need ``[batch, seq, vocab]`` logits.
"""

from __future__ import annotations

import time
from typing import Callable

Progress = Callable[[int, int], None]  # (answers done, answers in all)


def generation_config(stop_ids: list[int], pad_id: int, max_new_tokens: int, temperature: float = 0.0):
    """The ``transformers.GenerationConfig`` of an evaluation: greedy at temperature 0 (no top-k/top-p)."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                            temperature=temperature if sampling else None, top_p=None, top_k=None,
                            eos_token_id=list(stop_ids), pad_token_id=pad_id)


def until_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first stop token, and whether there was one."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1], True
    return tokens, False


def generate_answers(model, prompts: list[list[int]], *, stop_ids: list[int], pad_id: int, max_new_tokens: int,
                     batch_size: int = 8, temperature: float = 0.0,
                     progress: Progress | None = None) -> list[list[int]]:
    """The generated tokens of each prompt (in the order given), up to and including its stop token."""
    import torch

    config = generation_config(stop_ids, pad_id, max_new_tokens, temperature)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
            attention[row, width - n:] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                 generation_config=config)
        for row, i in enumerate(batch):
            answers[i] = until_stop(out[row, width:].tolist(), stop_ids)[0]
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return answers


def reference_losses(model, samples: list[tuple[list[int], list[int]]], *, pad_id: int,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """``(nll_sum, supervised_tokens)`` per sample ``(ids, loss_mask)`` (module docstring)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        width = max(len(samples[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.zeros((len(batch), width), dtype=torch.bool)  # labels[r, t]: token t is supervised
        for row, i in enumerate(batch):
            tokens, mask = samples[i]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)  # right padding: causal, harmless
            attention[row, : len(tokens)] = 1
            labels[row, 1: len(tokens)] = torch.tensor(mask[1:], dtype=torch.bool)
        # Position t predicts token t + 1: keep the positions that predict a supervised token in some row.
        keep = labels[:, 1:].any(dim=0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                           logits_to_keep=keep.to(device)).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, keep + 1].to(device), reduction="none").cpu()
        chosen = labels[:, keep + 1]
        for row, i in enumerate(batch):
            out[i] = (float(nll[row][chosen[row]].sum()), int(chosen[row].sum()))
    return out


class Throughput:
    """Wall time and counts of one generation pass: ``answers_per_s``, ``tokens_per_s`` (generated tokens)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        self.answers = self.tokens = 0

    def stop(self, answers: list[list[int]]) -> "Throughput":
        self.seconds = time.perf_counter() - self.start
        self.answers, self.tokens = len(answers), sum(map(len, answers))
        return self

    def as_dict(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"seconds": self.seconds, "answers": self.answers, "generated_tokens": self.tokens,
                "answers_per_s": self.answers / s, "tokens_per_s": self.tokens / s}
