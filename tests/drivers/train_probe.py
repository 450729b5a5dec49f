"""Driver: train a recipe through the Python API and probe the trained model.

Usage: ``train_probe.py OUT_DIR TOKENS_JSON RECIPE [key=value ...]`` (the arguments of
``bridge-sft train``). Writes ``OUT_DIR/probe.json`` (losses, trainable parameter names and
counts, whether frozen weights moved) and ``OUT_DIR/probe_logits.pt``: the trained model's
fp32 logits ``[b, s, vocab]`` on the token ids of TOKENS_JSON, computed in the training
process right after the last step.
"""

import json
import sys
from pathlib import Path

import torch

from bridge_sft.callbacks import LossHistory
from bridge_sft.recipes.resolve import build_config
from bridge_sft.train import run

from megatron.bridge.training.callbacks import Callback  # noqa: E402


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class Probe(Callback):
    def __init__(self, tokens, out_dir):
        self.tokens, self.out_dir, self.result = tokens, out_dir, {}

    def on_train_start(self, context):
        model = unwrap(context.model[0])
        params = dict(model.named_parameters())
        self.result["trainable"] = sorted(n for n, p in params.items() if p.requires_grad)
        self.result["trainable_params"] = sum(p.numel() for p in params.values() if p.requires_grad)
        self.result["total_params"] = sum(p.numel() for p in params.values())
        self.frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}

    def on_train_end(self, context):
        model = unwrap(context.model[0])
        params = dict(model.named_parameters())
        self.result["frozen_changed"] = [n for n, before in self.frozen.items() if not torch.equal(before, params[n])]
        model.eval()
        positions = torch.arange(self.tokens.size(1)).expand_as(self.tokens)
        with torch.no_grad():
            logits = model(input_ids=self.tokens, position_ids=positions, attention_mask=None)
        if torch.distributed.get_rank() == 0:
            torch.save(logits.float(), Path(self.out_dir) / "probe_logits.pt")


def main(out_dir, tokens_path, recipe, *overrides):
    config = build_config(recipe, list(overrides))
    history, probe = LossHistory(), Probe(torch.tensor(json.load(open(tokens_path))), out_dir)
    run(config, callbacks=[history, probe])
    probe.result["losses"] = history.train
    Path(out_dir, "probe.json").write_text(json.dumps(probe.result))


if __name__ == "__main__":
    main(*sys.argv[1:])
