"""Fine-tuning on gold labels (baseline; also how teachers are made).

``L = CE(z_s, y)`` for classification, ``MSE(z_s, y)`` for regression; for spans the mean
of the start and end cross-entropies.
"""

from torch import Tensor

from kdlab.losses import task_loss
from kdlab.methods.base import BaseMethod
from kdlab.methods.traits import MethodTraits


class FineTune(BaseMethod):
    """Supervised training without a teacher."""

    traits = MethodTraits(requires_teacher=False)

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        outputs = self.forward_model(self.student, batch)
        losses = {"loss": task_loss(self.logits(outputs), self.targets(batch))}
        return self.weigh_head_losses(losses, batch)
