"""Driver: one "node" preparing the data into a shared cache at the same moment as another node.

Usage: ``multinode_prepare.py SPEC.json``, run in the node's own working directory (with its own TMPDIR).
SPEC keys: ``tokenizer`` (tiny HF model dir), ``data`` (chat file), ``seq_length``, ``cache_dir`` (shared),
``ready`` (file this process creates once its imports and tokenizer are loaded), ``gate`` (file whose
appearance starts the preparation: both nodes start within a millisecond of each other), ``out`` (result JSON).

Result JSON: ``cache_hit`` (False for the process that built the arrays), ``path`` (the cache directory),
``digest`` (blake2b of the arrays), ``entered``/``left`` (``time.time()`` around ``prepare``), ``cwd``.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bridge_sft.data.cache import EncodeOptions, prepare


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    options = EncodeOptions(tokenizer_path=spec["tokenizer"], seq_length=spec["seq_length"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    Path(spec["ready"]).touch()
    while not os.path.exists(spec["gate"]):
        time.sleep(0.001)
    entered = time.time()
    data = prepare(spec["data"], options, cache_dir=spec["cache_dir"], num_proc=1, progress=False,
                   tokenizer=tokenizer)
    left = time.time()
    digest = hashlib.blake2b(digest_size=16)
    for array in (data.input_ids, data.loss_mask, data.offsets):
        digest.update(np.ascontiguousarray(array).tobytes())
    Path(spec["out"]).write_text(json.dumps({
        "cache_hit": data.summary["cache_hit"], "path": data.path, "digest": digest.hexdigest(),
        "samples": len(data), "entered": entered, "left": left, "cwd": os.getcwd(),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
