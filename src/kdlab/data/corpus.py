"""Unlabelled text for masked-LM training and task-agnostic distillation.

Text comes from local files (``task.files``: paths or globs, one document line per line)
or, when none are given, from the hub (``task.hub``: e.g. ``wikitext`` /
``wikitext-103-raw-v1``). Its non-blank lines are tokenised in ``task.num_proc`` processes,
concatenated in order and cut into ``max_seq_length`` chunks (``[CLS] … [SEP]``; the tail
shorter than one chunk is dropped, as in BERT pre-training), the same chunks whatever the
number of processes. A seeded fraction of the chunks is held out for validation. Training
batches are masked on the fly by ``DataCollatorForLanguageModeling`` (15 %, 80/10/10);
validation chunks are masked once with a fixed seed so that every evaluation scores the same
positions.

The chunks are stored once per corpus, tokenizer and ``max_seq_length``, under
``<task.cache_dir or the datasets cache>/<task.name>/chunks-<key>/``::

    chunks.arrow    one fixed-length row [max_seq_length] per chunk, uint16 token ids
                    (int32 for vocabularies over 65,536 tokens): 2 bytes a token rather than
                    the 8 of an int64 list; no attention mask, a full chunk attends to all
    manifest.json   the key, the rows, the file's size, how it was built

Batches are int64 as the models expect (the collator makes the tensors). Under DDP the
process of local rank 0 on each node builds the chunks and publishes them by renaming its
own folder (:func:`kdlab.publish.publish`); the node's other processes poll for them. Nodes
that share ``task.cache_dir`` each build unless one finds the other's published; the first
published stands.
"""

import glob
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, TypedDict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from datasets.table import MemoryMappedTable
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    default_data_collator,
)
from typing_extensions import Unpack

from kdlab.data.base import TaskOptions, TokenizedDataModule
from kdlab.data.textfile import check_text_file
from kdlab.errors import ConfigError
from kdlab.metrics import MaskedLMMetrics
from kdlab.publish import publish, wait_for, write_synced
from kdlab.validation import PositiveInt, Range

log = logging.getLogger(__name__)

# Bumped whenever what is stored, or how the key is made, changes.
FORMAT_VERSION = 1
CHUNKS_FILE = "chunks.arrow"
MANIFEST_FILE = "manifest.json"
# How long a process other than its node's local rank 0 waits for the chunks, and how often
# it looks: long enough for billions of tokens tokenised in one process.
WAIT_SECONDS = 6 * 3600.0
POLL_SECONDS = 2.0
# Lines a tokenising process takes at a time; no more processes start than there are such
# batches.
LINES_PER_BATCH = 1000
# Chunks written to chunks.arrow at a time (memory: this many rows of token ids).
CHUNKS_PER_WRITE = 100_000


