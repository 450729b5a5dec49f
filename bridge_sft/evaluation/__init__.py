"""Evaluating a model on held-out chat data: its answers to every assistant turn, text metrics and
the supervised loss of the references (``bridge-sft eval``).

``evaluate(model, data, baseline=None, ...) -> EvalReport`` (``report``); the pieces: ``turns``
(conversations and the prompts of their turns, rendered as training renders them), ``generation``
(batched greedy answers, teacher-forced losses), ``metrics`` (exact match, token F1, ROUGE-L).
"""

from bridge_sft.evaluation.report import EvalReport, evaluate  # noqa: F401
from bridge_sft.evaluation.turns import LocatedConversation, read_conversations  # noqa: F401
