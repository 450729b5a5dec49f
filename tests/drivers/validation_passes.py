"""Driver: train a recipe and record every evaluation (loss and supervised tokens covered).

Usage: ``validation_passes.py OUT_JSON RECIPE [key=value ...]`` (alone or under torchrun). The last rank writes
``evaluations`` ([[iteration, lm loss], ...], every evaluation in order, the one after training included),
``eval_tokens`` (supervised tokens each evaluation covered, summed over ranks), ``eval_iters`` (as planned)
``held_out``: the held-out samples' ``ids`` and ``loss_mask`` lists (one source), read back from the
provider, for an independent HF reference; without pipeline parallelism also ``sample_answers`` and
``sample_prompts``: ``EvalSamples``' greedy answers to 2 held-out prompts (24 tokens) at each evaluation.
"""

import json
import os
import sys
from pathlib import Path

from bridge_sft.callbacks import LossHistory, TokenThroughput
from bridge_sft.eval_samples import EvalSamples
from bridge_sft.recipes.resolve import build_config
from bridge_sft.train import run


def main(out, recipe, *overrides):
    config = build_config(recipe, list(overrides))
    history, throughput = LossHistory(), TokenThroughput()
    samples = EvalSamples(2, 24) if config.model.pipeline_model_parallel_size == 1 else None
    run(config, callbacks=[throughput, history, *([samples] if samples else [])])
    # The last rank holds the losses (the last pipeline stage); Bridge has destroyed the process group by now.
    if int(os.environ.get("RANK", "0")) != int(os.environ.get("WORLD_SIZE", "1")) - 1:
        return
    dataset = config.dataset
    data, indices = dataset._single_splits(dataset.sources()[0])["validation"]
    held_out = [[a.tolist() for a in data.sample(int(i))] for i in indices]
    Path(out).write_text(json.dumps({
        "evaluations": history.evaluations, "eval_tokens": [t for _, t in throughput.evaluations],
        "eval_iters": config.validation.eval_iters, "held_out": held_out,
        "sample_answers": samples.answers if samples else None,
        "sample_prompts": [[p.prompt, p.reference] for p in samples.prompts] if samples else None,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