def token_dtype(vocab_size: int) -> str:
    """The smallest integer type that holds every id of a ``vocab_size``-token vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which SLURM and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_rank() -> int:
    """This process's rank on its node, from the environment its launcher sets:
    ``LOCAL_RANK`` (torchrun, Lightning's DDP launcher in the processes it starts) or
    ``SLURM_LOCALID`` (SLURM tasks); 0 outside DDP and in Lightning's launching process.

    Read from the environment because the chunks are made when the datamodule is set up,
    before the trainer (and its process group) exists.
    """
    for variable in ("LOCAL_RANK", "SLURM_LOCALID"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def load_text(task: DictConfig) -> datasets.Dataset:
    """A one-column (``text``) dataset from ``task.files`` or, without files, ``task.hub``.

    Local files are checked before ``datasets`` reads them: each must be UTF-8 text with at
    least one non-blank line.

    Raises:
        ConfigError: a pattern that matches no file, a directory given as a file, no
            source at all, or an unreachable hub.
        DataFormatError: an empty or blank file, or one that is not UTF-8 (file and line).
    """
    if task.get("files"):
        files = text_files(task.files)
        for path in files:
            check_text_file(Path(path))
        log.info("Reading %d text files for %s", len(files), task.name)
        return datasets.load_dataset("text", data_files={"train": files}, split="train")
    hub = task.get("hub")
    if hub is None:
        raise ConfigError(f"Task '{task.name}' needs task.files=[<paths or globs>] or task.hub.")
    try:
        raw = datasets.load_dataset(hub.path, hub.get("name"), split=hub.get("split", "train"))
    except Exception as err:  # the hub raises many types when unreachable
        raise ConfigError(
            f"Could not load '{hub.path}/{hub.get('name')}' from the hub: {err}. Offline, set "
            "task.files=[<text files or globs>]."
        ) from err
    column = hub.get("text_column", "text")
    return (
        raw.select_columns([column]).rename_column(column, "text")
        if column != "text"
        else raw.select_columns(["text"])
    )


class CorpusHub(TypedDict):
    """A text dataset on the hub (``task.hub``)."""

    path: str
    name: str | None
    split: str
    text_column: str


class CorpusOptions(TaskOptions):
    """Keys of the corpus tasks (``conf/_task_corpus.yaml``)."""

    files: str | list[str] | None  # local text: paths or globs (take precedence over hub)
    hub: CorpusHub | None
    mlm_probability: Annotated[float, Range(gt=0, lt=1)]
    validation_fraction: Annotated[float, Range(gt=0, lt=1)]
    max_eval_samples: PositiveInt | None
    num_proc: PositiveInt | None  # tokenising processes; None: the available cores


def text_files(setting: str | Sequence[str]) -> list[str]:
    """The files that ``task.files`` (a path or glob, or a list of them) names, in order.

    Directories that a wildcard matches are skipped (``corpus/**`` matches folders too);
    a directory named as such is an error, since it is almost always a missing ``/*.txt``.

    Raises:
        ConfigError: a pattern that matches no file, or only directories.
    """
    patterns = [setting] if isinstance(setting, str) else list(setting)
    files: list[str] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        matched = sorted(glob.glob(expanded, recursive=True))
        if not matched:
            raise ConfigError(f"task.files: '{pattern}' matches no file.")
        found = [m for m in matched if not Path(m).is_dir()]
        if not found:
            folder = matched[0].rstrip("/")
            what = "is a directory" if not glob.has_magic(expanded) else "matches only directories"
            raise ConfigError(
                f"task.files: '{pattern}' {what}, not text files. Name the files in it, e.g. "
                f"task.files=[{folder}/*.txt] (or {folder}/**/*.txt with its subdirectories)."
            )
        files.extend(found)
    return files


