"""Sequence-classification datamodule for GLUE-style tasks (single sentences and pairs)."""

import logging
from pathlib import Path

import datasets
import lightning as L
import torch
from datasets.fingerprint import Hasher
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kdlab.augment import EXAMPLE_INDEX, add_paraphrases
from kdlab.data.sources import load_source
from kdlab.errors import ConfigError
from kdlab.metrics import ClassificationEvaluator

log = logging.getLogger(__name__)

# Evaluation splits and the prefix of their metric keys (``val/accuracy``, ``val_mm/...``).
EVAL_PREFIXES = {"validation": "val", "validation_mm": "val_mm"}


class EpochSeededSampler(Sampler[int]):
    """A random permutation drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint sees
    the same order as an uninterrupted one (a plain ``RandomSampler`` draws from the global
    generator, whose state a checkpoint does not restore).
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def train_subset(train: datasets.Dataset, task: DictConfig) -> datasets.Dataset:
    """``task.train_fraction`` then ``task.max_train_samples`` of the training set.

    The subset depends on ``task.subset_seed`` only, so every method and every training
    seed sees the same examples.
    """
    fraction = task.get("train_fraction")
    limit = task.get("max_train_samples")
    n = len(train)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"task.train_fraction={fraction} must be in (0, 1].")
        n = max(1, round(n * fraction))
    if limit is not None:
        n = min(n, int(limit))
    if n == len(train):
        return train
    generator = torch.Generator().manual_seed(int(task.get("subset_seed", 0)))
    order = torch.randperm(len(train), generator=generator)[:n].sort().values
    return train.select(order.tolist())


class TextClassificationDataModule(L.LightningDataModule):
    """Tokenised train / validation (/ validation_mm, test) splits of a labelled text task.

    Teacher and student share the tokenizer, so both receive the same batch.

    Args:
        task: the ``task`` config (source, columns, labels, ``max_seq_length``, subsets).
        tokenizer: the tokenizer shared by teacher and student.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: dataloader worker processes.
        seed: seed of the training order.
        cache_dir: where tokenised splits are cached (keyed by content and tokenizer).
    """

    def __init__(
        self,
        task: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.collator = DataCollatorWithPadding(tokenizer)
        self.splits: datasets.DatasetDict | None = None

    @property
    def eval_prefixes(self) -> list[str]:
        """Metric-key prefixes of the validation dataloaders, in dataloader order."""
        self.setup()
        return [p for s, p in EVAL_PREFIXES.items() if s in self.splits]

    def evaluators(self) -> dict[str, ClassificationEvaluator]:
        """Fresh metric collections (``task.metrics``) per evaluation split, keyed by prefix."""
        num_labels = 1 if self.task.labels is None else len(self.task.labels)
        prefixes = [*self.eval_prefixes, *(["test"] if self.has_test else [])]
        return {p: ClassificationEvaluator(list(self.task.metrics), num_labels) for p in prefixes}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = load_source(self.task)
        augment = self.task.get("augment")
        if augment:
            # Paraphrase files name examples by their row in the full training set.
            raw["train"] = raw["train"].add_column(EXAMPLE_INDEX, list(range(len(raw["train"]))))
        raw["train"] = train_subset(raw["train"], self.task)
        if augment:
            raw["train"] = add_paraphrases(raw["train"], augment)
        self.splits = datasets.DatasetDict(
            {name: self._tokenize(name, split) for name, split in raw.items()}
        )
        log.info(
            "Task %s: %s",
            self.task.name,
            ", ".join(f"{name} {len(split)}" for name, split in self.splits.items()),
        )

    def _tokenize(self, name: str, split: datasets.Dataset) -> datasets.Dataset:
        pair = "text_b" in split.column_names
        max_len = int(self.task.max_seq_length)

        def encode(batch):
            texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
            return self.tokenizer(*texts, truncation=True, max_length=max_len)

        cache_file = None
        if self.cache_dir is not None:
            key = Hasher.hash([split._fingerprint, self.tokenizer, max_len])
            cache_file = str(self.cache_dir / self.task.name / f"{name}-{key}.arrow")
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        encoded = split.map(
            encode,
            batched=True,
            remove_columns=[c for c in split.column_names if c != "label"],
            cache_file_name=cache_file,
            desc=f"Tokenising {self.task.name}/{name}",
        )
        return encoded.rename_column("label", "labels")

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(train), self.seed),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in EVAL_PREFIXES if s in self.splits]

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ConfigError(f"Task '{self.task.name}' has no labelled test split.")
        return self._eval_loader("test")

    @property
    def has_test(self) -> bool:
        """Whether the task has a labelled test split."""
        self.setup()
        return "test" in self.splits

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.eval_batch_size,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            # A private generator keeps evaluation from consuming the global RNG stream,
            # so evaluating (or not) before a resume does not change training randomness.
            generator=torch.Generator(),
        )
