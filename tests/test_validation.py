"""Validation a user can trust: every evaluation covers each held-out sample exactly once, so the validation
loss is a function of the weights alone (``bridge_sft.train.plan_full_validation``,
``bridge_sft.data.datasets.FullPassDataset``).

Bridge's real ``finetune()`` on the tiny Llama with the ``tiny`` recipe (200 held-out dialogs by default),
learning rate 0 so the weights stay the HF model's: every evaluation of a run gives the same number, the
same in every layout (packed, unpacked micro-batch 4, DP=2, PP=2), and that number is the HF model's
per-token loss over exactly the held-out samples, with exactly their supervised tokens counted. The greedy
answers ``eval_samples`` shows at each evaluation are HF ``generate``'s, token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from launch import run_python, run_torchrun

from bridge_sft.tiny import SAMPLE_DIALOGS

LAYOUTS = {
    "packed": (1, []),
    "unpacked-mbs4": (1, ["packing=false", "micro_batch_size=4"]),
    "dp2": (2, []),
    "pp2": (2, ["packing=false", "pipeline_parallel=2"]),
}


def test_each_pass_holds_every_held_out_sample_once(tmp_path, tiny_llama):
    """Per evaluation pass, packed, unpacked and for a two-source mixture: the items hold exactly the held-out
    samples (by content) and their supervised tokens, per source; the filler items supervise nothing."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SAMPLE_DIALOGS.read_text(encoding="utf-8").splitlines(True)[:60]), encoding="utf-8")
    out = tmp_path / "layout.json"
    run_python("validation_layout.py", tiny_llama, data, out, tmp_path / "cache")
    facts = json.loads(out.read_text())
    assert facts["packed"]["items"] < facts["packed"]["held_out"] == 7  # packs of several dialogs
    assert facts["mixture"]["held_out"] == 14 and len(facts["mixture"]["expected_tokens"]) == 2
    for name, f in facts.items():
        assert f["pass_items"] % 4 == 0 and f["items"] <= f["pass_items"] < f["items"] + 4, (name, f)
        assert f["len"] == 3 * f["pass_items"], (name, f)
        for p in f["passes"]:
            assert p["samples_match"], (name, f)
            assert p["tokens"] == f["expected_tokens"], (name, f)


def _hf_reference(hf_dir, held_out) -> tuple[float, int]:
    """The HF model's mean per-token loss over the held-out samples' supervised tokens, and their count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in held_out:
            ids, mask = torch.tensor(ids), torch.tensor(mask[1:], dtype=torch.float64)
            logits = model(input_ids=ids[None, :-1]).logits[0].double()
            losses = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            total += float((losses * mask).sum())
            count += int(mask.sum())
    return total / count, count


@pytest.mark.parametrize("layout", [
    name if name in ("packed", "unpacked-mbs4") else pytest.param(name, marks=pytest.mark.extended)
    for name in LAYOUTS
])
def test_every_evaluation_of_the_same_weights_gives_the_same_loss(layout, tiny_llama, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    out = tmp_path / "passes.json"
    args = [out, "tiny", f"hf_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "train_iters=2",
            "eval_interval=1", "eval_iters=3", "lr=0", "min_lr=0", "warmup_iters=0", "save_interval=null",
            "save_hf=false", *overrides]
    if nproc == 1:
        run_python("validation_passes.py", *args, timeout=900)
    else:
        run_torchrun("validation_passes.py", *args, nproc=nproc, timeout=900)
    r = json.loads(out.read_text())
    assert len(r["held_out"]) == 200  # the recipe's default validation_samples
    assert [step for step, _ in r["evaluations"]] == [1, 2, 2]  # at 1, at 2, after training
    losses = [loss for _, loss in r["evaluations"]]
    assert losses[0] == losses[1] == losses[2], losses  # eval_iters=3 was replaced: each is one full pass
    assert r["eval_iters"] > 3
    reference, supervised = _hf_reference(tiny_llama, r["held_out"])
    assert r["eval_tokens"] == [supervised] * 3
    assert losses[0] == pytest.approx(reference, rel=1e-5, abs=0)
    if r["sample_answers"] is not None:  # eval_samples: answered at 1 and 2 (after training: same weights)
        assert [step for step, _ in r["sample_answers"]] == [1, 2]
        assert r["sample_answers"][0][1] == r["sample_answers"][1][1] == _hf_greedy(tiny_llama, r["sample_prompts"])


def _hf_greedy(hf_dir, prompts) -> list[list[int]]:
    """HF ``generate``'s greedy answers (24 new tokens at most, stopping at the end of turn or eos)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    eos = AutoTokenizer.from_pretrained(str(hf_dir)).eos_token_id
    answers = []
    for prompt, reference in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=sorted({eos, reference[-1]}), pad_token_id=eos)
        answers.append(out[0, len(prompt):].tolist())
    return answers
