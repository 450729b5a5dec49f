"""Answers/s and generated tokens/s of ``bridge-sft eval``'s batched generation vs one prompt at a time.

    python benchmarks/eval_generation.py            # tiny Llama and a 4x wider one, 48 prompts, 3 rounds
    python benchmarks/eval_generation.py --quick    # tiny Llama only, 24 prompts, 2 rounds

The prompts are the assistant turns of the bundled English ChatterBot dialogs, rendered as ``bridge-sft
eval`` renders them (``bridge_sft.evaluation.turns``). **batched** is the generation of ``bridge-sft
eval`` (``generation.generate_answers``: sorted by length, left-padded batches of ``--batch-size``);
**baseline** is a plain loop of HF ``generate`` over the same prompts one at a time, with the same
greedy ``GenerationConfig``. Both run fp32 on the CPU in one process, alternating round by round;
figures are medians over rounds and the ratio is baseline time / batched time. The random models
never say their end-of-turn token, so every answer is ``max_new_tokens`` long both ways, and the
``same_answers`` column checks that both produce identical tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402


def _prompts(model_dir: Path, tokenizer, count: int) -> list[list[int]]:
    from bridge_sft.data.cache import make_encoder
    from bridge_sft.data.formats import to_conversation
    from bridge_sft.data.options import EncodeOptions
    from bridge_sft.evaluation.turns import LocatedConversation, eval_turns
    from bridge_sft.tiny import SAMPLE_DIALOGS

    encoder = make_encoder(EncodeOptions(tokenizer_path=str(model_dir), seq_length=1 << 30), tokenizer)
    convs = []
    with open(SAMPLE_DIALOGS, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("lang") == "english":
                convs.append(LocatedConversation("", to_conversation(record, "messages")))
            if len(convs) >= count:
                break
    return [t.prompt_ids for t in eval_turns(encoder, convs)][:count]


def _one_by_one(model, prompts, config) -> list[list[int]]:
    import torch

    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 generation_config=config)
        out.append(ids[0, len(p):].tolist())
    return out


def run(quick: bool = False, batch_size: int = 8, max_new_tokens: int = 32) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bridge_sft.evaluation.generation import generate_answers, generation_config
    from bridge_sft.tiny import TinySizes, build_tiny_model

    torch.set_num_threads(1)
    count, rounds = (24, 2) if quick else (48, 3)
    shapes = {"tiny llama (hidden 64, 2 layers)": TinySizes()}
    if not quick:
        shapes["tiny llama x4 (hidden 256, 4 layers)"] = TinySizes(hidden_size=256, intermediate_size=512,
                                                                   num_hidden_layers=4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in shapes.items():
            model_dir = build_tiny_model(Path(tmp) / name.split(" (")[0].replace(" ", "_"), sizes=sizes)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            prompts = _prompts(model_dir, tokenizer, count)
            stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
            config = generation_config(stops, pad, max_new_tokens)
            times = {"batched": [], "baseline": []}
            answers = {}
            generate_answers(model, prompts[:batch_size], stop_ids=stops, pad_id=pad, max_new_tokens=4,
                             batch_size=batch_size)  # warm-up
            for _ in range(rounds):
                start = time.perf_counter()
                answers["batched"] = generate_answers(model, prompts, stop_ids=stops, pad_id=pad,
                                                      max_new_tokens=max_new_tokens, batch_size=batch_size)
                times["batched"].append(time.perf_counter() - start)
                start = time.perf_counter()
                answers["baseline"] = _one_by_one(model, prompts, config)
                times["baseline"].append(time.perf_counter() - start)
            tokens = sum(map(len, answers["batched"]))
            base, ours = statistics.median(times["baseline"]), statistics.median(times["batched"])
            for way, seconds in (("batched", ours), ("baseline", base)):
                rows.append({"benchmark": "eval_generation", "model": name, "way": way, "prompts": len(prompts),
                             "batch_size": batch_size if way == "batched" else 1, "max_new_tokens": max_new_tokens,
                             "rounds": rounds, "seconds": seconds, "answers_per_s": len(prompts) / seconds,
                             "tokens_per_s": tokens / seconds, "speedup_vs_one_by_one": base / seconds,
                             "same_answers": answers["batched"] == answers["baseline"]})
    return rows


def _table(rows: list[dict]) -> str:
    return common.markdown_table(rows, ["model", "way", "prompts", "batch_size", "seconds", "answers_per_s",
                                        "tokens_per_s", "speedup_vs_one_by_one", "same_answers"])


def main(argv: list[str] | None = None) -> None:
    common.main(__doc__, run, _table, quick_help="tiny Llama only, 24 prompts, 2 rounds",
                options=[("--batch-size", {"type": int, "default": 8}),
                         ("--max-new-tokens", {"type": int, "default": 32})], argv=argv)


if __name__ == "__main__":
    main()
