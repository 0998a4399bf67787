"""Standard knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
in a Neural Network", arXiv:1503.02531).

``L = (1 − α) · CE(z_s, y) + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``

For regression (STS-B) both terms are MSE: ``(1 − α) · MSE(z_s, y) + α · MSE(z_s, z_t)``.
For spans (SQuAD) both terms are means over the start and end outputs (BERT's SQuAD loss
averages the two cross-entropies; the KL term averages the two KLs alike), so ``α`` is the
teacher's share of the loss for every head.
"""

from torch import Tensor

from kdlab.losses import kd_loss
from kdlab.methods.base import BaseMethod
from kdlab.validation import Positive, Probability


class KnowledgeDistillation(BaseMethod):
    """Student matches the teacher's softened outputs and the gold labels.

    Args:
        alpha: weight ``α`` of the teacher term (``1 − α`` goes to the label term).
        temperature: softening temperature ``T``.
        **base: see :class:`~kdlab.methods.base.BaseMethod`.
    """

    def __init__(self, *, alpha: Probability = 0.5, temperature: Positive = 2.0, **base) -> None:
        super().__init__(**base)
        self.alpha = alpha
        self.temperature = temperature

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        teacher_logits = self.logits(self.teacher_outputs(batch))
        student_logits = self.logits(self.forward_model(self.student, batch))
        losses = kd_loss(
            student_logits, teacher_logits, self.targets(batch), self.alpha, self.temperature
        )
        return self.weigh_head_losses(losses, batch)
