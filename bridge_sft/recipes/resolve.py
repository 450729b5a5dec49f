"""Turn ``RECIPE_OR_YAML key=value ...`` into a checked ``ConfigContainer``.

Two kinds of ``key=value``:

- a key without a dot that names a parameter of the recipe function is a recipe
  argument (``hf_path=...``, ``data=...``, ``peft=lora``, ``seq_length=4096``);
  values are read as YAML scalars/lists;
- any other key is a Hydra-style override of the ``ConfigContainer``
  (``train.train_iters=100``, ``optimizer.lr=1e-5``), applied by Bridge's own
  ``process_config_with_overrides``. We first check each key exists and each
  value has the field's type, so a typo fails with the key named instead of
  being silently added or failing deep inside training.

A YAML recipe file holds ``recipe: NAME``, recipe arguments at the top level,
and ``ConfigContainer`` sections (``train: {train_iters: 100}``); command-line
``key=value`` pairs win over the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from bridge_sft.recipes import RECIPES

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ConfigError(ValueError):
    """A recipe name, recipe argument or override the user has to fix (one line, names the key)."""


def build_config(recipe_or_yaml: str, overrides: list[str] = ()):
    """Build the ``ConfigContainer`` for a recipe name or YAML file, with ``key=value`` overrides."""
    name, file_items = _read_recipe(recipe_or_yaml)
    recipe = RECIPES[name]
    params = recipe_parameters(recipe)
    recipe_args: dict[str, Any] = {}
    config_overrides: list[str] = []
    for key, value in file_items + [_split(item) for item in overrides]:
        if "." not in key and key in params:
            recipe_args[key] = _parse_value(value) if isinstance(value, str) else value
        else:
            config_overrides.append(f"{key}={_hydra_value(value)}")
    _check_recipe_args(name, recipe, recipe_args)
    config = recipe(**recipe_args)
    apply_overrides(config, config_overrides)
    return config


def recipe_parameters(recipe) -> list[str]:
    """Argument names a recipe takes: its own, plus ``sft``'s when it passes ``**overrides`` on."""
    params = inspect.signature(recipe).parameters
    names = [p.name for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names += [n for n in inspect.signature(RECIPES["sft"]).parameters if n not in names]
    return names


def apply_overrides(config, overrides: list[str]) -> None:
    """Check, then apply Hydra-style ``key=value`` overrides with Bridge's ``process_config_with_overrides``."""
    if not overrides:
        return
    for item in overrides:
        key, value = _split(item)
        if key[:1] not in "+~":  # Hydra's add/delete syntax is Bridge's to check
            _check_override(config, key, _parse_value(value))
    from megatron.bridge.training.utils.omegaconf_utils import OverridesError, process_config_with_overrides

    try:
        process_config_with_overrides(config, cli_overrides=list(overrides))
    except OverridesError as exc:
        raise ConfigError(str(exc)) from None


def check_hf_checkpoint(hf_path: str) -> None:
    """A local HF checkpoint directory of an architecture Bridge supports, or a hub id."""
    path = Path(os.path.expanduser(hf_path))
    if not path.exists():
        if _HUB_ID.fullmatch(hf_path) and not hf_path.startswith((".", "/")):
            return  # a hub id: resolved (and reported, if offline) by transformers
        raise ConfigError(f"hf_path={hf_path}: no such directory. Give the directory of an HF checkpoint "
                          "(config.json, weights, tokenizer) or a hub id such as Qwen/Qwen3-0.6B.")
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf_path={hf_path} has no config.json: it is not an HF checkpoint directory "
                          "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)).")
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    from megatron.bridge import AutoBridge

    from bridge_sft.models import multimodal_message

    supported = AutoBridge.list_supported_models()
    if message := multimodal_message(hf_path, architectures):
        raise ConfigError(message)
    if not any(arch in supported for arch in architectures):
        causal_lms = ", ".join(a for a in supported if a.endswith("ForCausalLM"))
        raise ConfigError(
            f"hf_path={hf_path}: architecture {', '.join(architectures) or '(none in config.json)'} is not "
            f"supported by Megatron-Bridge 0.6.2. Supported causal LMs: {causal_lms}."
        )
    if not any(arch.endswith("ForCausalLM") for arch in architectures):  # Bridge's vision-language models
        raise ConfigError(
            f"hf_path={hf_path}: architecture {', '.join(architectures)} is a multimodal model; bridge-sft "
            "fine-tunes text-only causal LMs (*ForCausalLM)."
        )


