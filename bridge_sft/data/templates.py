"""Known training variants of official chat templates, matched by content.

A template without ``{% generation %}`` marks whose assistant turns cannot be located
(``bridge_sft.data.encoding``) is replaced by a training variant of the SAME template,
if one is known: a file ``NAME_training.jinja`` next to ``NAME.jinja``, where
``NAME.jinja`` equals the template up to whitespace. Looked up in
``bridge_sft/data/chat_templates/`` (shipped: GLM-4.5; see its README for origins and
licences) and, when installed, ``trl``'s ``trl/chat_templates/`` (which keeps copies
of many official templates and their training variants).

This module imports neither torch nor megatron.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

BUNDLED = Path(__file__).with_name("chat_templates")


def _normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


def template_dirs() -> list[Path]:
    """Folders searched for ``*_training.jinja`` variants, in order."""
    dirs = [BUNDLED]
    spec = importlib.util.find_spec("trl")  # locate trl without importing it (slow)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "chat_templates").is_dir():
                dirs.append(Path(location) / "chat_templates")
    return dirs


@functools.lru_cache(maxsize=1)
def _known() -> dict[str, tuple[str, Path]]:
    """Normalised official template -> (name, training variant path); the first folder wins."""
    known: dict[str, tuple[str, Path]] = {}
    for folder in template_dirs():
        for training in sorted(folder.glob("*_training.jinja")):
            name = training.name[: -len("_training.jinja")]
            official = folder / f"{name}.jinja"
            if official.is_file():
                known.setdefault(_normalized(official.read_text(encoding="utf-8")), (name, training))
    return known


def training_variant(template: str) -> tuple[str, str] | None:
    """``(name, text)`` of the known training variant of ``template``, or None."""
    hit = _known().get(_normalized(template))
    if hit is None:
        return None
    name, path = hit
    return f"{path.parent.name}/{path.name}", path.read_text(encoding="utf-8")
