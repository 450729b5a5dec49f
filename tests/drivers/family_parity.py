"""Driver: per-token losses of every tiny model family through bridge_sft's forward step vs the HF model.

Usage: ``family_parity.py OUT.json [--long MIN_TOKENS] HF_DIR [HF_DIR ...]`` (one process; model after model).

For each HF directory: three multi-turn dialogs of the bundled sample, longer than the tiny
sliding window, encoded with the family's chat template (``encode_conversation``: input ids and
assistant mask) -- with ``--long``, one short dialog then one long conversation of MIN_TOKENS to
MIN_TOKENS + 150 tokens (the sample's multi-turn dialogs one after another) instead, so that positions
reach past MIN_TOKENS and published windows are crossed; the Megatron model built from the HF weights by
``bridge_sft.models`` on the CPU runtime (fp32); and

- ``packed``: one THD pack of the three samples (plus trailing padding) as ``PackedSFTDataset``
  emits it, through ``bridge_sft.step.forward_step`` (Bridge's ``get_batch``, the model called
  with labels): per-token losses [s];
- ``unpacked``: each sample on its own, padded to the pack length (``SFTDataset``), through the
  same forward step;
- ``hf``: the HF model's per-token cross-entropy on each sample (``logits[:-1]`` vs ``ids[1:]``).

Writes ``{family: {"packed_vs_hf", "unpacked_vs_hf", "packed_vs_unpacked": max |diff| over every real
token, "hf_fp32_vs_fp64": the same for the HF model in fp32 vs in fp64 (its own fp32 rounding error; None where
HF has no fp64 kernel: MoE experts),
"loss_scale", "tokens", "supervised", "lengths", "seconds"}}``; a family that fails
records ``{"error": "..."}`` and the next one runs.
"""

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bridge_sft import runtime

runtime.enable()

from megatron.bridge.training.model_load_save import temporary_distributed_context  # noqa: E402
from megatron.bridge.training.state import GlobalState  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bridge_sft.data.datasets import PackedSFTDataset, SFTDataset  # noqa: E402
from bridge_sft.data.encoding import encode_conversation  # noqa: E402
from bridge_sft.data.packing import PackPlan  # noqa: E402
from bridge_sft.models import megatron_provider  # noqa: E402
from bridge_sft.recipes import tiny  # noqa: E402
from bridge_sft.step import forward_step  # noqa: E402
from bridge_sft.tiny import SAMPLE_DIALOGS, SLIDING_WINDOW  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/hf_reference.py
from hf_reference import fix_hf_nemotron_h_torch_path  # noqa: E402


class Samples:
    """The ``PreparedData`` interface the datasets read: ``lengths`` and ``sample(i)``."""

    def __init__(self, encoded):
        self.ids = [np.asarray(e.input_ids, dtype=np.int64) for e in encoded]
        self.masks = [np.asarray(e.loss_mask, dtype=np.uint8) for e in encoded]
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)

    def sample(self, i):
        return self.ids[i], self.masks[i]


def dialogs(tokenizer, count=3):
    """The first ``count`` multi-turn dialogs whose encodings exceed the sliding window."""
    encoded = []
    with open(SAMPLE_DIALOGS, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            if len(messages) < 4:
                continue
            enc = encode_conversation(messages, tokenizer)
            if 2 * SLIDING_WINDOW < len(enc.input_ids) <= 120 and sum(enc.loss_mask) > 0:
                encoded.append(enc)
            if len(encoded) == count:
                return encoded
    raise RuntimeError("not enough long multi-turn dialogs in the sample")


def long_conversations(tokenizer, min_tokens, count=1, slack=150):
    """The first short multi-turn dialog, then ``count`` conversations of ``min_tokens`` to
    ``min_tokens + slack`` tokens, each the sample's multi-turn dialogs (user first, assistant last) one
    after another (so a long conversation starts mid-pack: its positions restart there)."""
    encoded, messages = [], []
    with open(SAMPLE_DIALOGS, encoding="utf-8") as f:
        for line in f:
            dialog = json.loads(line)["messages"]
            if len(dialog) < 4:
                continue
            enc = encode_conversation(messages + dialog, tokenizer)
            if len(enc.input_ids) > min_tokens + slack:
                continue  # the next dialog may fit
            messages = messages + dialog
            if len(enc.input_ids) >= min_tokens:
                encoded.append(enc)
                messages = []
            if len(encoded) == count:
                return dialogs(tokenizer, count=1) + encoded
    raise RuntimeError("not enough multi-turn dialogs in the sample")


def hf_token_losses(hf_dir, samples, dtype=torch.float32):
    fix_hf_nemotron_h_torch_path()  # HF's Nemotron-H torch path passes chunk states wrongly (hf_reference.py)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    losses = []
    with torch.no_grad():
        for ids in samples.ids:
            logits = model(torch.from_numpy(ids)[None]).logits[0, :-1].to(dtype)
            losses.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="none"))
    return losses


