"""The shared datamodule: limited-data subsets, dynamic padding, tokenisation cache."""

import os
from pathlib import Path

import pytest
import torch

from kdlab.components import validate
from kdlab.data.base import EpochSeededSampler
from kdlab.errors import ConfigError
from tests.conftest import build_datamodule, compose
from tests.fixtures import write_tokenizer


@pytest.fixture
def tokenizer(tmp_path):
    return write_tokenizer(tmp_path / "tok")


def _dm(
    glue_root,
    tmp_path,
    tokenizer,
    overrides=(),
    seed=0,
    task="sst2",
    folder="SST-2",
    cache=None,
    batch_size=8,
):
    cfg = compose(
        [
            f"task={task}",
            f"task.data_dir={glue_root / folder}",
            f"task.batch_size={batch_size}",
            f"task.cache_dir={cache or 'null'}",
            f"run_dir={tmp_path}",
            *overrides,
        ]
    )
    validate(cfg)
    dm = build_datamodule(cfg, tokenizer, seed=seed)
    dm.setup()
    return dm


def _train_texts(dm, tokenizer):
    return [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in dm.splits["train"]["input_ids"]
    ]


@pytest.mark.parametrize(
    "limit,size",
    [
        (["task.train_fraction=0.5"], 24),
        (["task.max_train_samples=10"], 10),
        (["task.train_fraction=0.5", "task.max_train_samples=10"], 10),
    ],
)
def test_subset_depends_on_subset_seed_only(limit, size, glue_root, tmp_path, tokenizer):
    a = _train_texts(_dm(glue_root, tmp_path, tokenizer, limit, seed=1), tokenizer)
    b = _train_texts(_dm(glue_root, tmp_path, tokenizer, limit, seed=2), tokenizer)
    c = _train_texts(
        _dm(glue_root, tmp_path, tokenizer, [*limit, "task.subset_seed=1"], seed=1), tokenizer
    )
    full = _train_texts(_dm(glue_root, tmp_path, tokenizer), tokenizer)
    assert len(a) == size and a == b
    assert len(c) == size and c != a
    assert set(a) <= set(full)
    assert len(full) == 48


def test_subset_validation_untouched_and_bad_fraction(glue_root, tmp_path, tokenizer):
    dm = _dm(glue_root, tmp_path, tokenizer, ["task.max_train_samples=5"])
    assert len(dm.splits["train"]) == 5 and len(dm.splits["validation"]) == 24
    with pytest.raises(ConfigError, match="train_fraction"):
        _dm(glue_root, tmp_path, tokenizer, ["task.train_fraction=1.5"])


def test_dynamic_padding_and_max_seq_length(glue_root, tmp_path, tokenizer):
    dm = _dm(glue_root, tmp_path, tokenizer, task="rte", folder="RTE", batch_size=4)
    widths = set()
    for batch in dm.train_dataloader():
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())
        assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1  # batches are padded to their own longest, not a global length
    short = _dm(glue_root, tmp_path, tokenizer, ["task.max_seq_length=8"], task="rte", folder="RTE")
    assert max(len(ids) for ids in short.splits["train"]["input_ids"]) == 8


def test_training_order_from_seed_and_epoch():
    sampler = EpochSeededSampler(20, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(20)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = EpochSeededSampler(20, seed=3)
    other.set_epoch(1)
    torch.manual_seed(123)  # the global generator plays no part
    assert list(other) == second


def test_tokenisation_cache_is_reused(glue_root, tmp_path, tokenizer):
    cache = tmp_path / "cache"
    first = _dm(glue_root, tmp_path, tokenizer, cache=cache)
    files = sorted((cache / "sst2").glob("*.arrow"))
    assert {f.name.split("-")[0] for f in files} == {"train", "validation"}
    stamps = {f: os.stat(f).st_mtime_ns for f in files}

    second = _dm(glue_root, tmp_path, write_tokenizer(tmp_path / "tok2"), cache=cache)
    assert sorted((cache / "sst2").glob("*.arrow")) == files
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps  # read, not rewritten
    for split in ("train", "validation"):
        used = {Path(c["filename"]) for c in second.splits[split].cache_files}
        assert used & set(files), split
        assert second.splits[split]["input_ids"] == first.splits[split]["input_ids"]

    # another max_seq_length (or other data) is another cache entry
    _dm(glue_root, tmp_path, tokenizer, ["task.max_seq_length=16"], cache=cache)
    assert len(list((cache / "sst2").glob("*.arrow"))) == 4
