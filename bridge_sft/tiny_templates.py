"""The chat templates and special tokens of the tiny tokenizers (``bridge_sft.tiny``), one style per model family:
each template has the shape of the family's published one (its turn markers, end-of-turn token, system and
reasoning handling) at a size a tiny byte-level BPE vocabulary can hold.

``STYLES``: style name -> ``TokenizerStyle`` (template, special tokens, eos / pad / bos tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

# Llama 3 style: header tokens around the role, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML (Qwen2.5 style): <|im_start|>role\n ... <|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma: "model" is the assistant's role, there is no system turn (a system prompt is
# prepended to the first user turn, as Gemma 3's template does).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (system if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Mistral v3 style: [INST] user [/INST] answer</s>; the system prompt goes into the first [INST].
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}[INST] {{ (system if loop.first else '') + message['content'] }}[/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# gpt-oss harmony: <|start|>role<|message|>...<|end|>; the assistant answers on the final channel.
HARMONY_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>"
    "{% else %}<|start|>{{ message['role'] }}<|message|>{% endif %}"
    "{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)

# DeepSeek-V3: the system prompt first, then <｜User｜>/<｜Assistant｜> turns, answers end with EOS.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% else %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

# GLM-4.5: [gMASK]<sop>, then <|role|>\n turns; an answer has no end token of its own (generation stops
# at the next role token, <|user|>), so the template marks what is trained with {% generation %}, and
# a conversation that ends with an answer ends with the <|user|> that stops it (as trl's training variant).
GLM_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% if loop.last %}<|user|>{% endif %}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Nemotron (Nemotron-Mini style): <extra_id_0>System / <extra_id_1>User / <extra_id_1>Assistant headers.
NEMOTRON_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<extra_id_0>System\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<extra_id_1>User\n{{ message['content'] }}\n"
    "{% else %}<extra_id_1>Assistant\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
)

# Nemotron-H (8B Instruct / Nano v2 style): <SPECIAL_10>System, <SPECIAL_11>User / Assistant headers, an answer
# ends with <SPECIAL_12>.
NEMOTRON_H_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<SPECIAL_10>System\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<SPECIAL_11>User\n{{ message['content'] }}\n"
    "{% else %}<SPECIAL_11>Assistant\n{{ message['content'] }}<SPECIAL_12>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<SPECIAL_11>Assistant\n{% endif %}"
)

# Nemotron 3 (Nano 30B-A3B style): ChatML turns; reasoning on by default (``enable_thinking``): the last answer
# carries its reasoning in <think>...</think>, earlier answers (and every answer with reasoning off) an empty
# <think></think>; the generation prompt opens <think> (reasoning on) or renders <think></think> (off).
NEMOTRON3_TEMPLATE = (
    "{% set thinking = enable_thinking if enable_thinking is defined else true %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last and thinking and message.get('reasoning_content') %}"
    "<think>\n{{ message['reasoning_content'] | trim }}\n</think>\n"
    "{% else %}<think></think>{% endif %}"
    "{{ message['content'] | trim }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ '<think>\n' if thinking else '<think></think>' }}"
    "{% endif %}"
)

# Qwen3.5 (its published template's shape): ChatML turns; the last assistant turn carries its reasoning in a
# <think> block, earlier ones only their answer; the generation prompt opens a <think> block (or an empty one
# with enable_thinking=False).
QWEN3_5_TEMPLATE = (
    "{% set thinking = enable_thinking if enable_thinking is defined else true %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last and message.get('reasoning_content') %}"
    "<think>\n{{ message['reasoning_content'] | trim }}\n</think>\n\n"
    "{% endif %}"
    "{{ message['content'] | trim }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ '<think>\n' if thinking else '<think>\n\n</think>\n\n' }}"
    "{% endif %}"
)

# Falcon (Falcon3-Instruct style, which Falcon-H1's tokenizer follows): <|system|> / <|user|> / <|assistant|> headers
# on their own lines, an answer ends with the end-of-text token.
FALCON_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% else %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# --- 2026 families (issue 20): Gemma 4, EXAONE 4, ERNIE 4.5, MiniMax-M2 ---
# EXAONE 4: [|role|]\n ... [|endofturn|]\n; the assistant's turn ends with [|endofturn|].
EXAONE_TEMPLATE = (
    "{% for message in messages %}"
    "[|{{ message['role'] }}|]\n{{ message['content'] }}[|endofturn|]\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[|assistant|]\n{% endif %}"
)

# ERNIE 4.5: <|begin_of_sentence|>, the system prompt, then "User: " / "Assistant: " turns; an answer ends
# with <|end_of_sentence|>.
ERNIE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}<|end_of_sentence|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# MiniMax-M2: ]~!b[ opens the conversation, ]~b]role\n ... [e~[\n each turn ("ai" is the assistant's role).
MINIMAX_TEMPLATE = (
    "]~!b["
    "{% for message in messages %}"
    "{% set role = 'ai' if message['role'] == 'assistant' else message['role'] %}"
    "]~b]{{ role }}\n{{ message['content'] }}[e~[\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}]~b]ai\n{% endif %}"
)

# Gemma 4: <|turn>role\n ... <turn|>\n turns ("model" is the assistant's role; a system prompt has its own turn).
GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens and chat template of one family's tokenizer."""

    template: str
    specials: tuple[str, ...]
    eos_token: str
    pad_token: str
    bos_token: str | None = None


