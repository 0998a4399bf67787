"""torchmetrics collections against independent numpy computations."""

import math

import numpy as np
import pytest
import torch

from kdlab.errors import ConfigError
from kdlab.metrics import build_metrics, predictions

rng = np.random.default_rng(0)
Y_TRUE = rng.integers(0, 2, 40)
Y_PRED = np.where(rng.random(40) < 0.7, Y_TRUE, 1 - Y_TRUE)


def _confusion(y, p):
    tp = int(((p == 1) & (y == 1)).sum())
    tn = int(((p == 0) & (y == 0)).sum())
    fp = int(((p == 1) & (y == 0)).sum())
    fn = int(((p == 0) & (y == 1)).sum())
    return tp, tn, fp, fn


def _compute(names, preds, target, num_labels):
    metrics = build_metrics(names, num_labels)
    metrics.update(torch.as_tensor(preds), torch.as_tensor(target))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_accuracy_f1_matthews_binary():
    tp, tn, fp, fn = _confusion(Y_TRUE, Y_PRED)
    accuracy = (tp + tn) / len(Y_TRUE)
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = _compute(["accuracy", "f1", "matthews"], Y_PRED, Y_TRUE, 2)
    assert out["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert out["f1"] == pytest.approx(f1, abs=1e-6)
    assert out["matthews"] == pytest.approx(mcc, abs=1e-6)


def test_accuracy_three_classes():
    y = rng.integers(0, 3, 30)
    p = np.where(rng.random(30) < 0.5, y, (y + 1) % 3)
    out = _compute(["accuracy"], p, y, 3)
    assert out["accuracy"] == pytest.approx(float((p == y).mean()), abs=1e-6)


def test_pearson_spearman():
    y = rng.uniform(0, 5, 50)
    p = y + rng.normal(0, 1.0, 50)
    pearson = float(np.corrcoef(p, y)[0, 1])
    rank = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731 (no ties)
    spearman = float(np.corrcoef(rank(p), rank(y))[0, 1])
    out = _compute(["pearson", "spearman"], p.astype(np.float32), y.astype(np.float32), 1)
    assert out["pearson"] == pytest.approx(pearson, abs=1e-4)
    assert out["spearman"] == pytest.approx(spearman, abs=1e-4)


def test_predictions_argmax_and_regression():
    assert predictions(torch.tensor([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]
    assert predictions(torch.tensor([[1.5], [2.5]])).tolist() == [1.5, 2.5]


def test_unknown_metric_names_the_setting():
    with pytest.raises(ConfigError, match="task.metrics"):
        build_metrics(["accuracy", "bleu"], 2)
