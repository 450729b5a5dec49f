"""HF checkpoint in, trained HF checkpoint out: ``bridge-sft train tiny`` (full and LoRA) on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from launch import REPO, free_port, run_python
from probes import hf_logits, probe_tokens, train_lora_probe
from terminal import ALARMING

ITERATION_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.]+E[+-]\d+)")


def greedy_reply(hf_dir, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=[model.generation_config.eos_token_id, tokenizer.eos_token_id])
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def bridge_sft(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bridge_sft.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"})


def test_train_tiny_from_the_command_line_hf_in_hf_out(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = bridge_sft("train", "tiny", f"hf_path={tiny_llama}", f"output_dir={out}", "train_iters=12",
                      "log_interval=1", "eval_interval=6", "save_interval=12", "eval_samples=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The log holds Bridge's full output: its config dump, its per-iteration lines, ours.
    log_path = out / "logs" / "rank0.log"
    log = log_path.read_text()
    losses = {int(i): float(v) for i, v in ITERATION_LOSS.findall(log)}
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.2, losses
    assert "Configuration Summary" in log and "[bridge-sft] iteration       12 | supervised tokens/s" in log
    # The console without a terminal: the header, plain progress lines showing Bridge's losses, the
    # summary, and no noise (tests/test_console.py has the terminal's).
    console = proc.stdout + proc.stderr
    assert proc.stdout.startswith("bridge-sft train tiny\n  model ")
    shown = {int(i): float(v) for i, v in re.findall(r"^iteration +(\d+)/12 \| loss ([0-9.]+) \|", proc.stdout, re.M)}
    assert sorted(shown) == list(range(1, 13))  # log_interval=1: a line per iteration, loss of that iteration
    assert all(abs(shown[i] - losses[i]) < 1e-4 for i in shown), (shown, losses)
    assert "validation at iteration 6: loss" in proc.stdout
    # Every evaluation is one pass over the same held-out samples: the same weights give the same line.
    last = re.search(r"^validation at iteration 12: (loss .*)$", proc.stdout, re.M)
    after = re.search(r"^validation after training \(iteration 12\): (loss .*)$", proc.stdout, re.M)
    assert last and after and last.group(1) == after.group(1), proc.stdout
    assert "200 samples held out for validation (all of them at every evaluation)" in proc.stdout
    # eval_samples=1: the greedy answer to one held-out prompt after each evaluation (not again after training)
    answered = re.findall(r"^sample 1/1 at iteration (\d+): .*\n  answer: .*\n  reference: .+$", proc.stdout, re.M)
    assert answered == ["6", "12"], proc.stdout
    assert "sample 1/1 at iteration 12: " in log  # the rank log has them too, and TensorBoard as text
    assert b"eval_samples/1" in b"".join(p.read_bytes() for p in (out / "tb_logs").rglob("events.out.tfevents*"))
    assert "checkpoint saved at iteration 12" in proc.stdout and "done: 12 iterations" in proc.stdout
    assert re.search(rf"^  full log +{re.escape(str(log_path))}", proc.stdout, re.M)
    assert not ALARMING.search(console), console
    assert len(console.splitlines()) < 46  # header, 12 progress lines, 3 validations, 2 x 3 sample lines, summary
    export = out / "checkpoints" / "iter_0000012" / "hf"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()

    # The exported HF model reproduces the trained Megatron model (loaded from its checkpoint).
    tokens = probe_tokens(tiny_llama, tmp_path / "tokens.json")
    run_python("megatron_logits.py", out / "checkpoints", tiny_llama, tmp_path / "tokens.json",
               tmp_path / "megatron.pt")
    megatron = torch.load(tmp_path / "megatron.pt")
    hf = hf_logits(export, tokens)
    original = hf_logits(tiny_llama, tokens)
    assert (hf - original).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(hf, megatron, rtol=0, atol=1e-4)

    # bridge-sft chat answers with the trained model: from the HF export, and from the Megatron checkpoint
    # (exported on the fly); both are the greedy reply transformers gives with the chat template.
    ask = ["--prompt", "How are you?", "--temperature", "0", "--max-new-tokens", "12"]
    replies = [bridge_sft("chat", model, *ask, cwd=tmp_path) for model in (export, out / "checkpoints")]
    for reply in replies:
        assert reply.returncode == 0, reply.stderr[-3000:]
    assert "exporting the Megatron checkpoint" in replies[1].stderr
    assert replies[0].stdout == replies[1].stdout == greedy_reply(export, "How are you?", 12) + "\n"
    assert replies[0].stdout.strip()


def test_lora_trains_only_adapters_and_exports_merged(tiny_llama, tmp_path):
    probe, tokens, out = train_lora_probe(tiny_llama, tmp_path, train_iters=12, save_hf=True)
    assert probe["trainable"] and all(".adapter." in name for name in probe["trainable"]), probe["trainable"]
    assert 0 < probe["trainable_params"] < 0.2 * probe["total_params"], probe
    assert probe["frozen_changed"] == []
    losses = {int(k): v for k, v in probe["losses"].items()}
    assert losses[12] < losses[1] - 0.1, losses

    # save_hf=true: Bridge writes the HF PEFT adapter beside the checkpoint, bridge-sft its tokenizer beside it.
    adapter = out / "checkpoints" / "iter_0000012" / "hf"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    from transformers import AutoTokenizer

    tokenizer, original = AutoTokenizer.from_pretrained(str(adapter)), AutoTokenizer.from_pretrained(str(tiny_llama))
    chat = [{"role": "user", "content": "How are you?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)
    assert tokenizer("How are you?")["input_ids"] == original("How are you?")["input_ids"]

    proc = bridge_sft("convert", "export", out / "checkpoints", tmp_path / "merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = hf_logits(tmp_path / "merged", tokens)
    trained = torch.load(out / "probe_logits.pt")
    assert (merged - hf_logits(tiny_llama, tokens)).abs().max() > 1e-3  # the adapters were merged in
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-4)


def test_train_command_under_torchrun_with_tensor_parallelism(tiny_llama, tmp_path):
    """The README's multi-GPU form, on 2 CPU ranks over gloo: every rank runs the same command."""
    out = tmp_path / "tp2"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "-m", "bridge_sft.cli", "train", "tiny", f"hf_path={tiny_llama}",
         f"output_dir={out}", "tensor_parallel=2", "train_iters=4", "log_interval=1", "eval_interval=null",
         "save_interval=4", "save_hf=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every rank writes its own log; Bridge prints its per-iteration line on the last rank, its config on rank 0.
    logs = [(out / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    losses = {int(i): float(v) for i, v in ITERATION_LOSS.findall(logs[1])}
    assert sorted(losses) == [1, 2, 3, 4]
    assert "tensor_model_parallel_size: 2" in logs[0]
    # Only rank 0 draws the console.
    assert proc.stdout.count("bridge-sft train tiny\n") == 1 and proc.stdout.count("done: 4 iterations") == 1
    assert "TP 2, PP 1, CP 1, DP 1" in proc.stdout
    assert (out / "checkpoints" / "iter_0000004").is_dir()
