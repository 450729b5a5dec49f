"""The SFT forward step under Bridge's real finetune() loop: HF parity, exact per-token averaging.

Tolerances (fp32 on CPU): losses agree with HF to 1e-5 absolute; updated weights
of runs that must be identical agree to 1e-6 of the largest update, while runs
that must differ differ by more than 1e-2 of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from launch import train_tiny
from samples import dialog_token_samples

from bridge_sft.batch import normalize_batch

SEQ = 32
UNEQUAL = [32, 3, 20, 9]  # supervised tokens per sequence: very unequal micro-batches


def hf_token_mean_loss(hf_dir, samples) -> tuple[float, torch.Tensor]:
    """HF's own loss on the same tokens and mask (labels -100 where unsupervised), and its gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.train()  # dropout is 0 in the tiny configs; train mode = what finetune() runs
    input_ids, labels = [], []
    for s in samples:
        input_ids.append(s["tokens"] + s["labels"][-1:])
        labels.append([-100] + [t if m else -100 for t, m in zip(s["labels"], s["loss_mask"])])
    out = model(input_ids=torch.tensor(input_ids), labels=torch.tensor(labels))
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.loss.item(), grads


def ours_token_mean(result, iteration_micro_batches) -> float:
    loss_sum = sum(mb["loss_sum"] for mb in iteration_micro_batches)
    num_tokens = sum(mb["num_tokens"] for mb in iteration_micro_batches)
    return loss_sum / num_tokens


def run(tmp_path, name, hf, samples, nproc=1, **spec):
    return train_tiny(tmp_path, name, {"hf": str(hf), "samples": samples, "seq_length": SEQ, **spec}, nproc)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loss_matches_hf_and_manual_path(arch, tiny_llama, tiny_qwen3, tmp_path):
    """Per-token losses from the model, reduced by masked_next_token_loss, equal HF's loss (1e-5);
    the logged "lm loss" is the supervised-token mean of the global batch; the old manual path
    (logits, shift, cross_entropy, mask) gives the same loss_sum and num_tokens."""
    hf = {"llama": tiny_llama, "qwen3": tiny_qwen3}[arch]
    samples = dialog_token_samples(hf, 4, SEQ, supervised=UNEQUAL)
    # qwen3 runs with HF-style labels (-100, no loss_mask): normalize_batch must turn them into loss_mask=0.
    result = run(tmp_path, arch, hf, samples, iters=1, mbs=2, gbs=4, record=True, manual=True,
                 hf_labels=arch == "qwen3")
    step1 = [mb for mb in result["micro_batches"] if mb["training"]]
    assert len(step1) == 2 and [mb["num_tokens"] for mb in step1] == [35, 29]

    hf_loss, _ = hf_token_mean_loss(hf, samples)
    ours = ours_token_mean(result, step1)
    print(f"{arch}: ours {ours:.8f} HF {hf_loss:.8f} |diff| {abs(ours - hf_loss):.2e}")
    assert abs(ours - hf_loss) < 1e-5, (ours, hf_loss)
    # Hand computation of the logged value from the recorded per-token losses and masks.
    by_hand_sum = sum(
        loss * mask
        for mb, pair in zip(step1, (samples[0:2], samples[2:4]))
        for row, s in zip(mb["per_token"], pair)
        for loss, mask in zip(row, s["loss_mask"])
    )
    by_hand = by_hand_sum / sum(UNEQUAL)
    assert result["losses"][1] == pytest.approx(by_hand, rel=1e-6)
    assert abs(result["losses"][1] - hf_loss) < 1e-5
    # The unweighted mean of the two micro-batch means differs by 10x the tolerance: the test can tell.
    mean_of_means = sum(mb["loss_sum"] / mb["num_tokens"] for mb in step1) / 2
    assert abs(mean_of_means - result["losses"][1]) > 1e-4

    for mb in step1:
        assert mb["manual_num_tokens"] == mb["num_tokens"]
        assert mb["manual_loss_sum"] == pytest.approx(mb["loss_sum"], rel=1e-6)


