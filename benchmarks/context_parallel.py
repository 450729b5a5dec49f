"""Context parallelism on the CPU: CP=2 (two processes, gloo) vs one process at the same global batch, one
8,192-token sequence, the tiny Llama (bridge_sft.tiny: 2 layers, hidden 64, vocab 512), fp32.

Each configuration runs in its own ``torchrun`` (the model built from the HF weights by Bridge, megatron's
parallel state with ``context_parallel_size`` 1 or 2, the sequence split by megatron-core's own
``get_batch_on_this_cp_rank``); a step is the model's forward with labels (per-token losses), the masked
loss sum, and the backward. Reported: median seconds per step over ``steps`` steps after a warm-up, the
ratio CP=2 / 1 process (the two runs alternate, ``rounds`` times each, and the ratio is the median of
the per-round ratios), and the extra peak memory (RSS) of the steps per rank. Not through ``finetune()``:
its optimizer, logging and data loader are the same either way, the model's step is what CP changes.

Expected: attention is quadratic, so CP=2 halves each rank's query rows but its K/V are the full
sequence (all-gathered): per rank about half the activations (per-token parts and attention rows),
plus the gathered K/V; time per step about half of the compute plus the gather/reduce-scatter, on a
machine whose cores the two ranks share (2 cores here: the ratio says what CP costs, not what it buys).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

SEQ = 8192


def worker(spec_path: str) -> None:
    """Under torchrun: time ``spec["steps"]`` steps at ``spec["cp"]``; rank 0 writes ``spec["out"]``."""
    spec = json.loads(Path(spec_path).read_text())
    from bridge_sft import runtime

    runtime.enable()
    import torch

    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import get_batch_on_this_cp_rank

    from bridge_sft.models import megatron_provider

    cp = spec["cp"]
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    provider = megatron_provider(spec["hf"], load_weights=True)
    runtime.configure_model(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.context_parallel_size = cp
    provider.seq_length = SEQ
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, SEQ + 1), generator=gen)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(SEQ).unsqueeze(0),
             "loss_mask": torch.ones(1, SEQ), "cu_seqlens": None}
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())

    def step():
        model.zero_grad(set_to_none=True)
        losses = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                       labels=batch["labels"])
        (losses * batch["loss_mask"]).sum().backward()

    step()  # warm-up
    times = []
    peak = common.peak_rss_mb(lambda: [times.append(_timed(step, torch)) for _ in range(spec["steps"])])
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    if torch.distributed.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps({"seconds": statistics.median(times), "peak_mb": peaks}))
    torch.distributed.destroy_process_group()


def _timed(step, torch) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    step()
    torch.distributed.barrier()
    return time.perf_counter() - start


def _measure(hf: Path, cp: int, steps: int, tmp: Path) -> dict:
    spec = {"hf": str(hf), "cp": cp, "steps": steps, "out": str(tmp / f"cp{cp}.json")}
    spec_path = tmp / f"cp{cp}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cp)),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", "--master-addr=127.0.0.1",
           f"--master-port={29500 + os.getpid() % 1000 + cp}", __file__, "--worker", str(spec_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"CP={cp} run failed:\n{proc.stdout[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def run(quick: bool = False) -> list[dict]:
    from bridge_sft.tiny import build_tiny_model

    rounds, steps = (1, 3) if quick else (2, 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_tiny_model(tmp / "tiny-llama", arch="llama")
        results = {1: [], 2: []}
        for _ in range(rounds):
            for cp in (1, 2):
                results[cp].append(_measure(hf, cp, steps, tmp))
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(results[1], results[2])]
    rows = []
    for cp in (1, 2):
        rows.append({"layout": "1 process" if cp == 1 else "CP=2 (2 ranks)", "seq": SEQ,
                     "seconds_per_step": statistics.median(r["seconds"] for r in results[cp]),
                     "time_vs_1_process": 1.0 if cp == 1 else statistics.median(ratios),
                     "peak_mb_per_rank": max(max(r["peak_mb"]) for r in results[cp])})
    rows[1]["memory_vs_1_process"] = rows[1]["peak_mb_per_rank"] / rows[0]["peak_mb_per_rank"]
    return rows


def markdown(rows: list[dict]) -> str:
    return common.markdown_table(rows)


if __name__ == "__main__":
    common.main(__doc__, run, markdown, quick_help="1 round of 3 steps per layout instead of 2 of 5",
                worker=worker)
