"""Losses against values worked out by hand."""

import math

import pytest
import torch

from kdlab.losses import (
    distillation_loss,
    kd_loss,
    mixup_target_loss,
    soft_kl,
    soft_target_loss,
    supervised_loss,
)

E = math.e


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-6)


# Student z_s and teacher z_t, 2 examples x 2 classes, temperature T = 2:
#   row 0: z_s = [2, 0], z_t = [0, 2]  ->  z/T: s = [1, 0], t = [0, 1]
#          p_s = [e/(1+e), 1/(1+e)],  p_t = [1/(1+e), e/(1+e)]
#          KL(p_t || p_s) = 1/(1+e)·(log 1/(1+e) − log e/(1+e)) + e/(1+e)·(log e/(1+e) − log 1/(1+e))
#                         = −1/(1+e) + e/(1+e) = (e − 1)/(e + 1)
#   row 1: z_s = z_t = [0, 0]  ->  KL = 0
#   batch mean = (e − 1) / (2(e + 1));  times T² = 4  ->  2(e − 1)/(e + 1)
STUDENT = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
TEACHER = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
KL_T2 = 2 * (E - 1) / (E + 1)
# Cross-entropy with labels [0, 1]:
#   row 0: −log(e²/(e² + 1)) = log(1 + e⁻²);  row 1: −log(1/2) = log 2
LABELS = torch.tensor([0, 1])
CE = (math.log(1 + E**-2) + math.log(2)) / 2


def test_soft_kl_temperature_two_by_hand():
    close(soft_kl(STUDENT, TEACHER, temperature=2.0), KL_T2)


def test_soft_kl_temperature_one_by_hand():
    # T = 1: row 0 p_s = [e²/(1+e²), 1/(1+e²)], p_t reversed, KL = (e² − 1)/(e² + 1)·2;
    # row 1 zero; mean over the batch; T² = 1.
    expected = (E**2 - 1) / (E**2 + 1) * 2 / 2
    close(soft_kl(STUDENT, TEACHER, temperature=1.0), expected)


def test_soft_kl_three_classes_by_hand():
    # z_s = [0, 0, 0] (uniform, log p_s = −log 3), z_t = [log 2, 0, 0] -> p_t = [1/2, 1/4, 1/4]
    # KL = 1/2·log(3/2) + 2·1/4·log(3/4) = 1/2·log(9/8); T = 1.
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2), 0.0, 0.0]])
    close(soft_kl(s, t), 0.5 * math.log(9 / 8))