def _max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _update(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def test_gradient_accumulation_data_parallel_and_all_masked_invariance(tiny_llama, tmp_path):
    """One SGD step (lr 1, no clipping, no weight decay: the update IS the gradient) on the same
    4 sequences with unequal supervised-token counts:

    A: 1 micro-batch of 4: the global per-token mean by construction, checked against HF's gradient;
    B: 4 micro-batches of 1; DP: torchrun DP=2, 2 micro-batches per rank. B and DP must equal A.
    C: B with calculate_per_token_loss=False (Bridge's default, a mean of micro-batch means) must not.
    D: 4 micro-batches, one of them all-masked, must equal E: the 3 others alone.
    """
    samples = dialog_token_samples(tiny_llama, 4, SEQ, supervised=UNEQUAL)
    sgd = {"iters": 1, "optimizer": "sgd", "lr": 1.0, "clip_grad": 0.0}

    def step(name, data, nproc=1, **spec):
        w0, w1 = tmp_path / f"{name}.w0.pt", tmp_path / f"{name}.w1.pt"
        result = run(tmp_path, name, tiny_llama, data, nproc=nproc, weights_before=str(w0), weights=str(w1),
                     record=True, **sgd, **spec)
        return result, _update(torch.load(w0), torch.load(w1))

    a, update_a = step("A", samples, mbs=4, gbs=4)
    b, update_b = step("B", samples, mbs=1, gbs=4)
    c, update_c = step("C", samples, mbs=1, gbs=4, per_token=False)
    dp, update_dp = step("DP", samples, nproc=2, mbs=1, gbs=4)
    scale = max(v.abs().max().item() for v in update_a.values())
    assert scale > 1e-3  # the step did move the weights

    # A's update is the gradient of HF's global per-token mean loss (same tokens and mask).
    hf_loss, hf_grads = hf_token_mean_loss(tiny_llama, samples)
    assert abs(a["losses"][1] - hf_loss) < 1e-5
    for megatron_name, hf_name in [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                                   ("output_layer.weight", "lm_head.weight"),
                                   ("decoder.final_layernorm.weight", "model.norm.weight")]:
        torch.testing.assert_close(-update_a[megatron_name], hf_grads[hf_name], rtol=0, atol=1e-6 * scale + 1e-7)

    print(f"largest update {scale:.3e}; |B-A| {_max_abs_diff(update_b, update_a):.3e}, "
          f"|DP-A| {_max_abs_diff(update_dp, update_a):.3e}, |C-A| {_max_abs_diff(update_c, update_a):.3e}")
    assert _max_abs_diff(update_b, update_a) < 1e-6 * scale, "gradient accumulation changed the update"
    assert _max_abs_diff(update_dp, update_a) < 1e-6 * scale, "data parallelism changed the update"
    assert _max_abs_diff(update_c, update_a) > 1e-2 * scale, "mean of means should differ from the token mean"
    for result in (a, b, dp):
        assert result["losses"][1] == pytest.approx(hf_loss, abs=1e-5)

    # All-masked micro-batch: finite, zero tokens, and no effect on the update.
    masked = [samples[0], {**samples[1], "loss_mask": [0] * SEQ}, samples[2], samples[3]]
    d, update_d = step("D", masked, mbs=1, gbs=4)
    e, update_e = step("E", [samples[0], samples[2], samples[3]], mbs=1, gbs=3)
    step_d = [mb for mb in d["micro_batches"] if mb["training"]]
    assert [mb["num_tokens"] for mb in step_d] == [32, 0, 20, 9]
    assert step_d[1]["loss_sum"] == 0.0
    assert all(math.isfinite(mb["loss_sum"]) for mb in step_d)
    assert math.isfinite(d["losses"][1]) and d["losses"][1] == pytest.approx(e["losses"][1], rel=1e-6)
    print(f"|D-E| {_max_abs_diff(update_d, update_e):.3e}")
    assert _max_abs_diff(update_d, update_e) < 1e-6 * scale


def test_data_running_out_names_the_cause(tiny_llama, tmp_path):
    samples = dialog_token_samples(tiny_llama, 8, SEQ)
    with pytest.raises(AssertionError) as failure:
        run(tmp_path, "short", tiny_llama, samples, iters=3, mbs=2, gbs=4, finite=True)
    output = str(failure.value)
    assert "DataExhaustedError: the training data ran out at iteration 3 of 3 after 8 samples" in output
    assert "StopIteration" not in output.split("DataExhaustedError")[-1]


def test_normalize_batch_shapes_positions_and_ignore_index():
    tokens = torch.tensor([5, 6, 7, 8, 9, 10])
    labels = torch.tensor([6, -100, 8, 9, -100, 11])
    batch = normalize_batch({"tokens": tokens, "labels": labels})
    assert batch["tokens"].shape == (1, 6)
    assert batch["labels"].tolist() == [[6, 0, 8, 9, 0, 11]]
    assert batch["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]

    mask = torch.tensor([[1.0, 1, 1, 0, 1, 1]])
    cu = torch.tensor([[0, 2, 5, 6]], dtype=torch.int32)
    packed = normalize_batch({"tokens": tokens[None], "labels": labels[None], "loss_mask": mask, "cu_seqlens_q": cu})
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    assert packed["loss_mask"].tolist() == [[1, 0, 1, 0, 0, 1]]  # -100 wins over a given mask of 1
