"""Pre-trained Distillation (Turc, Chang, Lee & Toutanova, "Well-Read Students Learn
Better: On the Importance of Pre-training Compact Models", arXiv:1908.08962, 2019).

A compact student, pre-trained with masked-LM (``method=mlm``), is distilled on a transfer
set (unlabelled inputs, ``task.transfer``) with the soft labels of a fine-tuned teacher::

    L = −T² · Σ_y p_t(y | x; T) · log p_s(y | x; T)        (T = 1 by default)

(:func:`~kdlab.losses.soft_target_loss`; MSE to the teacher's prediction for regression,
the mean over the start and end distributions of every window for SQuAD). No label is ever read: a
transfer set has none. It may be fine-tuned on the labels afterwards (``method=finetune``);
``experiment=pd`` and ``experiment=pd_baselines`` chain the stages.
"""

from torch import Tensor

from kdlab.losses import soft_target_loss
from kdlab.methods.base import BaseMethod
from kdlab.methods.traits import MethodTraits
from kdlab.validation import Positive


class PreTrainedDistillation(BaseMethod):
    """Student matches the teacher's soft labels on unlabelled inputs.

    Args:
        temperature: softening temperature ``T``.
        **base: see :class:`~kdlab.methods.base.BaseMethod`.
    """

    traits = MethodTraits(
        reads_labels=False,
        supported_heads=frozenset({"sequence_classification", "question_answering"}),
        unsupported_head_hint="distil a masked-LM teacher with method=homodistil",
    )

    def __init__(self, *, temperature: Positive = 1.0, **base) -> None:
        super().__init__(**base)
        self.temperature = temperature

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        teacher = self.logits(self.teacher_outputs(batch))
        student = self.logits(self.forward_model(self.student, batch))
        return soft_target_loss(student, teacher, self.temperature)
