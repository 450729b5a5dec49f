"""``evaluate``: one model (and optionally a baseline) answering every held-out assistant turn.

For each model, in turn (one in memory at a time): load it as ``bridge-sft chat`` does
(``bridge_sft.cli.chat.load``: an HF directory, or a Megatron checkpoint exported to a temporary HF
directory), build the turns with its tokenizer and the training encoder (``turns.eval_turns``),
generate the answers (``generation.generate_answers``), stopping at the model's end-of-turn ids
(the generation config's eos ids and the tokenizer's eos, as ``bridge-sft chat`` stops), score them
(``metrics.text_scores``) and compute the reference answers' supervised loss
(``generation.reference_losses``).

``EvalReport.rows``: one dict per turn (the JSONL lines); ``EvalReport.summary``: the averages
(``exact_match``, ``f1``, ``rouge_l``: means over turns; ``loss``: the mean over every supervised
token of every turn, in nats; ``stopped``: the share of answers that ended with an end-of-turn
token), throughput, settings and counts, with ``baseline`` and ``difference`` (model minus
baseline) when there is a baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bridge_sft.data.options import EncodeOptions
from bridge_sft.evaluation.generation import Progress, Throughput, generate_answers, reference_losses, until_stop
from bridge_sft.evaluation.metrics import text_scores
from bridge_sft.evaluation.turns import LocatedConversation, Skipped, as_located, eval_turns, read_conversations

METRICS = ("exact_match", "f1", "rouge_l", "loss", "stopped")
LABELS = {"exact_match": "exact match", "f1": "token F1", "rouge_l": "ROUGE-L", "loss": "loss (nats/token)",
          "stopped": "answers that stopped"}


@dataclass
class EvalReport:
    """What ``evaluate`` found; ``rows`` and ``summary`` as in the module docstring."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    skipped: Skipped = field(default_factory=Skipped)

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``out_dir/answers.jsonl`` (one line per turn) and ``out_dir/summary.json``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        answers, summary = out / "answers.jsonl", out / "summary.json"
        with answers.open("w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary.write_text(json.dumps(self.summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return answers, summary

    def table(self) -> str:
        """The metrics as aligned text: one column per model, and the difference with a baseline."""
        names = ["model"] + (["baseline", "difference"] if self.summary.get("baseline") else [])
        columns = [self.summary["model"]] + ([self.summary["baseline"], self.summary["difference"]]
                                             if len(names) > 1 else [])
        width = max(len(label) for label in LABELS.values())
        lines = [f"{'':{width}}  " + "  ".join(f"{n:>10}" for n in names)]
        for key in METRICS:
            cells = [f"{c[key]:>+10.4f}" if n == "difference" else f"{c[key]:>10.4f}" for n, c in zip(names, columns)]
            lines.append(f"{LABELS[key]:{width}}  " + "  ".join(cells))
        return "\n".join(lines)


def evaluate(model: str | Path, conversations, baseline: str | Path | None = None, *, max_new_tokens: int = 256,
             batch_size: int = 8, temperature: float = 0.0, options: EncodeOptions | None = None,
             hf_config: str | None = None, baseline_hf_config: str | None = None, device: str = "cpu",
             progress: Callable[[str, int], Progress] | None = None, say: Callable[[str], None] = print) -> EvalReport:
    """Evaluate ``model`` (and ``baseline``) on ``conversations``.

    ``conversations``: a data path (or list of paths) in any format training reads, or a list of
    ``LocatedConversation`` / ``Conversation`` / OpenAI-style message lists. ``options``: how the data
    is read and rendered (format, columns, chat template, template variables, system prompt); its
    ``tokenizer_path`` is ignored (each model uses its own tokenizer). ``hf_config``: for a Megatron
    checkpoint, the HF model it came from (default: its ``run_config.yaml``). ``progress(label, total)``
    returns the ``(done, total)`` callback of one model's generation. Raises ``DataError`` for bad
    data (no conversation to evaluate included) and ``bridge_sft.cli.UserError`` for a model that
    does not load.
    """
    from bridge_sft.data.errors import DataError

    options = options or EncodeOptions(tokenizer_path="", seq_length=1 << 30)
    skipped = Skipped()
    if isinstance(conversations, (str, Path)) or (isinstance(conversations, (list, tuple)) and conversations
                                                  and isinstance(conversations[0], (str, Path))):
        conversations, skipped = read_conversations(conversations, options)
    else:
        conversations = as_located(list(conversations))
    if not conversations:
        raise DataError("no conversation with an assistant turn to evaluate"
                        + (f" ({skipped.describe()})" if skipped.count else " (the data is empty)"))
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "temperature": temperature,
                "greedy": temperature == 0}
    results = {"model": _run_model(model, hf_config, conversations, options, settings, device, progress, say)}
    if baseline is not None:
        results["baseline"] = _run_model(baseline, baseline_hf_config, conversations, options, settings, device,
                                         progress, say)
    rows = _rows(results)
    summary: dict[str, Any] = {
        "baseline": None, "conversations": len(conversations), "turns": len(rows), "skipped": skipped.places,
        "settings": settings,
    }
    for name, result in results.items():
        summary[name] = _averages(result)
        summary[f"{name}_generation"] = result["throughput"]
        summary[f"{name}_path"] = str(model if name == "model" else baseline)
    if baseline is not None:
        summary["difference"] = {k: summary["model"][k] - summary["baseline"][k] for k in METRICS}
    return EvalReport(rows, summary, skipped)