def test_soft_kl_is_zero_for_equal_logits_and_scales_with_t_squared():
    z = torch.randn(4, 5)
    close(soft_kl(z, z.clone(), temperature=3.0), 0.0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(soft_kl(s, t, 4.0), 16 * soft_kl(s / 4, t / 4, 1.0))


def test_supervised_loss_classification_by_hand():
    close(supervised_loss(STUDENT, LABELS), CE)


def test_supervised_loss_regression_is_mse():
    # logits [[1], [3]] vs targets [0.5, 3.5]: ((0.5)² + (0.5)²) / 2 = 0.25
    logits = torch.tensor([[1.0], [3.0]])
    close(supervised_loss(logits, torch.tensor([0.5, 3.5])), 0.25)
    # integer-typed targets are cast to the logits' dtype
    close(supervised_loss(logits, torch.tensor([1, 3])), 0.0)


def test_distillation_loss_branches():
    close(distillation_loss(STUDENT, TEACHER, temperature=2.0), KL_T2)
    # regression: MSE between outputs, temperature ignored: ((1 − 2)² + (3 − 1)²) / 2 = 2.5
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    close(distillation_loss(s, t, temperature=1.0), 2.5)
    close(distillation_loss(s, t, temperature=5.0), 2.5)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_kd_loss_classification_alpha_weighting(alpha):
    out = kd_loss(STUDENT, TEACHER, LABELS, alpha=alpha, temperature=2.0)
    close(out["ce"], CE)
    close(out["kd"], KL_T2)
    close(out["loss"], (1 - alpha) * CE + alpha * KL_T2)


def test_kd_loss_regression_stsb_branch():
    # STS-B: (1 − α)·MSE(z_s, y) + α·MSE(z_s, z_t) = 0.75·0.25 + 0.25·2.5 = 0.8125
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    out = kd_loss(s, t, torch.tensor([0.5, 3.5]), alpha=0.25, temperature=2.0)
    close(out["ce"], 0.25)
    close(out["kd"], 2.5)
    close(out["loss"], 0.8125)


def test_kd_loss_on_spans_averages_start_and_end_in_both_terms():
    # Start: the example above (cross-entropy CE, KL_T2). End: all-zero logits for student
    # and teacher: KL 0, cross-entropy log 2 at any position. Both terms are means over the
    # two outputs, so α weighs the teacher as it does for classification.
    zeros = torch.zeros(2, 2)
    student = {"start_positions": STUDENT, "end_positions": zeros}
    teacher = {"start_positions": TEACHER, "end_positions": zeros}
    targets = {"start_positions": LABELS, "end_positions": LABELS}
    out = kd_loss(student, teacher, targets, alpha=0.25, temperature=2.0)
    ce, kd = (CE + math.log(2)) / 2, KL_T2 / 2
    close(out["ce"], ce)
    close(out["kd"], kd)
    close(out["loss"], 0.75 * ce + 0.25 * kd)
    # Start and end both equal to a classification output give that output's loss.
    same = kd_loss(
        {"start_positions": STUDENT, "end_positions": STUDENT},
        {"start_positions": TEACHER, "end_positions": TEACHER},
        targets,
        alpha=0.25,
        temperature=2.0,
    )
    close(same["loss"], 0.75 * CE + 0.25 * KL_T2)


def test_kd_loss_gradient_flows_to_student_only():
    s = STUDENT.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    kd_loss(s, t.detach(), LABELS, alpha=0.5, temperature=2.0)["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None


# ------------------------------------------------------------------ fp32 under autocast
BF16 = torch.bfloat16


def test_regression_targets_stay_fp32_under_bf16_autocast():
    # Under autocast a model's logits are bf16 (5.0, 3.0 and 1.0 are exact there); the
    # targets are fp32. bf16 keeps 8 significant bits: 4.9 would read 4.90625, and the
    # squared error (5 − 4.9)² = 0.01 would read 0.0087890625.
    student = torch.tensor([[5.0], [3.0]], dtype=BF16)
    teacher = torch.tensor([[4.9], [3.0]])
    labels = torch.tensor([4.9, 3.0])
    with torch.autocast("cpu", dtype=BF16):
        losses = {
            "supervised": supervised_loss(student, labels),
            "distillation": distillation_loss(student, teacher),
            "pd": soft_target_loss({"labels": student}, {"labels": teacher}, 1.0)["mse"],
            **kd_loss(student, teacher, labels, 0.5, 2.0),
        }
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        assert loss.item() == pytest.approx(0.01 / 2, rel=1e-5), name


def test_mixed_targets_and_lambda_stay_fp32_under_bf16_autocast():
    # λ = 0.3 reads 0.30078125 in bf16. Regression: targets 0.3·0 + 0.7·4.9 = 3.43 and
    # 0.3·4.9 + 0.7·0 = 1.47 against outputs 3 and 1: ((0.43)² + (0.47)²) / 2.
    lam = torch.tensor([0.3, 0.3])
    outputs = torch.tensor([[3.0], [1.0]], dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        mse = mixup_target_loss(outputs, torch.tensor([0.0, 4.9]), torch.tensor([4.9, 0.0]), lam)
    assert mse.dtype == torch.float32
    assert mse.item() == pytest.approx((0.43**2 + 0.47**2) / 2, rel=1e-5)
    # Classification: outputs (0, 0) give p = (1/2, 1/2), cross-entropy log 2 against any
    # target; outputs (0, 1) give p = (1, e) / (1 + e), and against the mixed label
    # (0.7, 0.3): −0.7·log(1/(1+e)) − 0.3·log(e/(1+e)) = log(1 + e) − 0.3.
    logits = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        ce = mixup_target_loss(logits, torch.tensor([0, 1]), torch.tensor([1, 0]), lam)
    assert ce.dtype == torch.float32
    assert ce.item() == pytest.approx((math.log(2.0) + math.log(1 + E) - 0.3) / 2, rel=1e-6)
