"""Corpus preparation at scale: the chunks are the same whatever the number of tokenising
processes (``task.num_proc``), stored as fixed-width uint16 rows and batched as int64, and
under DDP one process per node tokenises while the node's others wait for its result."""

import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import datasets
import hydra
import pytest
import torch
from omegaconf import OmegaConf

import kdlab.data.corpus
import kdlab.train
from kdlab.components import validate
from kdlab.data.corpus import CHUNKS_FILE, MANIFEST_FILE, token_dtype
from kdlab.errors import ConfigError
from tests.conftest import build_task
from tests.fixtures import write_corpus, write_tiny_mlm_bert, write_tokenizer

MAX_LEN = 16


def compose(overrides: list[str]):
    with hydra.initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        return hydra.compose("train", overrides=overrides)


def corpus_task(files: Path, cache_dir: Path, *extra: str):
    return compose(
        [
            "task=corpus/local",
            f"task.files=[{files}/*.txt]",
            f"task.max_seq_length={MAX_LEN}",
            "task.validation_fraction=0.1",
            "task.max_eval_samples=null",
            f"task.cache_dir={cache_dir}",
            "run_dir=x",
            *extra,
        ]
    ).task


def expected_chunks(files: Path, tokenizer) -> list[list[int]]:
    """The chunks by hand: every non-blank line's ids, concatenated in file order, cut into
    [CLS] + 14 ids + [SEP], the tail dropped."""
    stream = []
    for path in sorted(files.glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.strip():
                stream += tokenizer(line, add_special_tokens=False)["input_ids"]
    body = MAX_LEN - 2
    return [
        [tokenizer.cls_token_id, *stream[i : i + body], tokenizer.sep_token_id]
        for i in range(0, len(stream) - body + 1, body)
    ]


def stored(module) -> tuple[Path, dict]:
    """The folder of a set-up corpus module's chunks and its manifest."""
    (folder,) = (module.cache_dir / module.task.name).glob("chunks-*")
    return folder, json.loads((folder / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # 3,000 lines: 3 batches of 1,000, so two processes each tokenise a part.
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_lines=3000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def test_one_and_several_processes_make_the_same_chunks(corpus, tokenizer, tmp_path):
    splits = {}
    for num_proc in (1, 2):
        task = corpus_task(corpus, tmp_path / f"cache{num_proc}", f"task.num_proc={num_proc}")
        module = build_task(task, tokenizer)
        module.setup()
        folder, manifest = stored(module)
        assert manifest["built"]["processes"] == num_proc
        whole = datasets.Dataset.from_file(str(folder / CHUNKS_FILE))
        assert whole["input_ids"][:] == expected_chunks(corpus, tokenizer)
        splits[num_proc] = {
            name: module.splits[name]["input_ids"][:] for name in ("train", "validation")
        }
    assert splits[1] == splits[2]


def test_chunks_are_stored_as_uint16_rows_and_batched_as_int64(corpus, tokenizer, tmp_path):
    module = build_task(corpus_task(corpus, tmp_path, "task.num_proc=1"), tokenizer)
    module.setup()
    folder, manifest = stored(module)
    chunks = datasets.Dataset.from_file(str(folder / CHUNKS_FILE))
    rows = len(expected_chunks(corpus, tokenizer))
    assert manifest["rows"] == len(chunks) == rows and manifest["dtype"] == "uint16"
    assert str(chunks.data.schema.field("input_ids").type) == (
        f"fixed_size_list<item: uint16>[{MAX_LEN}]"
    )
    # 2 bytes a token, plus the file's schema (a few hundred bytes); no attention masks.
    assert 2 * rows * MAX_LEN < manifest["file"]["bytes"] < 2 * rows * MAX_LEN + 4096
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == (module.batch_size, MAX_LEN)
    assert (batch["attention_mask"] == 1).all()
    val = next(iter(module.val_dataloader()[0]))
    assert val["input_ids"].dtype == val["labels"].dtype == torch.int64


def test_the_token_type_is_the_smallest_that_holds_the_vocabulary():
    assert token_dtype(30522) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(250002) == "int32"


def test_stored_chunks_are_reused_and_damaged_ones_rebuilt(corpus, tokenizer, tmp_path, caplog):
    task = corpus_task(corpus, tmp_path, "task.num_proc=1")
    first = build_task(task, tokenizer)
    first.setup()
    folder, _ = stored(first)
    with caplog.at_level(logging.INFO, logger="kdlab.data.corpus"):
        again = build_task(task, tokenizer)
        again.setup()
    assert f"Corpus chunks reused: {folder}" in caplog.text
    assert again.splits["train"]["input_ids"][:] == first.splits["train"]["input_ids"][:]
    assert again.splits["train"]._fingerprint == first.splits["train"]._fingerprint
    data = (folder / CHUNKS_FILE).read_bytes()
    # A truncated copy replaces the file (truncating it in place would pull the pages from
    # under the memory maps of `first` and `again`).
    (folder / "cut").write_bytes(data[: len(data) // 2])
    os.replace(folder / "cut", folder / CHUNKS_FILE)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdlab.data.corpus"):
        rebuilt = build_task(task, tokenizer)
        rebuilt.setup()
    assert "unusable" in caplog.text and "Corpus chunks built" in caplog.text
    assert (folder / CHUNKS_FILE).read_bytes() == data
    assert rebuilt.splits["train"]["input_ids"][:] == first.splits["train"]["input_ids"][:]
    # No staging folder left behind.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_chunks_another_node_published_meanwhile_stand(corpus, tokenizer, tmp_path):
    """Two nodes' local rank 0 build at once into one task.cache_dir: the first published
    stands (its readers keep their files), the second discards its own."""
    task = corpus_task(corpus, tmp_path, "task.num_proc=1")
    first, second = build_task(task, tokenizer), build_task(task, tokenizer)
    build = second._build_chunks
    published = {}

    def meanwhile(raw, staging, key):
        first.setup()  # publishes while `second` builds
        folder, manifest = stored(first)
        published.update(inode=(folder / CHUNKS_FILE).stat().st_ino, manifest=manifest)
        build(raw, staging, key)

    second._build_chunks = meanwhile
    second.setup()
    folder, manifest = stored(second)
    assert (folder / CHUNKS_FILE).stat().st_ino == published["inode"]
    assert manifest == published["manifest"]
    assert second.splits["train"]["input_ids"][:] == first.splits["train"]["input_ids"][:]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_a_process_waiting_for_chunks_that_never_come_fails_naming_the_folder(
    corpus, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(kdlab.data.corpus, "WAIT_SECONDS", 0.2)
    monkeypatch.setattr(kdlab.data.corpus, "POLL_SECONDS", 0.05)
    module = build_task(corpus_task(corpus, tmp_path, "task.num_proc=1"), tokenizer)
    folder = tmp_path / "local"
    with pytest.raises(TimeoutError, match=rf"in {re.escape(str(folder))}/chunks-\w+ within"):
        module.setup()
    assert not folder.exists() or not any(folder.iterdir())


def test_num_proc_must_be_positive(tmp_path):
    model = write_tiny_mlm_bert(tmp_path / "mlm")
    cfg = compose(
        [
            "method=mlm",
            "task=corpus/local",
            f"task.files=[{tmp_path}/*.txt]",
            "model=pretrained",
            f"model.path={model}",
            "task.num_proc=0",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"task\.num_proc.*>= 1"):
        validate(cfg, check_files=False)


def prepare_as_rank(rank: int, task: dict, tok_dir: str, calls: str, results) -> None:
    """One process of a node: set up the corpus with ``LOCAL_RANK=rank``, counting the
    tokenizer's calls in a file (they may run in worker processes)."""
    os.environ["LOCAL_RANK"] = str(rank)
    from transformers import BertTokenizerFast

    kdlab.data.corpus.POLL_SECONDS = 0.1
    original = BertTokenizerFast.__call__

    def counted(self, *args, **kwargs):
        with open(calls, "a") as f:
            f.write("call\n")
        return original(self, *args, **kwargs)

    BertTokenizerFast.__call__ = counted
    tokenizer = BertTokenizerFast.from_pretrained(tok_dir)
    module = build_task(OmegaConf.create(task), tokenizer)
    module.setup()
    results.put((rank, {n: s["input_ids"][:] for n, s in module.splits.items()}))


def test_one_process_per_node_tokenises_and_the_others_wait(corpus, tokenizer, tmp_path):
    task = OmegaConf.to_container(corpus_task(corpus, tmp_path / "cache"), resolve=True)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    # Forked: a spawned process would spend most of the test importing kdlab again.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    calls = {rank: tmp_path / f"calls{rank}.txt" for rank in (0, 1)}
    # Local rank 1 starts first: it must wait for rank 0 rather than tokenise itself.
    workers = [
        context.Process(
            target=prepare_as_rank, args=(rank, task, str(tok_dir), str(calls[rank]), results)
        )
        for rank in (1, 0)
    ]
    for worker in workers:
        worker.start()
    found = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert calls[0].read_text().count("call") > 0
    assert not calls[1].exists(), "local rank 1 tokenised"
    assert found[0] == found[1]
    assert found[0]["train"]  # chunks to train on, the same in both
    folder = tmp_path / "cache" / "local"
    assert [p.name for p in folder.iterdir()] == [next(folder.glob("chunks-*")).name]
