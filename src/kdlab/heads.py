"""How the outputs of a task head are scored, picked by ``task.head``.

Each head says what its gold-label loss is, which rows of its logits a distillation loss or
a metric compares (every example for classification, the masked positions for masked-LM),
and what the metrics receive. Methods and evaluation call these instead of branching on
the task.
"""

import abc

import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import ConfigError
from kdlab.losses import supervised_loss
from kdlab.metrics import predictions

# Label value of positions that carry no MLM target (the data collator's convention).
IGNORE_INDEX = -100


class TaskHead(abc.ABC):
    """Scoring rules of one kind of task head."""

    @abc.abstractmethod
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss against gold labels, a scalar."""

    @abc.abstractmethod
    def scored(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The ``[N, C]`` logit rows that carry a target, and their ``[N]`` labels."""

    @abc.abstractmethod
    def metric_inputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(preds, target)`` for the task's torchmetrics collection."""


class SequenceClassificationHead(TaskHead):
    """One row of logits per example; regression when there is a single output."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return supervised_loss(logits, labels)

    def scored(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return logits, labels

    def metric_inputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return predictions(logits), labels


class MaskedLMHead(TaskHead):
    """``[B, T, V]`` vocabulary logits; only masked positions (label ≠ -100) are scored."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)

    def scored(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        keep = labels != IGNORE_INDEX
        return logits[keep], labels[keep]

    def metric_inputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # Perplexity takes [B, T, V]; selecting masked positions first keeps its softmax
        # to ~15 % of the tokens instead of the whole batch.
        rows, targets = self.scored(logits, labels)
        return rows.unsqueeze(0), targets.unsqueeze(0)


TASK_HEADS: dict[str, TaskHead] = {
    "sequence_classification": SequenceClassificationHead(),
    "masked_lm": MaskedLMHead(),
}


def task_head(kind: str) -> TaskHead:
    """The scoring rules of ``task.head``."""
    if kind not in TASK_HEADS:
        raise ConfigError(f"task.head={kind} has no scoring rules; known: {sorted(TASK_HEADS)}")
    return TASK_HEADS[kind]