class CorpusDataModule(TokenizedDataModule):
    """Fixed-length masked-LM chunks of a text corpus, with a held-out validation split."""

    head = "masked_lm"

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[CorpusOptions],
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, seed=seed, teacher_tokenizer=teacher_tokenizer, **task
        )
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=float(self.task.mlm_probability)
        )
        self.splits: dict[str, datasets.Dataset] | None = None

    def split_metrics(self) -> dict[str, MaskedLMMetrics]:
        """Masked-LM perplexity on the held-out chunks (``val/perplexity``)."""
        return {"val": MaskedLMMetrics()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        # Checked before the corpus is read and tokenised, to fail fast.
        fraction = float(self.task.validation_fraction)
        raw = load_text(self.task)
        chunks = self._chunk(raw)
        self._check_enough_chunks(raw, chunks, fraction)
        held_out = chunks.train_test_split(
            test_size=fraction, seed=int(self.task.subset_seed), shuffle=True
        )
        train = _limit(held_out["train"], self.task.get("max_train_samples"))
        val = _limit(held_out["test"], self.task.get("max_eval_samples"))
        self.splits = {"train": train, "validation": self._mask_once(val)}
        log.info(
            "Corpus %s: %d training and %d validation chunks", self.task.name, len(train), len(val)
        )

    def _chunk(self, raw: datasets.Dataset) -> datasets.Dataset:
        """The chunks of ``raw``: read where stored, else built (local rank 0) or waited for
        (the node's other processes)."""
        max_len = int(self.task.max_seq_length)
        key = Hasher.hash([FORMAT_VERSION, raw._fingerprint, self.tokenizer, max_len])
        root = self.cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "kdlab"
        directory = root / self.task.name / f"chunks-{key}"
        chunks, problem = _read_chunks(directory, key)
        if chunks is not None:
            log.info("Corpus chunks reused: %s", directory)
            return chunks
        if local_rank() != 0:
            return wait_for(
                lambda: _read_chunks(directory, key)[0],
                directory,
                what=f"chunks of corpus {self.task.name}",
                builder="Local rank 0 of this node builds them there: check that it did not fail.",
                wait_s=WAIT_SECONDS,
                poll_s=POLL_SECONDS,
            )
        if problem is not None:
            log.warning("Corpus chunks %s are unusable (%s): rebuilding them.", directory, problem)
        # Chunks another node published meanwhile stand: its processes may be reading them.
        publish(
            directory,
            lambda staging: self._build_chunks(raw, staging, key),
            stands=lambda: _read_chunks(directory, key)[0] is not None,
        )
        chunks, problem = _read_chunks(directory, key)
        if chunks is None:
            raise RuntimeError(f"The corpus chunks just published in {directory}: {problem}")
        log.info("Corpus chunks built: %s", directory)
        return chunks

    def _build_chunks(self, raw: datasets.Dataset, staging: Path, key: str) -> None:
        """Tokenise ``raw``'s non-blank lines in parallel, then cut their concatenation
        into chunks: ``staging/chunks.arrow`` and its manifest."""
        start = time.perf_counter()
        max_len = int(self.task.max_seq_length)
        dtype = token_dtype(len(self.tokenizer))
        wanted = self.task.get("num_proc") or available_cores()
        processes = max(1, min(int(wanted), math.ceil(len(raw) / LINES_PER_BATCH)))
        tokenizer = self.tokenizer

        def encode(batch):
            lines = [t for t in batch["text"] if t.strip()]
            # Only the ids: the masks and token types a tokenizer returns by default cost
            # about a quarter of its time.
            encoded = tokenizer(
                lines,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            return {"input_ids": encoded["input_ids"]}

        # Each line's ids on their own first: the lines tokenise independently, so any
        # split into processes gives the same stream.
        (staging / "lines").mkdir()
        lines = raw.map(
            encode,
            batched=True,
            batch_size=LINES_PER_BATCH,
            num_proc=processes if processes > 1 else None,
            remove_columns=raw.column_names,
            features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype))}),
            cache_file_name=str(staging / "lines" / "lines.arrow"),
            desc=f"Tokenising {self.task.name} ({processes} processes)",
        )
        path = staging / CHUNKS_FILE
        rows, tokens = _write_chunks(lines, path, self.tokenizer, max_len, dtype)
        del lines  # memory-maps the files removed next
        shutil.rmtree(staging / "lines")
        manifest = {
            "key": key,
            "format": FORMAT_VERSION,
            "source": _describe_source(self.task),
            "rows": rows,
            "max_seq_length": max_len,
            "dtype": dtype,
            "text_tokens": tokens,
            "file": {"name": CHUNKS_FILE, "bytes": path.stat().st_size},
            "built": {
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - start, 2),
                "processes": processes,
                "host": socket.gethostname(),
            },
        }
        write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        log.info(
            "Tokenised %d tokens of %s into %d chunks in %.1f s with %d processes",
            tokens,
            self.task.name,
            rows,
            time.perf_counter() - start,
            processes,
        )

    def _check_enough_chunks(
        self, raw: datasets.Dataset, chunks: datasets.Dataset, fraction: float
    ) -> None:
        """Raise unless the chunks leave at least one for training after holding out
        ``fraction`` (rounded up, as ``train_test_split`` does) for validation."""
        n = len(chunks) if "input_ids" in chunks.column_names else 0
        needed = _chunks_needed(fraction)
        if n >= needed:
            return
        max_len = int(self.task.max_seq_length)
        # Only on this error path: count the tokens, which the chunking does not keep.
        tokens = self._count_tokens(raw)
        size = f"task.max_seq_length={max_len} ({max_len - 2} text tokens, [CLS] and [SEP])"
        if n == 0:
            found = f"too few for one chunk of {size}"
        else:
            found = (
                f"which make {n} chunk{'s' * (n != 1)} of {size}; task.validation_fraction="
                f"{fraction} holds out {math.ceil(fraction * n)} and leaves none to train on"
            )
        # Fewer than two chunks never split, whatever the fraction.
        fixes = (
            "add text, lower task.max_seq_length or lower task.validation_fraction"
            if n >= 2
            else "add text or lower task.max_seq_length"
        )
        raise ConfigError(
            f"Corpus {self.task.name} ({_describe_source(self.task)}) has {tokens} tokens, "
            f"{found}. At least {needed} chunks are needed: {fixes}."
        )

    def _count_tokens(self, raw: datasets.Dataset) -> int:
        total = 0
        for start in range(0, len(raw), 1000):
            lines = [t for t in raw[start : start + 1000]["text"] if t.strip()]
            ids = self.tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
            total += sum(len(x) for x in ids)
        return total

    def _mask_once(self, split: datasets.Dataset) -> datasets.Dataset:
        # A private RNG stream: the fixed validation masks neither depend on nor disturb
        # the training randomness.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.task.subset_seed))
            masked = self.collator([{"input_ids": ids} for ids in split["input_ids"]])
        return datasets.Dataset.from_dict(
            {
                k: masked[k].tolist()
                for k in ("input_ids", "attention_mask", "labels")
                if k in masked
            }
        )

    @classmethod
    def why_training_inputs_vary(cls, task: DictConfig) -> str | None:
        """Training chunks are masked anew, at random, in every batch."""
        return (
            f"task={task.name} is masked-LM: its training batches are masked at random each epoch"
        )

    def train_split(self) -> datasets.Dataset:
        return self.splits["train"]

    def val_dataloader(self, by_length: bool = True) -> list[DataLoader]:
        # Validation is masked once (fixed positions), so batches only need stacking.
        validation = self.splits["validation"].with_format("torch")
        share = self.process_share()
        return [self.eval_loader(validation, default_data_collator, **share, by_length=by_length)]


