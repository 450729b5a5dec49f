"""Driver: HF -> Megatron checkpoint -> HF for each HF dir given; print a JSON verdict per model.

Usage: ``roundtrip.py WORKDIR HF_DIR [HF_DIR ...]``. Every tensor of the exported
``model.safetensors`` is compared bit for bit (``torch.equal``) with the original.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge_sft.conversion import export_hf, import_hf


def main(workdir, hf_dirs):
    verdicts = {}
    for hf_dir in map(Path, hf_dirs):
        megatron_dir, out_dir = Path(workdir) / f"{hf_dir.name}-megatron", Path(workdir) / f"{hf_dir.name}-hf"
        import_hf(hf_dir, megatron_dir)
        export_hf(megatron_dir, out_dir, hf_config_dir=hf_dir)
        original, exported = load_file(hf_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
        verdicts[hf_dir.name] = {
            "same_names": sorted(original) == sorted(exported),
            "bit_exact": [k for k in original if k in exported and torch.equal(original[k], exported[k])],
            "tensors": len(original),
        }
    print("ROUNDTRIP " + json.dumps(verdicts))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
