"""What every kdlab datamodule shares: its constructor, cached ``datasets.map`` output,
resumable training order and evaluation loaders that leave the global RNG alone."""

from collections.abc import Callable
from pathlib import Path

import datasets
import lightning as L
import torch
from datasets.fingerprint import Hasher
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from kdlab.errors import ConfigError


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


class TokenizedDataModule(L.LightningDataModule):
    """Base of the datamodules: a task config and the tokenizer teacher and student share.

    Args:
        task: the ``task`` config.
        tokenizer: the tokenizer shared by teacher and student.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: dataloader worker processes.
        seed: seed of the training order.
        cache_dir: where tokenised splits are cached (keyed by content and tokenizer).
    """

    # Subclasses set the collator that pads (or masks) their batches.
    collator: Callable

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

    def cache_file(self, name: str, split: datasets.Dataset, *settings) -> str | None:
        """Where ``datasets.map`` caches a processed split: keyed by the split's content,
        the tokenizer and the settings that change the output; None without a cache dir."""
        if self.cache_dir is None:
            return None
        key = Hasher.hash([split._fingerprint, self.tokenizer, *settings])
        path = self.cache_dir / self.task.name / f"{name}-{key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def train_loader(self, dataset: datasets.Dataset) -> DataLoader:
        """Training batches in an order that depends on ``(seed, epoch)`` alone."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed),
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def eval_loader(
        self, dataset: datasets.Dataset, collate_fn: Callable | None = None
    ) -> DataLoader:
        """Evaluation batches in dataset order."""
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            collate_fn=collate_fn or self.collator,
            num_workers=self.num_workers,
            # A private generator keeps evaluation from consuming the global RNG stream,
            # so evaluating (or not) before a resume does not change training randomness.
            generator=torch.Generator(),
        )