def _write_chunks(
    lines: datasets.Dataset,
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    dtype: str,
) -> tuple[int, int]:
    """Cut the concatenated ids of ``lines`` into ``[CLS] … [SEP]`` chunks of ``max_len``
    and write them to ``path`` (fixed-length rows), reading the lines a slice at a time.

    Returns:
        The chunks written and the text tokens read.
    """
    body = max_len - 2  # room for [CLS] and [SEP]
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value(dtype), length=max_len)}
    )
    carry = np.empty(0, dtype=dtype)  # the tokens after the last full chunk so far
    rows = tokens = 0
    with ArrowWriter(features=features, path=str(path)) as writer:
        for table in lines.with_format("arrow").iter(batch_size=CHUNKS_PER_WRITE):
            ids = pc.list_flatten(table["input_ids"]).to_numpy()
            tokens += len(ids)
            stream = np.concatenate([carry, ids])
            n = len(stream) // body
            carry = stream[n * body :]
            chunks = np.empty((n, max_len), dtype=dtype)  # [n, max_len]
            chunks[:, 0] = tokenizer.cls_token_id
            chunks[:, 1:-1] = stream[: n * body].reshape(n, body)
            chunks[:, -1] = tokenizer.sep_token_id
            flat = pa.array(chunks.reshape(-1))
            writer.write_table(
                pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, max_len)})
            )
            rows += n
        writer.finalize()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return rows, tokens


def _read_chunks(directory: Path, key: str) -> tuple[datasets.Dataset | None, str | None]:
    """The stored chunks and None, or None and what is wrong with them (None as well when
    nothing was ever stored).

    The file is checked against the manifest by size and rows, not by a hash: hashing
    gigabytes on every start of every process costs more than it guards against, and a
    folder is only ever published complete.
    """
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        if directory.is_dir() and any(directory.iterdir()):
            return None, "no manifest: an interrupted build"
        return None, None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        rows, size = int(manifest["rows"]), int(manifest["file"]["bytes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable manifest: {err}"
    if manifest.get("key") != key:
        return None, "the manifest describes other chunks"
    path = directory / CHUNKS_FILE
    if not path.is_file():
        return None, f"{CHUNKS_FILE} is missing"
    if path.stat().st_size != size:
        return None, f"{CHUNKS_FILE} has {path.stat().st_size} bytes, the manifest {size}"
    try:
        # Memory-mapped, with the key as its fingerprint: the same chunks wherever stored.
        chunks = datasets.Dataset(MemoryMappedTable.from_file(str(path)), fingerprint=key)
    except Exception as err:  # pyarrow raises its own error types
        return None, f"{CHUNKS_FILE} is unreadable: {err}"
    if len(chunks) != rows:
        return None, f"{CHUNKS_FILE} has {len(chunks)} chunks, the manifest {rows}"
    return chunks, None


def _chunks_needed(fraction: float) -> int:
    """The fewest chunks whose held-out share (``ceil(fraction * n)``) leaves one to train."""
    n = 2
    while n - math.ceil(fraction * n) < 1:
        n += 1
    return n


def _describe_source(task: DictConfig) -> str:
    if task.get("files"):
        return f"task.files={list(task.files) if not isinstance(task.files, str) else task.files}"
    hub = task.get("hub") or {}
    return f"hub dataset {hub.get('path')}/{hub.get('name')}"


def _limit(split: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return split if limit is None or len(split) <= limit else split.select(range(int(limit)))
