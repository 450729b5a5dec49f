"""Driver: facts about ``SFTDatasetProvider`` with the real Bridge import; JSON to argv[3].

Usage: ``data_provider_facts.py HF_DIR DATA.jsonl OUT.json CACHE_DIR``
"""

import dataclasses
import json
import sys
from types import SimpleNamespace

import yaml

from bridge_sft.data.formats import DataError
from bridge_sft.data.provider import SFTDatasetProvider

from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider  # noqa: E402


def main(hf, data, out, cache_dir):
    facts = {}
    provider = SFTDatasetProvider(data_path=data, tokenizer_path=hf, seq_length=128, packing=True,
                                  train_on="assistant", pad_seq_to_mult=1, cache_dir=cache_dir, seed=7,
                                  validation_fraction=0.25)
    facts["is_dataset_provider"] = isinstance(provider, DatasetProvider)
    facts["loader"] = [provider.dataloader_type, provider.num_workers, provider.persistent_workers]
    dumped = yaml.safe_dump(dataclasses.asdict(provider))
    facts["yaml_roundtrip"] = SFTDatasetProvider(**yaml.safe_load(dumped)) == provider
    train, valid, test = provider.build_datasets(DatasetBuildContext(train_samples=40, valid_samples=6,
                                                                     test_samples=0))
    facts["lengths"] = [len(train), len(valid), test]
    facts["train_item_keys"] = sorted(train[0])
    facts["split_sizes"] = [len(train.indices), len(valid.indices)]
    facts["splits_disjoint"] = not set(train.indices.tolist()) & set(valid.indices.tolist())
    facts["valid_shuffled"] = valid.order.shuffle
    facts["cache_entries"] = sorted(p.name for p in __import__("pathlib").Path(cache_dir).iterdir()
                                    if not p.name.startswith("."))
    unpacked = dataclasses.replace(provider, packing=False, validation_fraction=0.0, validation_path=data)
    train, valid, _ = unpacked.build_datasets(DatasetBuildContext(train_samples=5, valid_samples=3, test_samples=0))
    facts["unpacked_item_keys"] = sorted(train[0])
    facts["unpacked_lengths"] = [len(train), len(valid), len(valid.indices)]
    # eval_interval=None: Bridge asks for no validation items (its sampler rejects an empty dataset)
    _, valid, _ = provider.build_datasets(DatasetBuildContext(train_samples=4, valid_samples=0, test_samples=0))
    facts["no_validation_wanted"] = valid

    from bridge_sft.train import check_config

    config = SimpleNamespace(model=SimpleNamespace(seq_length=256, calculate_per_token_loss=True),
                             ddp=SimpleNamespace(average_in_collective=False), dataset=provider,
                             train=SimpleNamespace(micro_batch_size=1))
    try:
        check_config(config)
        facts["mismatch_error"] = None
    except ValueError as exc:
        facts["mismatch_error"] = str(exc)
    errors = {}
    for field, value in (("truncation", "cut"), ("train_on", "user"), ("validation_fraction", 1.5),
                         ("pad_seq_to_mult", 3), ("format", "csv")):
        try:
            dataclasses.replace(provider, **{field: value})
            errors[field] = None
        except DataError as exc:
            errors[field] = str(exc)
    facts["field_errors"] = errors
    json.dump(facts, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
