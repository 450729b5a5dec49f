"""Driver: logits of a Megatron checkpoint (as saved by training) on given token ids.

Usage: ``megatron_logits.py CKPT_DIR HF_SOURCE TOKENS_JSON OUT_PT``. Loads the latest
iteration with ``AutoBridge.load_megatron_model`` (single process, gloo), runs the
model on ``[[ids...], ...]`` and saves the fp32 logits ``[b, s, vocab]``.
"""

import json
import sys

import torch

from bridge_sft import runtime

runtime.maybe_enable()

from megatron.bridge import AutoBridge  # noqa: E402
from megatron.bridge.training.model_load_save import temporary_distributed_context  # noqa: E402

from bridge_sft.conversion import latest_iteration  # noqa: E402


def main(ckpt, hf_source, tokens_path, out):
    tokens = torch.tensor(json.load(open(tokens_path)))
    with temporary_distributed_context(backend="gloo"):
        (model,) = AutoBridge.from_hf_pretrained(hf_source).load_megatron_model(str(latest_iteration(ckpt)),
                                                                               wrap_with_ddp=False)
        model.eval()
        positions = torch.arange(tokens.size(1)).expand_as(tokens)
        with torch.no_grad():
            logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    torch.save(logits.float(), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
