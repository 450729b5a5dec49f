"""A long-conversation chat set built deterministically from real short dialogs.

Real multi-turn SFT data (agent traces, tutoring sessions, support chats) has
conversations of hundreds to thousands of tokens; the bundled ChatterBot dialogs
are short (median ~33 tokens with the Qwen3 template). To benchmark packing and
training on long samples without downloads, ``build`` concatenates real dialogs
into long conversations:

1. the dialogs are grouped by language (their ``lang`` field; one group if absent),
   so that a conversation stays in one language;
2. each group is shuffled with ``numpy.random.default_rng(seed)``;
3. consecutive dialogs of a group are concatenated into one conversation, taking
   ``k`` dialogs at a time with ``k`` drawn uniformly from
   ``[min_dialogs, max_dialogs]`` by the same generator (the group's last
   conversation takes what is left).

Every source dialog starts with a user turn and ends with an assistant turn, so
the roles keep alternating. Each dialog is used exactly once. From the 2,912
bundled dialogs the defaults (8..48 dialogs) make 118 conversations of median
~1,150 tokens (10th/90th percentile ~380/~3,200, longest ~9,600; Qwen3 template;
the Llama 3 tokenizer gives about the same): at seq 2048, 22 of them are
truncated, at 4096, 7. Output: JSON lines ``{"messages": [...], "lang": ..., "dialogs": k}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def build(src: str | Path, out: str | Path, seed: int = 0, min_dialogs: int = 8, max_dialogs: int = 48) -> Path:
    """Write the long conversations made from the dialogs in ``src`` (JSON lines with ``messages``) to ``out``."""
    if not 1 <= min_dialogs <= max_dialogs:
        raise ValueError(f"need 1 <= min_dialogs <= max_dialogs, got {min_dialogs}, {max_dialogs}")
    groups: dict[str, list[list[dict]]] = {}
    with open(src, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                groups.setdefault(str(record.get("lang", "")), []).append(record["messages"])
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for lang in sorted(groups):
            dialogs = groups[lang]
            order = rng.permutation(len(dialogs))
            start = 0
            while start < len(order):
                k = int(rng.integers(min_dialogs, max_dialogs + 1))
                chunk = order[start: start + k]
                messages = [message for i in chunk for message in dialogs[i]]
                f.write(json.dumps({"messages": messages, "lang": lang, "dialogs": len(chunk)}, ensure_ascii=False))
                f.write("\n")
                start += k
    return out
