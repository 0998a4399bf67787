"""Fine-tuning on gold labels (baseline; also how teachers are made).

``L = CE(z_s, y)`` for classification, ``MSE(z_s, y)`` for regression.
"""

from torch import Tensor

from kdlab.losses import supervised_loss
from kdlab.methods.base import BaseMethod, model_inputs


class FineTune(BaseMethod):
    """Supervised training without a teacher."""

    requires_teacher = False

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.student(**model_inputs(batch)).logits
        return {"loss": supervised_loss(logits, batch["labels"])}
