"""Unlabelled text for masked-LM training and task-agnostic distillation.

Text comes from local files (``task.files``: paths or globs, one document line per line)
or, when none are given, from the hub (``task.hub``: e.g. ``wikitext`` /
``wikitext-103-raw-v1``). It is tokenised, concatenated and cut into ``max_seq_length``
chunks (``[CLS] … [SEP]``); a seeded fraction of the chunks is held out for validation.
Training batches are masked on the fly by ``DataCollatorForLanguageModeling`` (15 %,
80/10/10); validation chunks are masked once with a fixed seed so that every evaluation
scores the same positions.
"""

import glob
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypedDict

import datasets
import torch
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
from kdlab.validation import PositiveInt, Range

log = logging.getLogger(__name__)


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
        self, *, tokenizer: PreTrainedTokenizerBase, seed: int, **task: Unpack[CorpusOptions]
    ) -> None:
        super().__init__(tokenizer=tokenizer, seed=seed, **task)
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
        max_len = int(self.task.max_seq_length)
        body = max_len - 2  # room for [CLS] and [SEP]
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id

        def encode(batch):
            lines = [t for t in batch["text"] if t.strip()]
            ids = self.tokenizer(lines, add_special_tokens=False)["input_ids"]
            stream = [token for line in ids for token in line]
            # The tail shorter than one chunk is dropped, as in BERT pre-training.
            chunks = [
                [cls_id, *stream[i : i + body], sep_id]
                for i in range(0, len(stream) - body + 1, body)
            ]
            return {"input_ids": chunks}

        return raw.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=raw.column_names,
            cache_file_name=self.cache_file("chunks", raw, max_len),
            desc=f"Tokenising {self.task.name}",
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
