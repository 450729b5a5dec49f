"""Mixture-of-experts SFT under Bridge's real finetune(): router losses weighted as in pretraining, invariance
over micro-batching / expert (and data) / tensor parallelism, router health in the log, bad input, LoRA.

Five training processes in all: one single-process run holds every 1-process measurement (15 iterations),
one runs a micro-batch of 4 (and the bad-settings checks), two torchrun runs (EP 2; EP 2 x TP 2), one LoRA.

Router-loss contributions are measured as finalized gradients (after ``finalize_model_grads``) at fixed
weights (SGD, lr 0): the gradient with a router-loss coefficient minus the gradient without it, on the same
micro-batches. Tolerances (fp32 on CPU): equal contributions agree to 1e-6 relative; gradients of runs that
must be identical agree to 1e-6 of the largest gradient entry; losses of parallel runs to 1e-5 relative.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from launch import REPO, run_python, run_torchrun
from samples import dialog_token_samples

sys.path.insert(0, str(REPO))

from benchmarks.moe_common import EXPERTS, TOPK, build_tiny_moe  # noqa: E402

SEQ = 32
SUPERVISED = [12, 3, 20, 4]  # 39 of 128 slots: 30% supervised, very unequal micro-batches
PADDING = [0, 10, 0, 5]  # trailing padding slots (padding_mask) in the "padded" set
AUX, Z = 1.0, 0.1
LAST_ROUTER = "decoder.layers.1.mlp.router.weight"


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


def data_sets(hf):
    full = dialog_token_samples(hf, 4, SEQ)
    part = [{**s, "loss_mask": [1] * n + [0] * (SEQ - n)} for s, n in zip(full, SUPERVISED)]
    padded = [{**s, "padding": p} for s, p in zip(part, PADDING)]
    return {"full": full, "part": part, "padded": padded}


def run_moe(tmp_path, name, hf, schedule, nproc=1, **spec):
    """Run tests/drivers/moe_train.py; ``schedule``: (data set, entry) per iteration. Returns (result, stdout)."""
    sets = data_sets(hf)
    spec = {"hf": str(hf), "out": str(tmp_path / f"{name}.json"), "grads": str(tmp_path / name), "seq_length": SEQ,
            "samples": [s for data, _ in schedule for s in sets[data]], "schedule": [e for _, e in schedule],
            "mbs": 1, "gbs": 4, **spec}
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    proc = run_python("moe_train.py", path) if nproc == 1 else run_torchrun("moe_train.py", path, nproc=nproc)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result, proc.stdout


def grads(tmp_path, name, ranks=1) -> dict[int, dict[str, torch.Tensor]]:
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for rank in range(ranks):
        for iteration, named in torch.load(tmp_path / f"{name}.rank{rank}.pt").items():
            merged.setdefault(iteration, {}).update(named)
    return merged


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_router_loss_grad(weight, micro_batches, kind):
    """coeff x d(router loss)/dW as megatron-core defines the losses in pretraining: each micro-batch's value
    over its non-padding tokens, averaged over the micro-batches. Written from the papers' definitions:
    load balancing (Switch) = E / (k T^2) sum_e (tokens routed to e) (sum of e's softmax scores), routed =
    top-k of the scores; z-loss (ST-MoE) = mean over tokens of logsumexp(logits)^2."""
    weight = weight.double().clone().requires_grad_(True)
    total = 0.0
    for hidden, padding in micro_batches:
        x = hidden.reshape(-1, hidden.shape[-1]).double()
        if padding is not None:
            x = x[~padding.reshape(-1)]
        logits = x @ weight.T
        if kind == "aux":
            scores = torch.softmax(logits, dim=-1)
            routed = torch.zeros_like(scores).scatter(1, scores.topk(TOPK, dim=-1).indices, 1.0).sum(0)
            total = total + AUX * EXPERTS / (TOPK * x.shape[0] ** 2) * (routed * scores.sum(0)).sum()
        else:
            total = total + Z * torch.logsumexp(logits, dim=-1).square().mean()
    (total / len(micro_batches)).backward()
    return weight.grad


def reference_imbalance(weight, micro_batches) -> float:
    counts = torch.zeros(EXPERTS, dtype=torch.float64)
    for hidden, padding in micro_batches:
        x = hidden.reshape(-1, hidden.shape[-1]).double()
        if padding is not None:
            x = x[~padding.reshape(-1)]
        top = torch.softmax(x @ weight.double().T, dim=-1).topk(TOPK, dim=-1).indices
        counts += torch.bincount(top.flatten(), minlength=EXPERTS)
    return (counts.max() / counts.mean()).item()


# One 1-process run (micro-batch size 1, 4 micro-batches) holds every single-process measurement.
ITERATIONS = [
    ("full", {"step": "ours", "aux": AUX, "router_inputs": True}),  # 1
    ("full", {"step": "ours"}),  # 2
    ("part", {"step": "ours", "aux": AUX, "router_inputs": True}),  # 3
    ("part", {"step": "ours"}),  # 4
    ("full", {"step": "ours", "z": Z, "router_inputs": True}),  # 5
    ("part", {"step": "ours", "z": Z}),  # 6
    ("full", {"step": "bridge", "aux": AUX}),  # 7: Bridge's own gpt_step: megatron's unfixed scaling
    ("full", {"step": "bridge"}),  # 8
    ("part", {"step": "bridge", "aux": AUX}),  # 9
    ("part", {"step": "bridge"}),  # 10
    ("full", {"step": "bridge", "z": Z}),  # 11
    ("part", {"step": "bridge", "z": Z}),  # 12
    ("padded", {"step": "ours", "aux": AUX, "z": Z, "router_inputs": True}),  # 13: invariance, router losses on
    ("padded", {"step": "ours"}),  # 14: invariance, router losses off
    ("padded", {"step": "ours", "aux": AUX, "capacity": 1.0}),  # 15: token dropping
]
PARALLEL = [("padded", {"step": "ours", "aux": AUX, "z": Z, "grads": True}),  # = iterations 13, 14, 15
            ("padded", {"step": "ours", "grads": True}), ("padded", {"step": "ours", "aux": AUX, "capacity": 1.0})]


@pytest.fixture(scope="module")
def single(tiny_moe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe-single")
    schedule = [(data, {**entry, "grads": i < 14}) for i, (data, entry) in enumerate(ITERATIONS)]
    result, stdout = run_moe(tmp, "single", tiny_moe, schedule, health={"threshold": 1.0, "intervals": 3})
    return result, stdout, grads(tmp, "single"), torch.load(tmp / "single.router_inputs.pt")


def contribution(g, with_loss, without_loss, name):
    return g[with_loss][name] - g[without_loss][name]


@pytest.mark.slow
def test_router_losses_are_weighted_as_in_pretraining_whatever_the_supervised_share(single):
    """The router-weight gradient of the load-balancing loss and of the z-loss is coeff x d(loss)/dW averaged
    over micro-batches (pretraining's weighting), the same with 100% and with 30% of the tokens supervised,
    and padding is not routed. Bridge's own step (megatron's scaling) is off by exactly the supervised share."""
    _, _, g, inputs = single
    routers = [name for name in g[1] if name.endswith("router.weight")]
    assert len(routers) == 2
    share = 4 * SEQ / sum(SUPERVISED)  # slots / supervised tokens = 3.28
    for name in routers:
        for loss, (full, full_off, part, part_off) in {"aux": (1, 2, 3, 4), "z": (5, 2, 6, 4)}.items():
            ours_full, ours_part = contribution(g, full, full_off, name), contribution(g, part, part_off, name)
            assert ours_full.abs().max() > 1e-4, (name, loss)  # the router loss does reach the gradient
            assert rel(ours_part, ours_full) < 1e-6, (name, loss, rel(ours_part, ours_full))
            # The unfixed scaling fails the same check, by the factor routed / supervised tokens.
            bridge_full = contribution(g, full + 6, full_off + 6, name)
            bridge_part = contribution(g, part + 6, part_off + 6, name)
            assert rel(bridge_full, ours_full) < 1e-6  # 100% supervised: megatron's derivation holds
            assert rel(bridge_part, share * ours_part) < 1e-5, (name, loss)
            assert rel(bridge_part, bridge_full) > 1.0
    # Against the definition, from the last router's own inputs (earlier routers' gradients also carry the
    # later layers' losses through their outputs). Iteration 13 has padding: it must not be routed.
    weight = inputs["weight"]
    for iteration, loss, off in ((1, "aux", 2), (3, "aux", 4), (5, "z", 2)):
        expected = reference_router_loss_grad(weight, inputs[iteration], loss)
        assert rel(contribution(g, iteration, off, LAST_ROUTER).double(), expected) < 1e-6, (iteration, loss)
    padded = reference_router_loss_grad(weight, inputs[13], "aux") + reference_router_loss_grad(weight, inputs[13], "z")
    assert all(p is not None and p.any() for _, p in inputs[13][1::2])  # the padded micro-batches had a mask
    assert rel(contribution(g, 13, 14, LAST_ROUTER).double(), padded) < 1e-6


@pytest.mark.slow
def test_router_health_in_the_log(single):
    """Each log interval: per-layer expert load max/mean (checked against the last router's own inputs),
    dropped token assignments with a capacity factor, and the collapse warning after N intervals."""
    result, stdout, _, inputs = single
    history = {entry["iteration"]: entry for entry in result["health"]}
    assert sorted(history) == list(range(1, len(ITERATIONS) + 1))
    for iteration in (1, 3, 13):
        assert history[iteration]["imbalance"]["2"] == pytest.approx(
            reference_imbalance(inputs["weight"], inputs[iteration]), rel=1e-9)
    assert " [bridge-sft] iteration        1 | expert load max/mean per layer: " in stdout
    assert history[14]["dropped"] is None and history[15]["dropped"] > 0
    assert f"dropped token assignments: {history[15]['dropped']:,.0f}" in stdout
    # threshold 1.0 and 3 intervals in this run: every layer warns once, at iteration 3
    assert stdout.count("router health: MoE layer") == 2
    assert "for 3 log intervals in a row" in stdout and "iteration 3)" in stdout


@pytest.fixture(scope="module")
def micro_batch_of_4(tiny_moe, tiny_llama, tmp_path_factory):
    """Iterations 13 and 14 as one micro-batch of 4; the same process first checks the bad MoE settings."""
    tmp = tmp_path_factory.mktemp("moe-mbs4")
    result, _ = run_moe(tmp, "mbs4", tiny_moe, PARALLEL[:2], mbs=4,
                        config_errors={"dense": str(tiny_llama), "out": str(tmp / "errors.json")})
    return grads(tmp, "mbs4"), json.loads((tmp / "errors.json").read_text())


@pytest.mark.slow
def test_micro_batching_and_expert_tensor_parallel_invariance(single, micro_batch_of_4, tiny_moe, tmp_path):
    """With the router losses on (and padding): 4 micro-batches of 1 == EP 2 (data parallel 2 x 2
    micro-batches, the experts split over the two ranks), gradient within 1e-6 of its largest entry; with
    them off, also 1 micro-batch of 4 (a different micro-batch composition legitimately changes the
    per-micro-batch router losses). EP 2 x TP 2 (sequence parallel, expert TP 1 as Bridge's MoE recipes)
    reproduces the losses; EP 2 also with token dropping."""
    result, _, g, _ = single
    on, off = g[13], g[14]
    scale = max(v.abs().max().item() for v in on.values())

    def max_diff(a, b):
        assert set(a) == set(b)
        return max((a[k] - b[k]).abs().max().item() for k in a)

    g_mbs4, _ = micro_batch_of_4
    ep, _ = run_moe(tmp_path, "ep2", tiny_moe, PARALLEL, nproc=2, ep=2)
    g_ep = grads(tmp_path, "ep2", ranks=2)
    tpep, _ = run_moe(tmp_path, "tp2ep2", tiny_moe, PARALLEL, nproc=2, ep=2, tp=2, sp=True)
    print(f"largest gradient {scale:.3e}; |EP-1| {max_diff(g_ep[1], on):.2e} {max_diff(g_ep[2], off):.2e}, "
          f"|mbs4-1| off {max_diff(g_mbs4[2], off):.2e} on {max_diff(g_mbs4[1], on):.2e}")
    assert scale > 1e-3
    assert max_diff(g_ep[1], on) < 1e-6 * scale
    assert max_diff(g_ep[2], off) < 1e-6 * scale
    assert max_diff(g_mbs4[2], off) < 1e-6 * scale
    assert max_diff(g_mbs4[1], on) > 1e-3 * scale  # router losses on: the micro-batch composition matters
    # Token dropping decides per router call on the tokens it sees: under sequence parallelism each TP rank
    # routes half the sequence with half the capacity, so only the run without TP drops the same tokens.
    for run, iterations in ((ep, (1, 2, 3)), (tpep, (1, 2))):
        for iteration in iterations:
            assert run["losses"][iteration] == pytest.approx(result["losses"][12 + iteration], rel=1e-5)
    assert ep["health"][2]["dropped"] == result["health"][14]["dropped"] > 0


@pytest.mark.slow
def test_bad_moe_settings_name_the_key_and_the_fix(micro_batch_of_4):
    """Each bad setting stops in check_config (before anything is written) with one line naming the key."""
    _, errors = micro_batch_of_4
    expected = {
        "ep_dense": "model.expert_model_parallel_size=2, but this model has no experts",
        "ep_experts": "model.expert_model_parallel_size=3 does not divide model.num_moe_experts=4",
        "ep_world": "the world size 2 is not a multiple of model.expert_model_parallel_size=4",
        "topk": "model.moe_router_topk=5 must be between 1 and model.num_moe_experts=4",
        "lb_type": "model.moe_router_load_balancing_type='switch': unknown ['switch']",
        "sinkhorn": "model.moe_router_load_balancing_type='sinkhorn' balances the load without an auxiliary loss",
        "score": "model.moe_router_score_function='relu'",
        "expert_bias": "model.moe_router_enable_expert_bias=true needs model.moe_router_score_function='sigmoid'",
        "tp_no_sp": "model.tensor_model_parallel_size=2 with experts needs sequence parallelism",
        "pad_capacity": "model.moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor",
        "overlap": "comm_overlap.overlap_moe_expert_parallel_comm=true",
        "cp_z_loss_unpacked": "model.moe_z_loss_coeff=0.001 with context_parallel=2 and unpacked data",
    }
    assert set(errors) == set(expected) | {"ok", "dry_run_world"}
    for key, message in expected.items():
        assert message in errors[key], (key, errors[key])
        assert "\n" not in errors[key]
    assert errors["ok"] is None and errors["dry_run_world"] is None  # world size unknown in a dry run


@pytest.mark.slow
def test_lora_adapts_the_experts_and_exports_merged(tiny_moe, tmp_path):
    """LoRA on attention and MLP of an MoE model adapts every expert's linear layers (Bridge's LoRA, as the
    OLMoE / gpt-oss PEFT recipes use it), never the router; the merged HF export reproduces the trained model."""
    from probes import hf_logits, train_lora_probe
    from test_end_to_end import bridge_sft

    probe, tokens, out = train_lora_probe(tiny_moe, tmp_path, train_iters=6)
    adapted = {name.split(".adapter.")[0] for name in probe["trainable"]}
    assert all(".adapter." in name for name in probe["trainable"])
    experts = {f"decoder.layers.{layer}.mlp.experts.{fc}" for layer in range(2)  # TE's grouped experts
               for fc in ("linear_fc1", "linear_fc2")}
    attention = {f"decoder.layers.{layer}.self_attention.{lin}" for layer in range(2)
                 for lin in ("linear_qkv", "linear_proj")}
    assert adapted == experts | attention
    assert probe["frozen_changed"] == []  # routers included
    losses = {int(k): v for k, v in probe["losses"].items()}
    assert losses[6] < losses[1] - 0.1, losses

    proc = bridge_sft("convert", "export", out / "checkpoints", tmp_path / "merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = hf_logits(tmp_path / "merged", tokens)
    assert (merged - hf_logits(tiny_moe, tokens)).abs().max() > 1e-3  # the adapters were merged in
    torch.testing.assert_close(merged, torch.load(out / "probe_logits.pt"), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_global_aux_loss_of_the_gated_deltanet_moe_is_weighted_as_in_pretraining(tiny_models, tmp_path):
    """Qwen3-Next and Qwen3.5 MoE train with megatron-core's ``global_aux_loss`` (Bridge's providers; its expert
    loads are counted over the whole global batch). On the tiny Qwen3-Next (4 MoE layers, 3 of them after
    gated-DeltaNet layers), its router-weight gradient is the same with 100% and with 30% of the tokens
    supervised (the supervised share does not scale it), and it reaches every router. Bridge's own step is off by
    the supervised share, as for the other load-balancing losses."""
    hf = tiny_models["qwen3_next"]
    schedule = [(data, {"step": step, **aux}) for step in ("ours", "bridge") for data in ("full", "part")
                for aux in ({"aux": AUX}, {})]
    run_moe(tmp_path, "global", hf, [(data, {**entry, "grads": True}) for data, entry in schedule])
    g = grads(tmp_path, "global")
    routers = [name for name in g[1] if name.endswith("router.weight")]
    assert len(routers) == 4, routers
    share = 4 * SEQ / sum(SUPERVISED)
    for name in routers:
        full, part = contribution(g, 1, 2, name), contribution(g, 3, 4, name)
        assert full.abs().max() > 1e-4 * g[2][name].abs().max(), name
        assert rel(part, full) < 1e-6, (name, rel(part, full))
        bridge_full, bridge_part = contribution(g, 5, 6, name), contribution(g, 7, 8, name)
        assert rel(bridge_full, full) < 1e-6 and rel(bridge_part, share * part) < 1e-5, name
