"""torchmetrics collections for each task, chosen by name in the task config."""

from collections.abc import Callable, Sequence

from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.text import Perplexity

from kdlab.errors import ConfigError

_FACTORIES: dict[str, Callable[[int], Metric]] = {
    "accuracy": lambda n: MulticlassAccuracy(num_classes=n, average="micro"),
    "f1": lambda n: BinaryF1Score(),
    "matthews": lambda n: MatthewsCorrCoef(task="multiclass", num_classes=n),
    "pearson": lambda n: PearsonCorrCoef(),
    "spearman": lambda n: SpearmanCorrCoef(),
    # Masked-LM: exp of the mean cross-entropy over masked positions (label -100 elsewhere).
    "perplexity": lambda n: Perplexity(ignore_index=-100),
}


def build_metrics(names: Sequence[str], num_labels: int) -> MetricCollection:
    """A collection of the task's metrics, keyed by name (``accuracy``, ``f1``, ...).

    Args:
        names: metric names from ``task.metrics``.
        num_labels: number of classes; 1 for regression.
    """
    unknown = set(names) - set(_FACTORIES)
    if unknown:
        raise ConfigError(
            f"task.metrics has unknown {sorted(unknown)}; known: {sorted(_FACTORIES)}"
        )
    return MetricCollection({name: _FACTORIES[name](num_labels) for name in names})


def predictions(logits: Tensor) -> Tensor:
    """Class indices for classification logits, the score itself for regression (``C == 1``)."""
    if logits.size(-1) == 1:
        return logits.squeeze(-1).float()
    return logits.argmax(-1)
