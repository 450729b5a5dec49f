"""Text metrics of one answer against its reference: exact match, token F1, ROUGE-L.

- ``exact_match``: 1.0 when the answer equals the reference after stripping surrounding
  whitespace, else 0.0 (case and punctuation count).
- ``token_f1``: SQuAD's F1 over normalised words (``squad_words``: lower case, punctuation
  removed, the English articles a/an/the dropped, split on whitespace), counting repeated
  words as a multiset; 1.0 when both sides have no word, 0.0 when only one has none.
- ``rouge_l``: the F-measure of ROUGE-L from Google's ``rouge-score`` package (the reference
  implementation of ROUGE-1.5.5), on ``words``: lower case, punctuation and symbols removed,
  split on whitespace. ``rouge-score``'s own tokenizer keeps only ``[a-z0-9]`` and so scores any
  non-Latin text 0; this one keeps every letter and combining mark (Bengali, Chinese ...), and on
  ASCII text gives the same words as rouge-score's.

Punctuation and symbols are the Unicode categories ``P*`` and ``S*``. Scores are floats in [0, 1].
This module imports neither torch nor megatron.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from functools import lru_cache

ARTICLES = frozenset({"a", "an", "the"})


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation and symbols (Unicode ``P*``, ``S*``) turned into spaces."""
    return "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text.lower()).split()


def squad_words(text: str) -> list[str]:
    """``words`` without the English articles (SQuAD's answer normalisation)."""
    return [w for w in words(text) if w not in ARTICLES]


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def token_f1(answer: str, reference: str) -> float:
    predicted, gold = squad_words(answer), squad_words(reference)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


class _Words:
    """``rouge-score``'s tokenizer interface (``tokenize(text) -> list[str]``) over ``words``."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(answer: str, reference: str) -> float:
    # rouge-score's argument order is (target, prediction).
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def text_scores(answer: str, reference: str) -> dict[str, float]:
    """``{"exact_match", "f1", "rouge_l"}`` of one answer."""
    return {"exact_match": exact_match(answer, reference), "f1": token_f1(answer, reference),
            "rouge_l": rouge_l(answer, reference)}