STYLES = {
    "llama": TokenizerStyle(LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"),
                            eos_token="<|eot_id|>", pad_token="<|end_of_text|>", bos_token="<|begin_of_text|>"),
    "chatml": TokenizerStyle(CHATML_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                             eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "gemma": TokenizerStyle(GEMMA_TEMPLATE, ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
                            eos_token="<end_of_turn>", pad_token="<pad>", bos_token="<bos>"),
    "mistral": TokenizerStyle(MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                              eos_token="</s>", pad_token="<unk>", bos_token="<s>"),
    "harmony": TokenizerStyle(HARMONY_TEMPLATE, ("<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>",
                                                 "<|end|>", "<|return|>"),
                              eos_token="<|end|>", pad_token="<|endoftext|>"),
    "deepseek": TokenizerStyle(DEEPSEEK_TEMPLATE, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                                   "<｜Assistant｜>", "<｜▁pad▁｜>"),
                               eos_token="<｜end▁of▁sentence｜>", pad_token="<｜▁pad▁｜>",
                               bos_token="<｜begin▁of▁sentence｜>"),
    "glm": TokenizerStyle(GLM_TEMPLATE, ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>",
                                         "<|assistant|>"),
                          eos_token="<|user|>", pad_token="<|endoftext|>"),
    "nemotron": TokenizerStyle(NEMOTRON_TEMPLATE, ("<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>"),
                               eos_token="</s>", pad_token="<unk>", bos_token="<s>"),
    "nemotron_h": TokenizerStyle(NEMOTRON_H_TEMPLATE, ("<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>",
                                                       "<SPECIAL_12>"),
                                 eos_token="<SPECIAL_12>", pad_token="<unk>", bos_token="<s>"),
    "nemotron3": TokenizerStyle(NEMOTRON3_TEMPLATE, ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>",
                                                     "</think>"),
                                eos_token="<|im_end|>", pad_token="<unk>", bos_token="<s>"),
    "falcon": TokenizerStyle(FALCON_TEMPLATE, ("<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|system|>",
                                               "<|user|>", "<|assistant|>"),
                             eos_token="<|end_of_text|>", pad_token="<|pad|>", bos_token="<|begin_of_text|>"),
}
# 2026 families (issue 20)
STYLES.update({
    "exaone": TokenizerStyle(EXAONE_TEMPLATE, ("[PAD]", "[BOS]", "[|endofturn|]", "[|system|]", "[|user|]",
                                               "[|assistant|]"),
                             eos_token="[|endofturn|]", pad_token="[PAD]", bos_token="[BOS]"),
    "ernie": TokenizerStyle(ERNIE_TEMPLATE, ("<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"),
                            eos_token="<|end_of_sentence|>", pad_token="<unk>", bos_token="<|begin_of_sentence|>"),
    "minimax": TokenizerStyle(MINIMAX_TEMPLATE, ("<pad>", "]~!b[", "]~b]", "[e~["),
                              eos_token="[e~[", pad_token="<pad>"),
    "gemma4": TokenizerStyle(GEMMA4_TEMPLATE, ("<pad>", "<bos>", "<eos>", "<|turn>", "<turn|>"),
                             eos_token="<turn|>", pad_token="<pad>", bos_token="<bos>"),
    "qwen3_5": TokenizerStyle(QWEN3_5_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                 "</think>"),
                              eos_token="<|im_end|>", pad_token="<|endoftext|>"),
})