def _run_model(path, hf_config, conversations: list[LocatedConversation], options: EncodeOptions, settings: dict,
               device: str, progress, say) -> dict:
    """Turns, answers, scores and losses of one model."""
    import torch

    from bridge_sft.cli import UserError
    from bridge_sft.cli.chat import load
    from bridge_sft.data.cache import make_encoder

    try:
        chat = load(str(path), hf_config, device, say=say)
    except UserError:
        raise
    except Exception as exc:  # a directory whose weights or config transformers cannot read
        raise UserError(f"{path}: the model does not load ({type(exc).__name__}: {exc})") from None
    encoder = make_encoder(EncodeOptions(**{**options.__dict__, "tokenizer_path": str(path)}), chat.tokenizer)
    turns = eval_turns(encoder, conversations, lambda ids: chat.tokenizer.decode(ids, skip_special_tokens=True))
    stop_ids = chat.stop_ids()  # the end-of-turn ids bridge-sft chat stops at
    pad_id = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else stop_ids[0]
    if settings["temperature"] > 0:
        torch.manual_seed(0)
    on_progress = progress(str(path), len(turns)) if progress else None
    timer = Throughput()
    answers = generate_answers(chat.model, [t.prompt_ids for t in turns], stop_ids=stop_ids, pad_id=pad_id,
                               max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                               temperature=settings["temperature"], progress=on_progress)
    throughput = timer.stop(answers).as_dict()
    losses = reference_losses(chat.model, [(t.target_ids, t.target_mask) for t in turns], pad_id=pad_id,
                              batch_size=settings["batch_size"])
    per_turn = []
    for turn, tokens, (nll, count) in zip(turns, answers, losses):
        text = chat.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        per_turn.append({"turn": turn, "answer": text, "answer_tokens": len(tokens),
                         "stopped": until_stop(tokens, stop_ids)[1], "nll": nll, "supervised_tokens": count,
                         **text_scores(text, turn.reference)})
    del chat
    return {"turns": per_turn, "throughput": throughput}


def _averages(result: dict) -> dict[str, float]:
    turns = result["turns"]
    n = max(len(turns), 1)
    tokens = sum(t["supervised_tokens"] for t in turns)
    out = {k: sum(float(t[k]) for t in turns) / n for k in ("exact_match", "f1", "rouge_l", "stopped")}
    out["loss"] = sum(t["nll"] for t in turns) / max(tokens, 1)
    out["supervised_tokens"] = tokens
    return out


def _rows(results: dict) -> list[dict]:
    """One JSONL row per turn: where, prompt, reference, and each model's answer and scores."""
    rows = []
    for i, main in enumerate(results["model"]["turns"]):
        turn = main["turn"]
        row = {"where": turn.where, "turn": turn.turn, "prompt": turn.prompt_text, "reference": turn.reference}
        for name, result in results.items():
            t = result["turns"][i]
            prefix = "" if name == "model" else f"{name}_"
            row.update({f"{prefix}answer": t["answer"], f"{prefix}answer_tokens": t["answer_tokens"],
                        f"{prefix}stopped": t["stopped"], f"{prefix}exact_match": t["exact_match"],
                        f"{prefix}f1": t["f1"], f"{prefix}rouge_l": t["rouge_l"],
                        f"{prefix}loss": t["nll"] / max(t["supervised_tokens"], 1),
                        f"{prefix}supervised_tokens": t["supervised_tokens"]})
        rows.append(row)
    return rows
