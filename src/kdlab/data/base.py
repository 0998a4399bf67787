"""What every kdlab datamodule shares: its constructor, cached ``datasets.map`` output,
a training order that resumes exactly (at an epoch boundary or mid-epoch) and loaders that
leave the global RNG alone."""

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, TypedDict

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import Unpack

from kdlab.errors import ConfigError
from kdlab.validation import NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

# Batch key of each training example's row in ``train_split()`` (``[B]`` int64), present once
# ``index_training_rows`` is called: outputs computed once per row (the teacher-output
# cache) are looked up by it, whatever order the sampler draws.
ROW_INDEX = "row_index"

# Prefix of the teacher's own inputs (``teacher_input_ids``, ``teacher_attention_mask``, ...)
# in the rows and batches of a run whose teacher tokenises differently from its student:
# each example is tokenised by both. Runs with one tokenizer have no such keys.
TEACHER_INPUTS_PREFIX = "teacher_"
TEACHER_INPUT_IDS = TEACHER_INPUTS_PREFIX + "input_ids"

# Optimizer steps per mega-batch of ``task.group_by_length``, as the ``transformers``
# Trainer's length-grouped sampler: 50 steps of examples hold enough of each length that a
# sorted step pads little (95–96 % real tokens on SST-2 at batch 16 and 32, against 33–38 %
# for random batches), while each step still mixes examples from a 50th of the epoch.
MEGA_BATCH_STEPS = 50


def token_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """``[N]`` real (non-padding) tokens of each row: the length of its ``input_ids``, read
    from the Arrow columns without building tensors. A row tokenised for a teacher with
    another tokenizer too counts the longer of its two tokenisations: sorting by it puts the
    longest sequence of either model first, and the two lengths grow together."""
    table = dataset.with_format("arrow")
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    if TEACHER_INPUT_IDS in dataset.column_names:
        lengths = np.maximum(lengths, pc.list_value_length(table[TEACHER_INPUT_IDS]).to_numpy())
    return lengths


@dataclass
class TwoTokenizerCollator:
    """Pads a batch tokenised for two tokenizers: the student's keys with ``student`` (the
    collator of its tokenizer, which also takes the labels and bookkeeping) and the teacher's
    (``teacher_*``) with ``teacher``, each set to its own longest sequence. Both sets hold the
    same examples, row for row.
    """

    student: Callable[[list[dict]], dict]
    teacher: Callable[[list[dict]], dict]

    def __call__(self, features: list[dict]) -> dict:
        own = [
            {k: v for k, v in f.items() if not k.startswith(TEACHER_INPUTS_PREFIX)}
            for f in features
        ]
        theirs = [
            {
                k.removeprefix(TEACHER_INPUTS_PREFIX): v
                for k, v in f.items()
                if k.startswith(TEACHER_INPUTS_PREFIX)
            }
            for f in features
        ]
        batch = self.student(own)
        batch.update({TEACHER_INPUTS_PREFIX + k: v for k, v in self.teacher(theirs).items()})
        return batch


def length_grouped(
    order: torch.Tensor, lengths: Sequence[int], step: int, generator: torch.Generator
) -> torch.Tensor:
    """``order`` regrouped by length: cut into mega-batches of ``MEGA_BATCH_STEPS`` steps of
    ``step`` examples, each sorted longest first and cut into steps, whose order is then
    shuffled (long and short steps alternate across the epoch). The step holding the longest
    example comes first, so that a batch too large for the device fails at once. A last
    partial step stays last: it is the only step shorter than ``step``.

    Args:
        order: ``[N]`` row indices, a random permutation.
        lengths: tokens of each row.
        step: examples of one optimizer step over all processes.
        generator: draws the steps' order.

    Returns:
        ``[N]``: the same indices.
    """
    lengths = torch.from_numpy(np.array(lengths, dtype=np.int64))
    chunks = order.split(step * MEGA_BATCH_STEPS)
    grouped = torch.cat([c[lengths[c].argsort(descending=True, stable=True)] for c in chunks])
    full = len(order) // step
    steps = grouped[: full * step].view(full, step)  # [S, step], each row longest first
    steps = steps[torch.randperm(full, generator=generator)]
    if full:
        first = int(lengths[steps[:, 0]].argmax())
        steps[[0, first]] = steps[[first, 0]]
    return torch.cat([steps.flatten(), grouped[full * step :]])


