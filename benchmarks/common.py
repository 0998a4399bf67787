"""Pieces the benchmark scripts share (``benchmarks/*.py``, ``experiments/*/bench.py``).

- Inputs that need no download: a random BERT masked LM with a word-level tokenizer, and
  random-word data in the layouts kdlab's datamodules read (an SST-2 folder, a corpus file).
- The students and modules a HomoDistil benchmark compares: a fresh student as the run
  builds it, and the run's method on a student without masks (the no-pruning baseline).
- Timing inside a real ``lightning.Trainer.fit``: a :class:`Clock` (host clock on the CPU,
  CUDA events on a GPU) and :class:`InterleavedTimer`, which times each training step and
  runs a side step beside it, outside the step's window.
- :class:`FlopCounter`: model FLOPs of the passes run while it counts.

The scripts import this as ``benchmarks.common``: run them with the repository root on
``PYTHONPATH`` (``export PYTHONPATH=src:.`` from the root).
"""

import random
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, PreTrainedModel
from transformers.models.bert.modeling_bert import BertPooler, BertSelfAttention

from kdlab.components import build
from kdlab.methods import BaseMethod
from kdlab.pruning import StructuredMasks
from kdlab.pruning.masks import _masks_ref
from kdlab.train import Assembly

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------------------- inputs
def write_random_teacher(
    directory: Path, vocab_size: int, seed: int = 0, **shape: int
) -> list[str]:
    """A randomly initialised BERT masked LM and its tokenizer, saved to ``directory``.

    The checkpoint also holds BERT's pooler, as ``bert-base-uncased``'s does: a teacher
    loaded for classification and its truncations (``model=bert6``) find their whole body
    in it, and only the classifier is new. The vocabulary is the special tokens and words
    ``w0``, ``w1``, ... (one token each), so a sentence of n such words is n tokens long.

    Args:
        directory: where ``config.json``, the weights and the tokenizer go.
        vocab_size: tokens of the vocabulary (30522 for BERT's).
        seed: seed of the weights.
        **shape: ``BertConfig`` arguments (``hidden_size``, ``num_hidden_layers``, ...).

    Returns:
        The words of the vocabulary (the special tokens left out).
    """
    directory.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    # transformers 5 takes the vocabulary itself (a vocab_file= is silently ignored).
    BertTokenizerFast(vocab=vocab).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, **shape)
    model = BertForMaskedLM(config)
    model.bert.pooler = BertPooler(config)
    model.save_pretrained(directory)
    return words


