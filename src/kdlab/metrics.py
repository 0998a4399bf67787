"""Metrics of one evaluation split: a :class:`SplitMetrics` per split, provided by the
datamodule.

Classification tasks use torchmetrics collections chosen by name in the task config
(:class:`ClassificationMetrics`); other task families bring their own
(SQuAD: :class:`kdlab.qa.metrics.SquadMetrics`).
"""

import abc
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.text import Perplexity
from transformers.utils import ModelOutput

from kdlab.errors import ConfigError
from kdlab.losses import IGNORE_INDEX

# Metric names a classification task may list in ``task.metrics``, and how each is built.
METRICS: dict[str, Callable[[int], Metric]] = {
    "accuracy": lambda n: MulticlassAccuracy(num_classes=n, average="micro"),
    "f1": lambda n: BinaryF1Score(),
    "matthews": lambda n: MatthewsCorrCoef(task="multiclass", num_classes=n),
    "pearson": lambda n: PearsonCorrCoef(),
    "spearman": lambda n: SpearmanCorrCoef(),
}


class SplitMetrics(nn.Module, abc.ABC):
    """Accumulates a model's outputs on one evaluation split and computes its metrics.

    An ``nn.Module`` so that metric states move to the model's device with it; they stay fp32
    under any precision (:class:`~kdlab.methods.base.BaseMethod`), and inputs are upcast.
    """

    @abc.abstractmethod
    def update(self, outputs: ModelOutput, batch: dict[str, Tensor]) -> None:
        """Add one batch: the model's outputs and the batch it was run on."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Tensor | float]:
        """Metrics of everything added since the last ``reset``, keyed by metric name."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Start a new evaluation pass."""

    def files(self) -> dict[str, dict]:
        """JSON outputs of the last ``compute`` by file name (e.g. SQuAD's
        ``predictions.json``); evaluations without per-example outputs have none."""
        return {}


class ClassificationMetrics(SplitMetrics):
    """The task's torchmetrics on classification (or regression) logits and ``labels``.

    Args:
        names: metric names from ``task.metrics``.
        num_labels: number of classes; 1 for regression.
    """

    def __init__(self, names: Sequence[str], num_labels: int) -> None:
        super().__init__()
        self.metrics = build_metrics(names, num_labels)

    def update(self, outputs: ModelOutput, batch: dict[str, Tensor]) -> None:
        labels = batch["labels"]
        # Regression labels arrive in the model's dtype under *-true precision (Lightning
        # casts a batch's floating tensors), and a bf16 sum over a batch keeps 3 digits.
        if labels.is_floating_point():
            labels = labels.float()
        self.metrics.update(predictions(outputs.logits), labels)

    def compute(self) -> dict[str, Tensor]:
        return self.metrics.compute()

    def reset(self) -> None:
        self.metrics.reset()


class MaskedLMMetrics(SplitMetrics):
    """Perplexity of a masked-LM head: ``exp`` of the mean cross-entropy over the masked
    positions. The outputs carry logits ``[N, V]`` at the batch's graded positions only
    (``kdlab.models.heads.forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.perplexity = Perplexity()

    def update(self, outputs: ModelOutput, batch: dict[str, Tensor]) -> None:
        labels = batch["labels"]
        graded = labels[labels != IGNORE_INDEX]
        # fp32 logits: the metric sums the batch's log-probabilities in the logits' dtype.
        self.perplexity.update(outputs.logits.float().unsqueeze(0), graded.unsqueeze(0))

    def compute(self) -> dict[str, Tensor]:
        return {"perplexity": self.perplexity.compute()}

    def reset(self) -> None:
        self.perplexity.reset()


def build_metrics(names: Sequence[str], num_labels: int) -> MetricCollection:
    """A collection of the task's metrics, keyed by name (``accuracy``, ``f1``, ...).

    Args:
        names: metric names from ``task.metrics``.
        num_labels: number of classes; 1 for regression.
    """
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ConfigError(f"task.metrics has unknown {sorted(unknown)}; known: {sorted(METRICS)}")
    return MetricCollection({name: METRICS[name](num_labels) for name in names})


def predictions(logits: Tensor) -> Tensor:
    """Class indices for classification logits, the score itself for regression (``C == 1``)."""
    if logits.size(-1) == 1:
        return logits.squeeze(-1).float()
    return logits.argmax(-1)
