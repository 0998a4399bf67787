"""Distillation losses as pure tensor functions.

Shapes: ``B`` batch, ``C`` classes (token positions for span starts and ends). All
reductions are means over the batch so that loss scales do not depend on the batch size.
Functions taking mappings work on every output of a task head (see
``kdlab.models.heads.Head.outputs``): one for classification, start and end for spans;
they average over the outputs, so a weight such as KD's ``α`` means the same for every
head.

Losses are computed in fp32 whatever the logits' dtype: under bf16 autocast a model's
logits come out in bf16, and rounding the targets to it instead would move them (an STS-B
score of 4.9 reads 4.90625, a mixing weight of 0.3 reads 0.30078125).
Token-level targets (masked-LM) use ``-100`` for positions without a target, the
convention of ``transformers``' data collators; models are scored at the other positions
only (``kdlab.models.heads.forward``), so the losses see ``[N, V]`` logits and ``[N]``
targets there.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# Target value of positions that carry no target (masked-LM's unmasked tokens).
IGNORE_INDEX = -100


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
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
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
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Task loss on gold labels: cross-entropy for classes, MSE for regression.

    Args:
        logits: ``[B, C]``; ``C == 1`` means regression (e.g. STS-B); ``[B, T, V]`` for
            token-level targets.
        labels: ``[B]`` class indices, float targets for regression, or ``[B, T]`` token
            ids with ``IGNORE_INDEX`` where there is no target.

    Returns:
        Scalar tensor (mean over the targets).
    """
    if logits.size(-1) == 1:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX
    )


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
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return soft_kl(student_logits, teacher_logits, temperature)