def step_losses(state, model, item, collate):
    batch = collate([item])
    output, _ = forward_step(state, iter([batch]), model)
    return output.detach().float().reshape(-1)


def family(hf_dir, min_tokens=None):
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    samples = Samples(long_conversations(tokenizer, min_tokens) if min_tokens else dialogs(tokenizer))
    seq_length = int(samples.lengths.sum() - len(samples.lengths)) + 5  # the pack, plus 5 slots of padding
    n = len(samples.lengths)
    pack = PackedSFTDataset(samples, np.arange(n), PackPlan(np.array([0, n]), np.arange(n), seq_length),
                            seq_length, shuffle=False, pad_id=tokenizer.pad_token_id, name="parity")[0]
    single = SFTDataset(samples, np.arange(n), seq_length, shuffle=False, pad_id=tokenizer.pad_token_id,
                        name="parity")

    config = tiny(hf_path=str(hf_dir), seq_length=seq_length)
    state = GlobalState()
    state.cfg = config
    provider = megatron_provider(str(hf_dir), load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.seq_length = seq_length
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].eval()
    with torch.no_grad():
        packed = step_losses(state, model, pack, PackedSFTDataset.collate_fn)
        unpacked = [step_losses(state, model, single[i], torch.utils.data.default_collate) for i in range(n)]
    hf = hf_token_losses(hf_dir, samples)
    try:
        hf64 = hf_token_losses(hf_dir, samples, torch.float64)
    except RuntimeError:  # HF's grouped expert matmul (MoE families) has no fp64 kernel
        hf64 = None

    bounds = pack["cu_seqlens_q"].tolist()
    result = {"packed_vs_hf": 0.0, "unpacked_vs_hf": 0.0, "packed_vs_unpacked": 0.0,
              "hf_fp32_vs_fp64": None if hf64 is None else max((h - h64).abs().max().item() for h, h64 in zip(hf, hf64))}
    for i in range(n):
        real = len(samples.ids[i]) - 1
        p, u = packed[bounds[i]: bounds[i] + real], unpacked[i][:real]
        result["packed_vs_hf"] = max(result["packed_vs_hf"], (p - hf[i]).abs().max().item())
        result["unpacked_vs_hf"] = max(result["unpacked_vs_hf"], (u - hf[i]).abs().max().item())
        result["packed_vs_unpacked"] = max(result["packed_vs_unpacked"], (p - u).abs().max().item())
    result.update(loss_scale=min(h.mean().item() for h in hf), tokens=int(samples.lengths.sum()),
                  supervised=int(sum(m.sum() for m in samples.masks)), lengths=samples.lengths.tolist(),
                  seconds=round(time.time() - start, 1))
    return result


def main(out, hf_dirs, min_tokens=None):
    results = {}
    with temporary_distributed_context(backend="gloo"):
        for hf_dir in hf_dirs:
            name = Path(hf_dir).name
            try:
                results[name] = family(hf_dir, min_tokens)
            except Exception as exc:  # recorded per family so one failure does not hide the others
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, results[name], flush=True)
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    args = sys.argv[2:]
    long = args[:1] == ["--long"]
    main(sys.argv[1], args[2:] if long else args, int(args[1]) if long else None)