class EpochSeededSampler(DistributedSampler):
    """This process's share of a random permutation drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint sees
    the same order as an uninterrupted one (a plain ``RandomSampler`` draws from the global
    generator, whose state a checkpoint does not restore).

    Under DDP, process ``rank`` of ``num_replicas`` takes every ``num_replicas``-th index of
    that one permutation (padded, as ``DistributedSampler`` pads, to a multiple of
    ``num_replicas`` with its first indices). Its k-th batch of ``B`` then holds every
    ``num_replicas``-th example of the k-th batch of ``num_replicas × B`` that one device
    draws: every optimizer step trains on the same examples whatever the number of devices
    (and micro-batches of gradient accumulation) it is spread over. Being a
    ``DistributedSampler``, Lightning leaves it in place (its own wrapper would shuffle the
    order a second time).

    Given ``lengths``, the permutation is regrouped by length (:func:`length_grouped`) in
    units of ``step`` examples, one optimizer step over all processes, before it is padded
    and shared: a step holds the same examples whatever the processes and micro-batches it
    is spread over, and all of them have similar lengths.

    Args:
        length: rows of the training set.
        seed: with the epoch, draws the order.
        num_replicas: training processes.
        rank: this process.
        lengths: tokens of each row, to group by length; None: a random order.
        step: examples per optimizer step over all processes (with ``lengths``).
    """

    def __init__(
        self,
        length: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: Sequence[int] | None = None,
        step: int = 1,
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, seed=seed)
        self.lengths = lengths
        self.step = step

    def __iter__(self):
        # A generator: the permutation is drawn at the first index, not when the iterator is
        # built. A resumed run builds its loader's iterator before Lightning calls
        # set_epoch for the epoch it resumes in.
        if self.lengths is None:
            yield from super().__iter__()
            return
        # The permutation DistributedSampler draws, grouped, then padded as it pads.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        order = length_grouped(order, self.lengths, self.step, generator).tolist()
        padding = self.total_size - len(order)
        order += (order * (padding // len(order) + 1))[:padding]
        yield from order[self.rank : self.total_size : self.num_replicas]


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state also holds the epoch of its sampler.

    Lightning saves the state of a training loader that has one (the batches yielded so far
    in the epoch) and, on ``ckpt_path=...``, loads it and builds the resumed iterator, which
    skips those batches, before it calls ``set_epoch`` for the epoch it resumes in. Setting
    the saved epoch first makes the skip replay that epoch's order. The sampler is an
    :class:`EpochSeededSampler`.

    The position counts this process's examples of its share, so it is loaded only into a
    loader with the same share (processes and batch size) and the same order (random, or
    grouped by length in steps of as many examples); another is refused before anything
    trains. (Lightning loads it only to resume mid-epoch.)

    Raises:
        ConfigError: from ``load_state_dict``, for a position of another share or order.
    """

    def state_dict(self) -> dict:
        share = [self.sampler.num_replicas, self.batch_size]
        return {
            **super().state_dict(),
            _SAMPLER_EPOCH: self.sampler.epoch,
            _SHARE: share,
            _GROUPED_STEP: self._grouped_step(),
        }

    def _grouped_step(self) -> int | None:
        """Examples per step of a length-grouped order; None for a random one."""
        return None if self.sampler.lengths is None else self.sampler.step

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        saved, share = state.pop(_SHARE, None), [self.sampler.num_replicas, self.batch_size]
        if saved is not None and list(saved) != share:
            raise ConfigError(
                f"The checkpoint was written mid-epoch by {saved[0]} training process(es) with "
                f"task.batch_size={saved[1]}, this run has {share[0]} with "
                f"task.batch_size={share[1]}: the training loader's position in the epoch "
                "counts one process's examples and cannot be carried over. Resume it with "
                f"{saved[0]} process(es) (trainer.devices x trainer.num_nodes) and "
                f"task.batch_size={saved[1]}, or from a checkpoint written at the end of an epoch."
            )
        # Checkpoints from before length grouping hold no step: their order was random.
        saved_step, step = state.pop(_GROUPED_STEP, None), self._grouped_step()
        if saved_step != step:
            order = {
                s: "random" if s is None else f"grouped in steps of {s}" for s in (saved_step, step)
            }
            raise ConfigError(
                f"The checkpoint was written mid-epoch with the training order {order[saved_step]}, "
                f"this run's is {order[step]} (task.group_by_length, task.batch_size x processes "
                "x trainer.accumulate_grad_batches): the loader's position in the epoch cannot "
                "be carried over. Resume it with the same settings, or from a checkpoint written "
                "at the end of an epoch."
            )
        if _SAMPLER_EPOCH in state:
            self.sampler.set_epoch(state.pop(_SAMPLER_EPOCH))
        super().load_state_dict(state)


_SAMPLER_EPOCH = "kdlab_sampler_epoch"
_SHARE = "kdlab_share"  # [processes, batch size]
_GROUPED_STEP = "kdlab_grouped_step"  # examples per step of a length-grouped order, or None


def train_subset(train: datasets.Dataset, task: DictConfig) -> datasets.Dataset:
    """``task.train_fraction`` then ``task.max_train_samples`` of the training set.

    The subset depends on ``task.subset_seed`` only, so every method and every training
    seed sees the same examples.
    """
    fraction = task.get("train_fraction")
    limit = task.get("max_train_samples")
    n = len(train)
    if fraction is not None:
        n = max(1, round(n * fraction))
    if limit is not None:
        n = min(n, int(limit))
    if n == len(train):
        return train
    generator = torch.Generator().manual_seed(int(task.get("subset_seed", 0)))
    order = torch.randperm(len(train), generator=generator)[:n].sort().values
    return train.select(order.tolist())


class TaskOptions(TypedDict):
    """The keys every task config has (``conf/_task.yaml``); each datamodule adds its own."""

    name: str  # names the cache folder and the runs
    main_metric: str  # val/<main_metric> picks the best checkpoint
    main_metric_mode: Literal["max", "min"]
    max_seq_length: PositiveInt
    batch_size: PositiveInt  # per device: the batch of one forward pass
    # Examples per optimizer step over all devices; derives trainer.accumulate_grad_batches
    # (kdlab.batching). None: accumulate_grad_batches as the trainer config sets it.
    global_batch_size: PositiveInt | None
    eval_batch_size: PositiveInt
    num_workers: NonNegativeInt
    cache_dir: str | None  # tokenised splits, keyed by content, tokenizer and settings
    max_train_samples: PositiveInt | None
    subset_seed: int  # the training subset (and held-out split) depend on it alone


class TokenizedDataModule(L.LightningDataModule, abc.ABC):
    """Base of the datamodules: a task's options and the tokenizers of teacher and student.

    A datamodule is built from the ``task`` config by ``hydra.utils.instantiate``; its
    options (``**task``, typed by the subclass's ``TypedDict``) are the task config's keys,
    kept in ``self.task`` for the functions that read the data.

    Args:
        tokenizer: the student's tokenizer, which the teacher shares unless
            ``teacher_tokenizer`` is given.
        seed: seed of the training order.
        teacher_tokenizer: the teacher's own tokenizer where it differs from the student's
            (:func:`kdlab.methods.traits.teacher_tokenizer_for`); only sequence-level tasks
            take one, and tokenise each example by both (``teacher_*`` keys).
        **task: the task's options.
    """

    # The model head the task trains (``kdlab.models.heads.HEADS`` key).
    head: ClassVar[str]
    # Subclasses set the collator that pads (or masks) their batches.
    collator: Callable

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[TaskOptions],
    ) -> None:
        super().__init__()
        self.task = OmegaConf.create(task)
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.batch_size = int(task["batch_size"])
        self.eval_batch_size = int(task["eval_batch_size"])
        self.num_workers = int(task["num_workers"])
        self.seed = seed
        cache_dir = task.get("cache_dir")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.rows_indexed = False
        self._train_lengths: np.ndarray | None = None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Cross-key rules of the task config that its types cannot state (none here)."""

    @classmethod
    def why_training_inputs_vary(cls, task: DictConfig) -> str | None:
        """Why the training inputs of this task config are not one fixed set seen the same way
        every epoch (random masking, augmentation), or None when they are.

        Outputs computed once on the training set (the teacher-output cache) are valid only
        for a fixed set.
        """
        return None

    @abc.abstractmethod
    def train_split(self) -> datasets.Dataset:
        """The training examples, with the columns a training batch carries, in dataset order."""

    def index_training_rows(self) -> None:
        """From now on, training batches carry each example's row in :meth:`train_split`
        (``ROW_INDEX``)."""
        self.rows_indexed = True

    @property
    def labels(self) -> list[str] | None:
        """Class names of a classification task; None for regression and other heads."""
        return None

    @property
    def has_test(self) -> bool:
        """Whether the task has a labelled test split."""
        return False

    def cache_file(self, name: str, split: datasets.Dataset, *settings) -> str | None:
        """Where ``datasets.map`` caches a processed split: keyed by the split's content,
        the tokenizer and the settings that change the output; None without a cache dir."""
        if self.cache_dir is None:
            return None
        key = Hasher.hash([split._fingerprint, self.tokenizer, *settings])
        path = self.cache_dir / self.task.name / f"{name}-{key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            try:  # datasets would fail on a damaged file naming neither it nor the cache
                datasets.Dataset.from_file(str(path))
            except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
                log.warning("Deleting %s, a damaged cache (%s), to tokenise again.", path, err)
                path.unlink(missing_ok=True)
        return str(path)

    def process_share(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of this process's share of the data while a
        distributed trainer is attached (``{}``, the whole data, otherwise)."""
        if self.trainer is None:
            return {}
        return self.trainer.distributed_sampler_kwargs or {}

    @property
    def pin_memory(self) -> bool:
        """Whether loaders pin their batches: while a trainer on a CUDA device is attached
        (a pinned batch copies to the GPU asynchronously; elsewhere pinning is wasted)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> ResumableLoader:
        """This process's share of the training batches (:meth:`training_loader`)."""
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return self.training_loader(**self.process_share(), accumulate=accumulate)

    def training_loader(
        self, num_replicas: int = 1, rank: int = 0, accumulate: int = 1
    ) -> ResumableLoader:
        """Training batches in an order that depends on ``(seed, epoch)`` alone, from a
        loader whose position every checkpoint holds: a run resumed from a mid-epoch
        checkpoint skips the batches it had trained on (drawing their indices only; nothing
        is loaded or collated for them). With a teacher-output cache the rows carry their
        index in the split. Process ``rank`` of ``num_replicas`` gets its share of each
        batch of ``num_replicas`` times the size (:class:`EpochSeededSampler`). With
        ``task.group_by_length`` the order is grouped by length in optimizer steps of
        ``batch_size × num_replicas × accumulate`` examples."""
        dataset = self.train_split()
        lengths = None
        if self.task.get("group_by_length"):
            if self._train_lengths is None:
                self._train_lengths = token_lengths(dataset)
            lengths = self._train_lengths
        if self.rows_indexed:
            dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
        step = self.batch_size * num_replicas * accumulate
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed, num_replicas, rank, lengths, step),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Each new iterator draws a seed for its workers from this generator, not from
            # the global stream: a resumed run creates its iterator after the checkpoint's
            # RNG states are restored, where the uninterrupted run creates none.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def eval_loader(
        self,
        dataset: datasets.Dataset,
        collate_fn: Callable | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        *,
        by_length: bool = True,
        lengths: Sequence[int] | None = None,
    ) -> DataLoader:
        """Evaluation batches, longest first; process ``rank`` of ``num_replicas`` gets
        every ``num_replicas``-th example of that order, each example exactly once over all
        processes.

        Sorted batches pad little, and the largest comes first, so that a batch too large
        for the device fails at once. Metrics do not depend on the order, and what is kept
        per example (SQuAD's windows, the teacher-output cache) is keyed by its row.

        A padding sampler (Lightning's default under DDP) would repeat examples to even out
        the shares and metrics synced across processes would count them twice. Shares that
        differ by one batch are safe here: evaluation runs no gradient synchronisation.

        Args:
            dataset: the split.
            collate_fn: default: the datamodule's collator.
            num_replicas: evaluating processes.
            rank: this process.
            by_length: False keeps dataset order (inference timing, the pruning callback's
                fixed batch).
            lengths: the sort key of each row; default: its tokens (:func:`token_lengths`).
        """
        if by_length:
            key = token_lengths(dataset) if lengths is None else np.asarray(lengths)
            dataset = dataset.select(np.argsort(-key, kind="stable"))
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=UnrepeatedDistributedSampler(
                dataset, num_replicas=num_replicas, rank=rank, shuffle=False
            ),
            collate_fn=collate_fn or self.collator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # A private generator keeps evaluation from consuming the global RNG stream,
            # so evaluating (or not) before a resume does not change training randomness.
            generator=torch.Generator(),
        )