def task_loss(logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """``supervised_loss`` of each output against its gold target, averaged over outputs.

    One output (``labels``) for classification; start and end positions for spans, whose
    mean is BERT's SQuAD loss.

    Args:
        logits: output logits keyed by the target they predict.
        targets: gold targets with the same keys.
    """
    losses = [supervised_loss(logits[name], targets[name]) for name in logits]
    return torch.stack(losses).mean()


def matching_loss(
    student_logits: Mapping[str, Tensor],
    teacher_logits: Mapping[str, Tensor],
    temperature: float = 1.0,
) -> Tensor:
    """``distillation_loss`` of each output, averaged over outputs (start and end for spans,
    as :func:`task_loss` averages their cross-entropies).

    Masked-LM logits arrive at the graded positions only (``kdlab.models.heads.forward``),
    so every row carries a target.

    Args:
        student_logits: output logits keyed by target name.
        teacher_logits: the teacher's, with the same keys.
        temperature: softening temperature of the classification terms.
    """
    losses = [
        distillation_loss(student_logits[name], teacher_logits[name], temperature)
        for name in student_logits
    ]
    return torch.stack(losses).mean()


def soft_target_loss(
    student_logits: Mapping[str, Tensor], teacher_logits: Mapping[str, Tensor], temperature: float
) -> dict[str, Tensor]:
    """Pre-trained Distillation's objective (Turc et al. 2019): the cross-entropy of the
    student's softened distribution against the teacher's, with no label term.

    ``soft_ce = −T² · Σ_y p_t(y|x; T) · log p_s(y|x; T)`` averaged over the batch and over
    outputs (start and end for spans). It equals ``T²·KL(p_t ‖ p_s) + T²·H(p_t)``: the
    teacher's entropy does not depend on the student, so both have the same gradient, and
    ``kl = soft_ce − T²·H(p_t)`` is logged to read like KD's curves. Regression outputs
    (``C == 1``) use the MSE to the teacher's prediction instead (``mse``).

    Args:
        student_logits: output logits keyed by target name, ``[B, C]`` each.
        teacher_logits: the teacher's, with the same keys.
        temperature: softening temperature ``T > 0``.

    Returns:
        ``{"loss", "soft_ce", "kl"}`` (classification and spans) or ``{"loss", "mse"}``.
    """
    terms: dict[str, Tensor] = {}
    outputs = len(student_logits)
    for name, student in student_logits.items():
        teacher = teacher_logits[name].float()
        if student.size(-1) == 1:
            mse = F.mse_loss(student.float(), teacher)
            terms["mse"] = terms.get("mse", 0) + mse / outputs
            continue
        log_p_t = F.log_softmax(teacher / temperature, dim=-1)
        log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
        p_t = log_p_t.exp()
        soft_ce = -(p_t * log_p_s).sum(-1).mean() * temperature**2
        entropy = -(p_t * log_p_t).sum(-1).mean() * temperature**2
        terms["soft_ce"] = terms.get("soft_ce", 0) + soft_ce / outputs
        terms["kl"] = terms.get("kl", 0) + (soft_ce - entropy) / outputs
    loss = terms.get("soft_ce", 0) + terms.get("mse", 0)
    return {"loss": loss, **terms}


def kd_loss(
    student_logits: Tensor | Mapping[str, Tensor],
    teacher_logits: Tensor | Mapping[str, Tensor],
    targets: Tensor | Mapping[str, Tensor],
    alpha: float,
    temperature: float,
) -> dict[str, Tensor]:
    """Standard knowledge distillation (Hinton et al. 2015).

    ``L = (1 − α) · CE(z_s, y) + α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``; for
    regression both terms are MSE (gold target and teacher output). For spans both terms
    are means over the start and end outputs (:func:`task_loss`, :func:`matching_loss`),
    so ``α`` is the teacher's share of the loss for every head.

    Args:
        student_logits: ``[B, C]`` logits, or logits keyed by target name (``labels``, or
            ``start_positions`` and ``end_positions``).
        teacher_logits: the teacher's, in the same form.
        targets: gold targets, in the same form.
        alpha: weight of the teacher term.
        temperature: softening temperature ``T``.

    Returns:
        ``{"loss", "ce", "kd"}`` scalars.
    """
    if isinstance(student_logits, Tensor):
        student_logits, teacher_logits, targets = (
            {"labels": x} for x in (student_logits, teacher_logits, targets)
        )
    ce = task_loss(student_logits, targets)
    kd = matching_loss(student_logits, teacher_logits, temperature)
    return {"loss": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def mixup(x: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """Mixup of every example with its partner: ``λ_i · x_i + (1 − λ_i) · x'_i``.

    ``torch.lerp`` computes it, which is exact at the ends: ``λ = 1`` returns ``x`` and a
    partner equal to the example (a self-pair) returns ``x_i`` bit for bit, so mixed losses
    then equal the un-mixed ones exactly.

    Args:
        x: ``[B, ...]`` floats (embeddings ``[B, L, H]``, one-hot labels ``[B, C]``, targets ``[B]``).
        partner: shaped like ``x``: row ``i`` is the partner of example ``i``.
        lam: ``[B]`` mixing weights in ``[0, 1]``, broadcast over the trailing dims of ``x``
            (cast to ``x``'s dtype).

    Returns:
        Tensor shaped like ``x``.
    """
    weight = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return torch.lerp(partner, x, weight)


def mixup_target_loss(
    logits: Tensor, labels: Tensor, partner_labels: Tensor, lam: Tensor
) -> Tensor:
    """MixKD's student loss on mixed inputs, ``L_SM`` (Liang et al. 2021).

    Cross-entropy against the mixed label ``λ·y_i + (1 − λ)·y_j`` (one-hot ``y``); for
    regression (``C == 1``) MSE against the mixed target ``λ·y_i + (1 − λ)·y_j``. Targets
    are mixed in fp32 (``λ`` too), whatever the logits' dtype.

    Args:
        logits: ``[B, C]`` student outputs on the mixed inputs.
        labels: ``[B]`` class indices, or float targets for regression.
        partner_labels: ``[B]`` the labels of each example's partner.
        lam: ``[B]`` mixing weights.

    Returns:
        Scalar tensor.
    """
    if logits.size(-1) == 1:
        target = mixup(labels.float(), partner_labels.float(), lam)
        return F.mse_loss(logits.float().squeeze(-1), target)
    classes = logits.size(-1)
    one_hot, partner = (F.one_hot(y, classes).float() for y in (labels, partner_labels))
    return soft_cross_entropy(logits, mixup(one_hot, partner, lam))


def masked_mse(student: Tensor, teacher: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the selected entries only.

    ``Σ_sel (s − t)² / |sel|`` where ``sel`` are the entries at which ``keep`` (broadcast
    to the inputs' shape) is non-zero. Unselected entries do not enter the sum at all, so
    even a non-finite value there cannot leak in. Computed in fp32 (as autocast runs
    ``mse_loss``), with an integer count of the selected entries.

    Args:
        student: e.g. hidden states ``[B, T, H]`` or attention maps ``[B, A, T, T]``.
        teacher: same shape.
        keep: boolean or 0/1 tensor broadcastable to that shape, e.g. kept dimensions
            ``[H]``, real tokens × kept dimensions ``[B, T, H]`` (see :func:`hidden_mse`
            and :func:`attention_mse`). At least one entry must be selected.

    Returns:
        Scalar fp32 tensor.
    """
    selected = torch.broadcast_to(keep != 0, student.shape)
    squares = (student.float() - teacher.float()).square()
    return torch.where(selected, squares, 0.0).sum() / selected.sum()


def hidden_mse(
    student: Tensor, teacher: Tensor, tokens: Tensor, dims: Tensor | None = None
) -> Tensor:
    """MSE of hidden states over real tokens × kept dimensions.

    Args:
        student: ``[B, T, H]`` hidden states.
        teacher: ``[B, T, H]``.
        tokens: ``[B, T]`` attention mask, 1 on real tokens, 0 on padding.
        dims: ``[H]`` 0/1 mask of the dimensions compared; None compares all of them.

    Returns:
        Scalar fp32 tensor: the mean over ``Σ_b n_b · |dims|`` entries.
    """
    keep = tokens[:, :, None] != 0
    if dims is not None:
        keep = keep & (dims != 0)
    return masked_mse(student, teacher, keep)


def attention_mse(student: Tensor, teacher: Tensor, tokens: Tensor, heads: Tensor) -> Tensor:
    """MSE of attention maps over kept heads × real query rows × real key columns.

    Args:
        student: ``[B, A, T, T]`` attention probabilities (query rows, key columns).
        teacher: ``[B, A, T, T]``.
        tokens: ``[B, T]`` attention mask, 1 on real tokens, 0 on padding.
        heads: ``[A]`` 0/1 mask of the heads compared.

    Returns:
        Scalar fp32 tensor: the mean over ``Σ_b n_b² · |heads|`` entries.
    """
    real = tokens != 0
    keep = (heads != 0)[None, :, None, None] & real[:, None, :, None] & real[:, None, None, :]
    return masked_mse(student, teacher, keep)
