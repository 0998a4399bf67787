"""Back-translation paraphrases: file format, generation path, datamodule integration,
and the limited-data subset MixKD's experiments rely on."""

from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import MarianConfig, MarianMTModel

from kdlab import train
from kdlab.augment import backtranslation as bt
from kdlab.errors import ConfigError, DataFormatError
from tests.conftest import build_task
from tests.fixtures import write_glue, write_tokenizer

TEXTS = ["the movie was good", "a bad plot", "i love the dog", "they hate it"]


def augment_cfg(file: Path, model: str = "unused", generate: bool = True):
    return OmegaConf.create(
        {
            "file": str(file),
            "generate": generate,
            "forward_model": model,
            "backward_model": model,
            "batch_size": 2,
            "max_length": 8,
            "device": "cpu",
            "sampling": False,
            "top_p": 0.9,
            "temperature": 1.0,
            "num_beams": 1,
        }
    )


def train_split(indices=(0, 5, 7, 9)) -> datasets.Dataset:
    features = datasets.Features(
        {
            "text_a": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            bt.EXAMPLE_INDEX: datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {"text_a": TEXTS, "label": [1, 0, 1, 0], bt.EXAMPLE_INDEX: list(indices)},
        features=features,
    )


def test_file_round_trip(tmp_path):
    path = tmp_path / "para.tsv"
    first = {3: [("tab\there", 'a "quoted"\nline')], 0: [("x", "y"), ("x2", "y2")]}
    bt.write_paraphrases(path, first, ["text_a", "text_b"])
    bt.write_paraphrases(path, {7: [("z", "w")]}, ["text_a", "text_b"])  # appends, no 2nd header
    assert bt.read_paraphrases(path, ["text_a", "text_b"]) == {**first, 7: [("z", "w")]}
    assert path.read_text().count("index\ttext_a\ttext_b") == 1


def test_bad_header_and_rows_name_the_file(tmp_path):
    path = tmp_path / "para.tsv"
    path.write_text("idx\ttext_a\n0\tx\n")
    with pytest.raises(DataFormatError, match="para.tsv:1"):
        bt.read_paraphrases(path, ["text_a"])
    path.write_text("index\ttext_a\nzero\tx\n")
    with pytest.raises(DataFormatError, match="para.tsv:2"):
        bt.read_paraphrases(path, ["text_a"])


def test_paraphrases_from_file_join_the_split_with_their_labels(tmp_path):
    path = tmp_path / "para.tsv"
    bt.write_paraphrases(
        path,
        {0: [("p0",)], 5: [("p5a",), ("p5b",)], 7: [("p7",)], 9: [("p9",)], 42: [("other",)]},
        ["text_a"],
    )
    augmented = bt.add_paraphrases(train_split(), augment_cfg(path, generate=False))
    assert augmented["text_a"] == [*TEXTS, "p0", "p5a", "p5b", "p7", "p9"]
    assert augmented["label"] == [1, 0, 1, 0, 1, 0, 0, 1, 0]
    assert augmented[bt.EXAMPLE_INDEX] == [0, 5, 7, 9, 0, 5, 5, 7, 9]


def test_missing_paraphrases_without_generation_is_a_config_error(tmp_path):
    path = tmp_path / "para.tsv"
    bt.write_paraphrases(path, {0: [("p0",)]}, ["text_a"])
    with pytest.raises(ConfigError, match=r"task.augment.file=.*3 training examples.*index 5"):
        bt.add_paraphrases(train_split(), augment_cfg(path, generate=False))


def test_offline_generation_points_to_the_file_option(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = augment_cfg(tmp_path / "para.tsv", model="Helsinki-NLP/opus-mt-en-de")
    with pytest.raises(ConfigError, match="task.augment.forward_model.*task.augment.file"):
        bt.add_paraphrases(train_split(), cfg)


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory) -> Path:
    """A randomly initialised one-layer Marian model with the fixture tokenizer."""
    directory = tmp_path_factory.mktemp("marian")
    tokenizer = write_tokenizer(directory)
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    MarianMTModel(config).save_pretrained(directory)
    return directory


def test_generation_writes_the_file_once(tmp_path, tiny_marian, monkeypatch):
    path = tmp_path / "cache" / "para.tsv"
    cfg = augment_cfg(path, model=str(tiny_marian))
    bt.write_paraphrases(path, {5: [("kept",)]}, ["text_a"])
    augmented = bt.add_paraphrases(train_split(), cfg)
    on_file = bt.read_paraphrases(path, ["text_a"])
    assert sorted(on_file) == [0, 5, 7, 9] and on_file[5] == [("kept",)]
    assert len(augmented) == 8
    assert augmented["text_a"][4:] == [on_file[i][0][0] for i in (0, 5, 7, 9)]

    def fail(*args):
        raise AssertionError("generation must not run again")

    monkeypatch.setattr(bt, "back_translate", fail)
    again = bt.add_paraphrases(train_split(), cfg)
    assert again["text_a"] == augmented["text_a"]


# ----------------------------------------------------------------- through the datamodule
def datamodule(glue: Path, tmp_path: Path, seed: int, *overrides: str):
    with initialize_config_dir(config_dir=train.CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "task=rte",
                f"task.data_dir={glue / 'RTE'}",
                f"task.cache_dir={tmp_path / 'cache'}",
                f"run_dir={tmp_path}",
                *overrides,
            ],
        )
    tokenizer = write_tokenizer(tmp_path / "tok")
    module = build_task(cfg.task, tokenizer, seed=seed)
    module.setup()
    return module


def test_backtranslation_config_augments_the_train_subset_only(tmp_path):
    glue = write_glue(tmp_path / "glue", n_train=40, n_dev=12)
    plain = datamodule(glue, tmp_path, 1, "task.train_fraction=0.25")
    path = tmp_path / "para.tsv"
    bt.write_paraphrases(path, {i: [(f"a{i}", f"b{i}")] for i in range(40)}, ["text_a", "text_b"])
    augmented = datamodule(
        glue,
        tmp_path,
        1,
        "task.train_fraction=0.25",
        "augment=backtranslation",
        f"task.augment.file={path}",
        "task.augment.generate=false",
    )
    assert len(plain.splits["train"]) == 10
    assert len(augmented.splits["train"]) == 20
    assert len(augmented.splits["validation"]) == len(plain.splits["validation"]) == 12
    assert augmented.splits["train"].column_names == plain.splits["train"].column_names


def test_limited_data_subset_is_the_same_for_every_seed(tmp_path):
    glue = write_glue(tmp_path / "glue", n_train=40, n_dev=12)
    first = datamodule(glue, tmp_path, 1, "task.train_fraction=0.1")
    second = datamodule(glue, tmp_path, 2, "task.train_fraction=0.1")
    other = datamodule(glue, tmp_path, 1, "task.train_fraction=0.1", "task.subset_seed=3")
    ids = [m.splits["train"]["input_ids"] for m in (first, second, other)]
    assert len(ids[0]) == 4
    assert ids[0] == ids[1] != ids[2]
    assert len(first.splits["validation"]) == 12
