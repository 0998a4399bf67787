"""Fine-tuning on gold labels (baseline; also how teachers are made).

``L = CE(z_s, y)`` for classification, ``MSE(z_s, y)`` for regression, the masked-token
cross-entropy for a masked-LM head: the task head's loss (:mod:`kdlab.heads`).
"""

from torch import Tensor

from kdlab.methods.base import BaseMethod, model_inputs


class FineTune(BaseMethod):
    """Supervised training without a teacher."""

    requires_teacher = False

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.student(**model_inputs(batch)).logits
        return {"loss": self.task_head.loss(logits, batch["labels"])}
