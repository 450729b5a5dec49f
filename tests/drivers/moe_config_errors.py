"""Driver: ``check_config`` on bad MoE settings; write ``{case: error message or None}`` as JSON.

Usage: ``moe_config_errors.py TINY_MOE_DIR TINY_DENSE_DIR OUT.json`` (or ``check_cases`` from another
driver: ``moe_train.py`` runs it before training, to save a process). Every case starts from the tiny MoE
recipe (``sft(..., expert_parallel=...)``) and changes one setting; ``check_config`` runs with a world size
of 2 (``dry_run_world``: world size unknown, as in ``--dry-run``).
"""

import json
import sys

from bridge_sft.recipes import sft
from bridge_sft.tiny import SAMPLE_DIALOGS
from bridge_sft.train import check_config


def check_cases(moe_dir, dense_dir) -> dict:
    def config(hf=moe_dir, **kwargs):
        return sft(hf, str(SAMPLE_DIALOGS), seq_length=64, precision="fp32", **kwargs)

    def model(**fields):
        c = config()
        for key, value in fields.items():
            setattr(c.model, key, value)
        return c

    def model_of(c, **fields):
        for key, value in fields.items():
            setattr(c.model, key, value)
        return c

    overlap = config()
    overlap.comm_overlap = type("CommOverlap", (), {"overlap_moe_expert_parallel_comm": True})()
    cases = {
        "ok": (config(expert_parallel=2), 2),
        "ep_dense": (config(hf=dense_dir, expert_parallel=2), 2),
        "ep_experts": (config(expert_parallel=3), 2),
        "ep_world": (config(expert_parallel=4), 2),
        "dry_run_world": (config(expert_parallel=4), None),
        "topk": (model(moe_router_topk=5), 2),
        "lb_type": (model(moe_router_load_balancing_type="switch"), 2),
        "sinkhorn": (model(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.01), 2),
        "score": (model(moe_router_score_function="relu"), 2),
        "expert_bias": (model(moe_router_enable_expert_bias=True), 2),
        "tp_no_sp": (config(tensor_parallel=2), 2),
        "pad_capacity": (model(moe_pad_expert_input_to_capacity=True), 2),
        "overlap": (overlap, 2),
        "cp_z_loss_unpacked": (model_of(config(packing=False), context_parallel_size=2, moe_z_loss_coeff=1e-3), 2),
    }
    errors = {}
    for name, (cfg, world_size) in cases.items():
        try:
            check_config(cfg, world_size=world_size)
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


if __name__ == "__main__":
    json.dump(check_cases(sys.argv[1], sys.argv[2]), open(sys.argv[3], "w"), indent=1)