def write_random_sst2(
    directory: Path,
    words: list[str],
    rows: int,
    length: int,
    seed: int = 0,
    min_length: int | None = None,
) -> None:
    """SST-2's ``train.tsv`` and ``dev.tsv`` (the same ``rows`` sentences of ``length``
    random words, random binary labels), so that every batch fills ``max_seq_length``
    once ``length`` reaches it. With ``min_length``, each sentence has a random number of
    words from ``min_length`` to ``length`` instead (sentences of varied lengths)."""
    rng = random.Random(seed)

    def words_of_row() -> int:
        return length if min_length is None else rng.randint(min_length, length)

    lines = ["sentence\tlabel"] + [
        f"{' '.join(rng.choices(words, k=words_of_row()))}\t{rng.randint(0, 1)}"
        for _ in range(rows)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        (directory / name).write_text("\n".join(lines) + "\n")


def write_random_corpus(
    path: Path, words: list[str], lines: int, length: int, seed: int = 0
) -> None:
    """A text corpus of ``lines`` lines of ``length`` random words each (``task.files``)."""
    rng = random.Random(seed)
    sentences = (" ".join(rng.choices(words, k=length)) for _ in range(lines))
    path.write_text("\n".join(sentences) + "\n")


def first_batches(parts: Assembly, n: int) -> list[dict[str, Tensor]]:
    """The first ``n`` training batches, as the run's datamodule serves them."""
    batches = []
    for batch in parts.datamodule.train_dataloader():
        batches.append(dict(batch))
        if len(batches) == n:
            return batches
    raise SystemExit(
        f"The training set has fewer than {n} batches of {parts.datamodule.batch_size}."
    )


# ------------------------------------------------------------------------- modules
def fresh_student(cfg: DictConfig, parts: Assembly) -> PreTrainedModel:
    """A new student as the run builds it (for a pruned preset: a copy of the teacher,
    no masks installed, the library's default attention)."""
    return build(cfg, "model", head=parts.datamodule.head, labels=parts.datamodule.labels)


def unpruned_method(cfg: DictConfig, parts: Assembly, device: str | torch.device) -> BaseMethod:
    """The baseline of a pruning run: the run's method on a fresh student without masks in
    its forward pass, sharing the run's teacher.

    HomoDistil compares hidden states over the kept dimensions of the masks its student
    carries; this student carries all-ones masks that nothing updates, so the loss selects
    every dimension. They are a reference of the student's, not a module of the method, so
    nothing moves them: they are made on ``device``, where the fit will run.
    """
    plain = fresh_student(cfg, parts)
    _masks_ref(plain, StructuredMasks.for_model(plain).to(device))
    return build(
        cfg,
        "method",
        student=plain,
        teacher=parts.teacher,
        head=parts.datamodule.head,
        split_metrics=parts.datamodule.split_metrics(),
        optim=build(cfg, "optim"),
    )


# -------------------------------------------------------------------------- timing
class Clock:
    """Time marks on the host clock (CPU) or on the current CUDA stream (GPU).

    On a GPU, work is queued asynchronously: a CUDA event records when the stream reaches
    it, so two events bracket the device time of the work queued between them, gaps where
    the device waited for the host included, without stalling the host. Marks are read
    after the work is done (:meth:`seconds` waits for the end mark).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        """A mark of now: a ``perf_counter`` reading, or a recorded CUDA event."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Seconds from ``start`` to ``end`` (two marks)."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


Marks = tuple[float | torch.cuda.Event, float | torch.cuda.Event]
# A side step: runs on a training batch, returns (start, end) marks of its named parts.
SideStep = Callable[[dict[str, Tensor]], dict[str, Marks]]


class InterleavedTimer(L.Callback):
    """Times a fit's steps batch start to batch start, with an optional side step beside.

    A step's window runs from one ``on_train_batch_start`` to the next, so it covers all
    Lightning does per batch (``training_step``, backward, clipping, optimizer step,
    ``zero_grad``, scheduler, logger and callback hooks, handing over the next batch). The
    last batch only closes the window of the one before it.

    The side step of an even batch runs just before the step on it, that of an odd batch
    just after (at the next batch start), so neither always finds the caches warm; both lie
    outside the step's window. Put this callback first, so that no other callback's
    ``on_train_batch_start`` runs between the side step and the window's start.

    Args:
        clock: the marks' clock.
        side: the side step, or None to time the steps alone.
        epoch: time only this epoch's steps (from 0); None: every epoch's.

    Attributes:
        student_training, teacher_training: the modules' modes at the first batch.
    """

    def __init__(
        self, clock: Clock, side: SideStep | None = None, epoch: int | None = None
    ) -> None:
        self.clock = clock
        self.side = side
        self.epoch = epoch
        self._marks: dict[str, dict[int, Marks]] = {"step": {}}
        self.student_training: bool | None = None
        self.teacher_training: bool | None = None
        self._start = None
        self._previous: dict[str, Tensor] | None = None

    def _side(self, batch: dict[str, Tensor], index: int) -> None:
        for name, marks in self.side(batch).items():
            self._marks.setdefault(name, {})[index] = marks

    def window_opened(self, index: int, pl_module: L.LightningModule) -> None:
        """Called as step ``index``'s window opens, after any side step (for subclasses
        that measure more than time)."""

    def window_closed(self, index: int, pl_module: L.LightningModule) -> None:
        """Called as step ``index``'s window closes, before any side step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.epoch is not None and trainer.current_epoch != self.epoch:
            return
        now = self.clock.mark()
        if self._start is not None:
            self._marks["step"][batch_idx - 1] = (self._start, now)
            self.window_closed(batch_idx - 1, pl_module)
            if self.side is not None and (batch_idx - 1) % 2:
                self._side(self._previous, batch_idx - 1)
        if self.side is not None and batch_idx % 2 == 0:
            self._side(batch, batch_idx)
        if batch_idx == 0:
            self.student_training = pl_module.student.training
            teacher = pl_module.teacher
            self.teacher_training = None if teacher is None else teacher.training
        self._previous = batch
        self.window_opened(batch_idx, pl_module)
        self._start = self.clock.mark()

    def seconds(self) -> dict[str, dict[int, float]]:
        """Seconds per batch index: ``step`` (the fit's steps) and each side-step part."""
        return {
            name: {k: self.clock.seconds(*m) for k, m in marks.items()}
            for name, marks in self._marks.items()
        }


# --------------------------------------------------------------------------- FLOPs
class FlopCounter:
    """Model FLOPs of the passes through ``module`` while counting, from layer shapes.

    Per ``nn.Linear`` call ``2 · rows · in · out`` (rows: the input's positions), per BERT
    self-attention call ``4 · B · T² · (heads · head size)`` (the ``QKᵀ`` and
    attention-times-``V`` products), each ×3 where the call records gradients (forward and
    backward: the backward pass costs two matrix products per forward one) and ×1 where it
    does not (a frozen teacher, ``no_grad``). Embedding look-ups, LayerNorm, softmax, GELU,
    losses and the optimizer are not counted. For a BERT encoder this is ``2 · (matrix
    parameters) · tokens`` plus attention, with heads counted where they run (kdlab scores
    masked-LM logits at the graded positions only; a classifier reads ``[CLS]``).

    Usable as a context manager, or with :meth:`start` and :meth:`stop`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.flops = 0
        self._handles = []

    def start(self) -> "FlopCounter":
        """Install the counting hooks (the count goes on from where it was)."""
        for sub in self.module.modules():
            if isinstance(sub, nn.Linear):
                self._handles.append(sub.register_forward_hook(self._linear))
            elif isinstance(sub, BertSelfAttention):
                hook = sub.register_forward_pre_hook(self._attention, with_kwargs=True)
                self._handles.append(hook)
        return self

    def stop(self) -> int:
        """Remove the hooks; returns the FLOPs counted."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.flops

    def __enter__(self) -> "FlopCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _passes(module: nn.Module) -> int:
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        return 3 if trains else 1

    def _linear(self, module: nn.Linear, args: tuple, output: Tensor) -> None:
        rows = args[0].numel() // module.in_features
        self.flops += 2 * rows * module.in_features * module.out_features * self._passes(module)

    def _attention(self, module: BertSelfAttention, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
        batch, length = hidden.shape[:2]
        self.flops += 4 * batch * length**2 * module.all_head_size * self._passes(module)