def _read_recipe(recipe_or_yaml: str) -> tuple[str, list[tuple[str, Any]]]:
    if recipe_or_yaml in RECIPES:
        return recipe_or_yaml, []
    path = Path(recipe_or_yaml)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"unknown recipe {recipe_or_yaml!r}: use one of {', '.join(RECIPES)} or a recipe YAML file.")
    if not path.is_file():
        raise ConfigError(f"recipe file {recipe_or_yaml} does not exist.")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{recipe_or_yaml}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    if not isinstance(content, dict) or content.get("recipe") not in RECIPES:
        raise ConfigError(f"{recipe_or_yaml}: needs a top-level 'recipe:' naming one of {', '.join(RECIPES)}.")
    name = content.pop("recipe")
    params = recipe_parameters(RECIPES[name])
    items = []
    for key, value in content.items():
        if key in params:
            items.append((key, value))
        else:
            items += _flatten(key, value)
    return name, items


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for key, child in value.items() for item in _flatten(f"{prefix}.{key}", child)]
    return [(prefix, value)]


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.train_iters=100).")
    return key.strip(), value


def _parse_value(text: str) -> Any:
    """A ``key=value`` value as Hydra reads it: YAML, plus ``1e-5``-style floats (YAML 1.1 reads a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value) else value
        except ValueError:
            return value
    return value


def _hydra_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if value is not None else "null"


def _check_recipe_args(name: str, recipe, args: dict[str, Any]) -> None:
    params = inspect.signature(recipe).parameters
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in args]
    if missing:
        raise ConfigError(f"recipe {name} needs {', '.join(f'{m}=...' for m in missing)} "
                          f"(e.g. bridge-sft train {name} hf_path=/path/to/hf_model).")
    if "hf_path" in args or "hf_path" in params:
        check_hf_checkpoint(str(args.get("hf_path", params["hf_path"].default)))
    if args.get("data") is not None:
        check_data_paths(args["data"])


def check_data_paths(data: Any) -> None:
    """``data=`` (one source or a mixture, ``bridge_sft.data.mixing``) is well formed and its files exist."""
    from bridge_sft.data.formats import DataError
    from bridge_sft.data.mixing import parse_sources

    try:
        specs = parse_sources(data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    for spec in specs:
        for data_path in spec.paths + (spec.validation or ()):
            hub_id = data_path.split(":")[0]
            if not Path(data_path).expanduser().exists() and not (
                    _HUB_ID.fullmatch(hub_id) and not hub_id.startswith((".", "/", "~"))):
                raise ConfigError(f"data={data_path}: no such file or directory.")


def _check_override(config, key: str, value: Any) -> None:
    node, path = config, []
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _field_names(node)
        if fields is None:
            raise ConfigError(f"override {key}: {'.'.join(path)} is a value, not a section.")
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=3)
            hint = f" Did you mean {', '.join('.'.join(path + [c]) for c in close)}?" if close else ""
            raise ConfigError(f"override {key}: unknown key {'.'.join(path + [part])!r}.{hint}")
        parent, node = node, getattr(node, part) if not isinstance(node, dict) else node[part]
        path.append(part)
    if _field_names(node) is not None and node is not None and not isinstance(node, dict):
        raise ConfigError(f"override {key}: {key} is a section; set one of its fields ({key}.<field>=...).")
    expected = _expected_type(parent, parts[-1], node)
    if expected is not None and value is not None and not _fits(value, expected):
        raise ConfigError(f"override {key}={value!r}: expected {_type_name(expected)}.")


def _field_names(node) -> list[str] | None:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [f.name for f in dataclasses.fields(node)]
    if isinstance(node, dict):
        return list(node)
    return None


def _expected_type(parent, name: str, current: Any):
    if current is not None and not isinstance(current, (dict, list, tuple)):
        return type(current)
    if dataclasses.is_dataclass(parent):
        try:
            annotation = typing.get_type_hints(type(parent)).get(name)
        except Exception:  # unresolvable forward references in third-party annotations
            return None
        scalars = [a for a in typing.get_args(annotation) or (annotation,) if a in (bool, int, float, str)]
        return tuple(scalars) or None
    return None


def _fits(value: Any, expected) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    for kind in expected:
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            if value in kind.__members__ or value in [m.value for m in kind]:
                return True
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        elif kind is bool and isinstance(value, bool):
            return True
        elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True
        elif kind not in (bool, int, float, str):
            return True  # torch dtypes, callables...: Bridge's override code converts and checks them
    return False


def _type_name(expected) -> str:
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(k.__name__ for k in expected)
