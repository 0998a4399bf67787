"""Distillation losses as pure tensor functions.

Shapes: ``B`` batch, ``C`` classes. All reductions are means over the batch so that loss
scales do not depend on the batch size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Temperature-scaled KL divergence of the student from the teacher (Hinton et al. 2015).

    ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch. The ``T²``
    factor keeps gradient magnitudes comparable across temperatures.

    Args:
        student_logits: ``[B, C]`` (or ``[..., C]``; leading dims are averaged).
        teacher_logits: same shape as ``student_logits``.
        temperature: softening temperature ``T > 0``.

    Returns:
        Scalar tensor.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a distribution: ``−Σ_y q(y) log p(y)``, averaged over the batch.

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target_probs: ``[B, C]`` rows summing to one (teacher probabilities, mixed labels).

    Returns:
        Scalar tensor.
    """
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Task loss on gold labels: cross-entropy for classes, MSE for regression.

    Args:
        logits: ``[B, C]``; ``C == 1`` means regression (e.g. STS-B).
        labels: ``[B]`` class indices, or float targets for regression.

    Returns:
        Scalar tensor.
    """
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Teacher-matching term: ``soft_kl`` for classes, MSE between outputs for regression.

    Args:
        student_logits: ``[B, C]``; ``C == 1`` means regression.
        teacher_logits: same shape.
        temperature: used by the classification branch only.

    Returns:
        Scalar tensor.
    """
    if student_logits.size(-1) == 1:
        return F.mse_loss(student_logits, teacher_logits)
    return soft_kl(student_logits, teacher_logits, temperature)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float,
    temperature: float,
) -> dict[str, Tensor]:
    """Standard knowledge distillation (Hinton et al. 2015).

    ``L = (1 − α) · CE(z_s, y) + α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``; for
    regression both terms are MSE (gold target and teacher output).

    Returns:
        ``{"loss", "ce", "kd"}`` scalars.
    """
    ce = supervised_loss(student_logits, labels)
    kd = distillation_loss(student_logits, teacher_logits, temperature)
    return {"loss": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def is_finite(loss: Tensor) -> bool:
    """Whether a scalar loss is neither NaN nor infinite."""
    return bool(torch.isfinite(loss).all())


def masked_mse(student: Tensor, teacher: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the kept entries only.

    ``Σ keep·(s − t)² / Σ keep`` with ``keep`` broadcast to the inputs' shape: pruned hidden
    dimensions or heads of the student carry no signal and are left out of the mean.

    Args:
        student: e.g. hidden states ``[B, T, H]`` or attention maps ``[B, A, T, T]``.
        teacher: same shape.
        keep: 0/1 weights broadcastable to that shape (``[H]``, or ``[A, 1, 1]``).

    Returns:
        Scalar tensor.
    """
    keep = keep.to(student.dtype).expand_as(student)
    return ((student - teacher) ** 2 * keep).sum() / keep.sum()
