"""torchmetrics collections against independent numpy computations."""

import math

import numpy as np
import pytest
import torch
from torchmetrics import Metric
from transformers.utils import ModelOutput

import kdlab.train
from kdlab.errors import ConfigError
from kdlab.metrics import build_metrics, predictions
from tests.test_homodistil import COMMON, compose, corpus_args, data  # noqa: F401

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


def _floating_state_dtypes(module: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    """The dtypes of every floating metric state under ``module``, by metric."""
    found = {}
    for name, metric in module.named_modules():
        if isinstance(metric, Metric):
            values = metric.metric_state.values()
            states = [t for v in values for t in (v if isinstance(v, list) else [v])]
            found[name] = {t.dtype for t in states if torch.is_tensor(t) and t.is_floating_point()}
    return found


def _mean_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of theirs."""
    ranks = np.empty(len(a))
    ranks[a.argsort(kind="stable")] = np.arange(1, len(a) + 1)
    _, inverse = np.unique(a, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)]
)
def test_metric_states_stay_fp32_after_a_half_precision_fit(make_cfg, captured, precision, dtype):
    # Lightning's *-true precision casts the module with .to(dtype); torchmetrics lets that
    # through to its states, where 200 batches' bf16 sums keep 3 significant digits.
    # One step: a 16-true run of this tiny model on CPU has a NaN loss at its second.
    overrides = [f"trainer.precision={precision}", "trainer.max_steps=1"]
    kdlab.train.run(make_cfg(task="stsb", method="finetune", extra=overrides))
    module = captured["module"]
    assert module.student.dtype == dtype  # the cast happened
    dtypes = _floating_state_dtypes(module)
    assert set(dtypes) == {
        "eval_losses.val",
        "split_metrics.val.metrics.pearson",
        "split_metrics.val.metrics.spearman",
    }
    assert (
        dtypes["eval_losses.val"] == dtypes["split_metrics.val.metrics.pearson"] == {torch.float32}
    )
    # 200 more batches of 16 outputs and labels in the student's dtype (as Lightning passes
    # the labels), against the fp64 computation on the same values.
    generator = torch.Generator().manual_seed(0)
    labels = (5 * torch.rand(200, 16, generator=generator)).to(dtype)
    preds = (labels + torch.randn(200, 16, generator=generator)).to(dtype)
    losses = torch.rand(200, generator=generator).to(dtype)
    weights = torch.randint(1, 17, (200,), generator=generator)
    mean, split_metrics = module.eval_losses["val"], module.split_metrics["val"]
    mean.reset()
    split_metrics.reset()
    for i in range(200):
        mean.update(losses[i], weight=int(weights[i]))
        split_metrics.update(ModelOutput(logits=preds[i, :, None]), {"labels": labels[i]})
    assert set().union(*_floating_state_dtypes(module).values()) == {torch.float32}
    expected_mean = float((losses.double() * weights).sum() / weights.sum())
    assert float(mean.compute()) == pytest.approx(expected_mean, rel=1e-6)
    x, y = preds.double().flatten().numpy(), labels.double().flatten().numpy()
    out = {k: float(v) for k, v in split_metrics.compute().items()}
    assert out["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
    expected_spearman = np.corrcoef(_mean_ranks(x), _mean_ranks(y))[0, 1]
    assert out["spearman"] == pytest.approx(expected_spearman, abs=1e-6)


def test_mlm_loss_and_perplexity_are_fp32_under_bf16_true(data, tmp_path, captured):  # noqa: F811
    overrides = [
        *COMMON,
        *corpus_args(data),
        "method=mlm",
        "model=pretrained",
        f"model.path={data['teacher']}",
        "trainer.max_epochs=1",
        "trainer.precision=bf16-true",
        f"run_dir={tmp_path}",
    ]
    student = kdlab.train.run(compose(overrides))["student"]
    dtypes = _floating_state_dtypes(captured["module"])
    assert dtypes == {
        "eval_losses.val": {torch.float32},
        "split_metrics.val.perplexity": {torch.float32},
    }
    # One validation batch: both are fp32 functions of the same bf16 logits, the mean
    # masked-token cross-entropy and exp of it.
    assert student["val/perplexity"] == pytest.approx(math.exp(student["val/loss"]), rel=1e-6)
