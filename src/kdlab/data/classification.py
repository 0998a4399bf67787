"""Sequence-classification datamodule for GLUE-style tasks (single sentences and pairs)."""

import logging

import datasets
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kdlab.augment import EXAMPLE_INDEX, add_paraphrases
from kdlab.data.base import TokenizedDataModule, train_subset
from kdlab.data.sources import load_source
from kdlab.errors import ConfigError
from kdlab.metrics import ClassificationEvaluator

log = logging.getLogger(__name__)

# Evaluation splits and the prefix of their metric keys (``val/accuracy``, ``val_mm/...``).
EVAL_PREFIXES = {"validation": "val", "validation_mm": "val_mm"}


class TextClassificationDataModule(TokenizedDataModule):
    """Tokenised train / validation (/ validation_mm, test) splits of a labelled text task.

    Teacher and student share the tokenizer, so both receive the same batch. Arguments as
    :class:`~kdlab.data.base.TokenizedDataModule`; the task config gives the source,
    columns, labels, ``max_seq_length`` and the training subset.
    """

    def __init__(self, task: DictConfig, tokenizer: PreTrainedTokenizerBase, **loader) -> None:
        super().__init__(task, tokenizer, **loader)
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

        encoded = split.map(
            encode,
            batched=True,
            remove_columns=[c for c in split.column_names if c != "label"],
            cache_file_name=self.cache_file(name, split, max_len),
            desc=f"Tokenising {self.task.name}/{name}",
        )
        return encoded.rename_column("label", "labels")

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.splits["train"])

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(self.splits[s]) for s in EVAL_PREFIXES if s in self.splits]

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ConfigError(f"Task '{self.task.name}' has no labelled test split.")
        return self.eval_loader(self.splits["test"])

    @property
    def has_test(self) -> bool:
        """Whether the task has a labelled test split."""
        self.setup()
        return "test" in self.splits
