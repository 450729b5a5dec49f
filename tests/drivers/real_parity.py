"""Driver: a real pretrained checkpoint's Megatron model vs its HF model, on long real text.

Usage: ``real_parity.py OUT.json HF_DIR LENGTH [LENGTH ...]``. One token sequence per LENGTH,
cut from English dialogs of the bundled sample written out as plain text (the tokenizer's BOS
first, when it has one), so that a length above the model's sliding window crosses it.

The Megatron model is built from the HF weights by ``bridge_sft.models.megatron_provider`` on
the CPU runtime (fp32), and compared with the HF model (fp32, eager) on every position:

- ``logits``: the model called without labels, each sequence on its own (``unpacked``) and all
  sequences in one THD pack (``packed``, ``PackedSeqParams`` as Bridge builds them): max |logit
  diff| and top-1 agreement;
- ``ce``: per-token cross-entropy through ``bridge_sft.step.forward_step`` (Bridge's ``get_batch``,
  the model called with labels, every token supervised), packed (``PackedSFTDataset``) and one
  sequence at a time (``SFTDataset``), vs HF's ``cross_entropy(logits[:-1], ids[1:])``.

Writes ``{"lengths", "logits_unpacked", "logits_packed", "top1_unpacked", "top1_packed",
"ce_unpacked", "ce_packed" (max |diff|), "ce_unpacked_vs_tolerance", "ce_packed_vs_tolerance" (the
largest |diff| / (1e-4 + 1e-5 |hf loss|): at most 1 within ``assert_close``'s bound), "hf_ce_mean",
"vocab_size", "seconds"}``.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bridge_sft import runtime

runtime.enable()

from megatron.bridge.training.model_load_save import temporary_distributed_context  # noqa: E402
from megatron.bridge.training.state import GlobalState  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bridge_sft.data.datasets import PackedSFTDataset, SFTDataset  # noqa: E402
from bridge_sft.data.packing import PackPlan  # noqa: E402
from bridge_sft.models import megatron_provider  # noqa: E402
from bridge_sft.recipes import tiny  # noqa: E402
from bridge_sft.step import forward_step  # noqa: E402
from bridge_sft.tiny import SAMPLE_DIALOGS  # noqa: E402


class Samples:
    """The ``PreparedData`` interface the datasets read (every token supervised)."""

    def __init__(self, ids):
        self.ids = [np.asarray(i, dtype=np.int64) for i in ids]
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)

    def sample(self, i):
        return self.ids[i], np.ones_like(self.ids[i], dtype=np.uint8)


def english_text() -> str:
    """The bundled dialogs whose turns are plain ASCII, as one ``User:``/``Assistant:`` transcript."""
    lines = []
    with open(SAMPLE_DIALOGS, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            if all(m["content"].isascii() for m in messages):
                lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n".join(lines)


def token_rows(tokenizer, lengths):
    ids = tokenizer(english_text(), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows, start = [], 0
    for n in lengths:
        body = n - len(bos)
        if start + body > len(ids):
            raise RuntimeError(f"the sample text has {len(ids)} tokens, fewer than the {sum(lengths)} asked for")
        rows.append(bos + ids[start:start + body])
        start += body
    return rows


def build_model(hf_dir, seq_length):
    provider = megatron_provider(str(hf_dir), load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.seq_length = seq_length
    provider.finalize()
    return provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].eval()


def megatron_logits(model, rows):
    """``(unpacked, packed)``: lists of ``[len, vocab]`` logits per row."""
    unpacked = [model(input_ids=torch.tensor([r]), position_ids=torch.arange(len(r))[None],
                      attention_mask=None)[0] for r in rows]
    bounds = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
    longest = max(len(r) for r in rows)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    packed = model(input_ids=torch.tensor([sum(rows, [])]),
                   position_ids=torch.cat([torch.arange(len(r)) for r in rows])[None],
                   attention_mask=None, packed_seq_params=params)[0]
    return unpacked, list(torch.split(packed, [len(r) for r in rows]))


def step_losses(state, model, item, collate):
    output, _ = forward_step(state, iter([collate([item])]), model)
    return output.detach().float().reshape(-1)


def main(out, hf_dir, *lengths):
    start = time.time()
    lengths = [int(n) for n in lengths]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = token_rows(tokenizer, lengths)
    samples = Samples(rows)
    pack_length = sum(lengths) - len(lengths) + 3  # inputs are ids[:-1]; 3 slots of padding
    n = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack = PackedSFTDataset(samples, np.arange(n), PackPlan(np.array([0, n]), np.arange(n), pack_length),
                            pack_length, shuffle=False, pad_id=pad, name="real")[0]
    single = SFTDataset(samples, np.arange(n), max(lengths) - 1, shuffle=False, pad_id=pad, name="real")

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = [hf(torch.tensor([r])).logits[0] for r in rows]
    del hf
    hf_ce = [torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(r[1:]), reduction="none")
             for lg, r in zip(hf_logits, rows)]

    result = {"lengths": lengths, "hf_ce_mean": float(torch.cat(hf_ce).mean())}
    with temporary_distributed_context(backend="gloo"):
        config = tiny(hf_path=str(hf_dir), seq_length=pack_length)
        state = GlobalState()
        state.cfg = config
        model = build_model(hf_dir, pack_length)
        with torch.no_grad():
            for layout, logits in zip(("unpacked", "packed"), megatron_logits(model, rows)):
                result[f"logits_{layout}"] = max((m - h).abs().max().item() for m, h in zip(logits, hf_logits))
                agree = sum((m.argmax(-1) == h.argmax(-1)).sum().item() for m, h in zip(logits, hf_logits))
                result[f"top1_{layout}"] = agree / sum(lengths)
                del logits
            packed = step_losses(state, model, pack, PackedSFTDataset.collate_fn)
            unpacked = [step_losses(state, model, single[i], torch.utils.data.default_collate) for i in range(n)]
    bounds = pack["cu_seqlens_q"].tolist()
    for layout, losses in (("packed", [packed[bounds[i]: bounds[i] + lengths[i] - 1] for i in range(n)]),
                           ("unpacked", [unpacked[i][: lengths[i] - 1] for i in range(n)])):
        diffs = [(ours - theirs).abs() for ours, theirs in zip(losses, hf_ce)]
        result[f"ce_{layout}"] = max(d.max().item() for d in diffs)
        # how far each loss is from torch.testing.assert_close's bound (atol 1e-4, rtol 1e-5): <= 1 passes
        result[f"ce_{layout}_vs_tolerance"] = max((d / (1e-4 + 1e-5 * h.abs())).max().item()
                                                  for d, h in zip(diffs, hf_ce))
    result["vocab_size"] = int(hf_logits[0].size(-1))
    result["seconds"] = round(time.time() - start, 1)
    print("REAL_PARITY", json.dumps(result), flush=True)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
