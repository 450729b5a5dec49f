"""Inferring where assistant turns start and end in a template without ``{% generation %}``
marks, by rendering probe conversations (``G`` and ``EOT`` of ``bridge_sft.data.encoding``),
and replacing a template where that fails by a known training variant of it.

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import logging
from typing import Any

from bridge_sft.data.formats import DataError, RecordError
from bridge_sft.data.rendering import GENERATION_RE, Renderer
from bridge_sft.data.tool_calls import PROBE_TOOLS, tool_call_end

logger = logging.getLogger("bridge_sft.data.encoding")  # the name users filter the fallback warning by

_ANNOUNCED: set[str] = set()


def announce(message: str) -> None:
    """Log a warning once per process."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        logger.warning(message)


def common_prefix(*texts: str) -> str:
    n = min(len(t) for t in texts)
    i = 0
    while i < n and all(t[i] == texts[0][i] for t in texts):
        i += 1
    return texts[0][:i]


class TemplateProbe:
    """The assistant header and end-of-turn texts of each template of a ``Renderer`` (cached
    per template), and the special-token queries they need.

    ``backend``: the Rust tokenizer; ``special_ids``: the ids of its special tokens.
    """

    def __init__(self, renderer: Renderer, backend, special_ids: frozenset[int]):
        self.renderer = renderer
        self.backend = backend
        self.special_ids = special_ids
        self.cache: dict[str, tuple[str, tuple[str, ...]]] = {}

    def markers(self, tools: Any) -> tuple[str, tuple[str, ...]]:
        """``(G, EOTS)``: the assistant header text and the end-of-turn texts (see
        ``bridge_sft.data.encoding``); raises ``DataError`` if the template hides them."""
        renderer = self.renderer
        key = renderer.template(tools)
        if key in self.cache:
            return self.cache[key]
        renderer.probe_arguments(tools)
        u, a, u2 = "@@BSFTprobeU@@", "@@BSFTprobeA@@", "@@BSFTprobeV@@"
        user = {"role": "user", "content": u}
        asst = {"role": "assistant", "content": a}
        try:
            base = renderer.render([user], tools)
            gen = renderer.render([user], tools, add_generation_prompt=True)
            final = renderer.render([user, asst], tools)
            mid = renderer.render([user, asst, {"role": "user", "content": u2}], tools)
        except RecordError as exc:
            raise self.unsupported(f"rendering a probe conversation failed ({exc.detail})") from None
        # Everything is located relative to the probe texts, never by prefix (templates such as
        # Phi-3 end a conversation with an EOS that a longer conversation does not have there).
        if any(u not in t for t in (base, gen, final, mid)) or a not in final or a not in mid or u2 not in mid:
            raise self.unsupported("the probe messages' contents do not appear in the rendered text")
        after_user = [t[t.index(u) + len(u):] for t in (base, gen, final, mid)]
        user_end = after_user[0]
        header = common_prefix(after_user[1], after_user[2][: after_user[2].index(a)],
                               after_user[3][: after_user[3].index(a)])
        if header[len(common_prefix(header, user_end)):].strip():
            header = header[len(common_prefix(header, user_end)):]  # drop the user turn's own ending
        # else: the user turn's ending is all the prompt there is (Mistral: "[/INST]")
        if "<think>" in header and header[: header.index("<think>")].strip():
            # A generation prompt that opens a reasoning block (Nemotron: "assistant\n<think>\n"):
            # the block belongs to the turn's body, where the reasoning policies apply.
            header = header[: header.index("<think>")]
        if not header.strip():
            raise self.unsupported("no assistant header is shared by the generation prompt and rendered turns")
        final_turn, mid_turn = final[final.index(a):], mid[mid.index(a): mid.index(u2)]
        tail_final, tail_mid = final_turn[len(a):], mid_turn[len(a):]
        # The turn ends with the last special token the final and a middle assistant turn share
        # after the content ("<|im_end|>" of "<|im_end|>\n", both of "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
        # or, where they share none, with the first special token of each (gpt-oss: "<|return|>", "<|end|>").
        shared = common_prefix(tail_final, tail_mid)
        ends = self.special_ends(shared)
        if ends:
            eots = (shared[: ends[-1]],)
        else:
            firsts = [self.special_ends(t)[:1] for t in (tail_final, tail_mid)]
            if not all(firsts):
                raise self.unsupported(
                    f"no end-of-turn special token follows an assistant turn (after the content: {tail_final!r})"
                )
            eots = tuple(dict.fromkeys(t[: f[0]] for t, f in zip((tail_final, tail_mid), firsts)))
        eots = eots + tool_call_end(renderer, self, tools, eots)
        self.cache[key] = (header, eots)
        return header, eots

    def special_ends(self, text: str) -> list[int]:
        """End offsets of the special tokens in ``text``."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return [end for token_id, (_, end) in zip(enc.ids, enc.offsets) if token_id in self.special_ids]

    def after_special_run(self, text: str, start: int, stop: int) -> int:
        """End of the first run of adjacent special tokens in ``text[start:stop]`` (-1 if none)."""
        enc = self.backend.encode(text[start:stop], add_special_tokens=False)
        end = -1
        for token_id, (a, b) in zip(enc.ids, enc.offsets):
            if token_id in self.special_ids and (end < 0 or a == end):
                end = b
            elif end >= 0:
                break
        return start + end if end >= 0 else -1

    def unsupported(self, why: str) -> DataError:
        return DataError(
            f"cannot locate assistant turns in the chat template of {self.renderer.name}: {why}. Add "
            "{% generation %} / {% endgeneration %} marks around the assistant output in the template "
            "(chat_template=...), or train on every token (train_on='all')"
        )

    def use_training_variants(self) -> dict[str, str]:
        """Replace each template whose assistant turns cannot be located (and that has no
        generation marks) by a known training variant of it, if there is one (one warning).
        Returns template key -> name of the variant used."""
        from bridge_sft.data.templates import training_variant

        fallbacks: dict[str, str] = {}
        templates = self.renderer.templates
        for key, template in list(templates.items()):
            if GENERATION_RE.search(template):
                continue
            tools = PROBE_TOOLS if key == "tool_use" else None
            try:
                self.markers(tools)
                continue
            except DataError as exc:
                why = str(exc)
            variant = training_variant(template)
            if variant is None:
                continue  # encoding raises the probe's error, with the fix
            name, text = variant
            templates[key] = text
            self.cache.pop(template, None)
            fallbacks[key] = name
            announce(f"chat template of {self.renderer.name}: {why.split(': ', 1)[-1].split('. Add')[0]}; using the "
                     f"known training variant {name} of the same template (it marks the assistant output with "
                     "{% generation %})")
        return fallbacks
