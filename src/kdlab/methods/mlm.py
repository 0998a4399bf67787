"""Masked-language-model training (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding").

``L = −(1/|M|) Σ_{i∈M} log p_s(x_i | x̃)`` over the masked positions ``M`` of the corrupted
input ``x̃``. Continued pre-training of an encoder (e.g. training MiniLM's untrained MLM
head transform before it teaches) or pre-training a random miniature from scratch.
"""

from kdlab.errors import ConfigError
from kdlab.methods.finetune import FineTune


class MaskedLanguageModeling(FineTune):
    """Supervised training on the masked tokens; the task head's loss is the MLM loss."""

    def __init__(self, student, teacher=None, *, head: str = "sequence_classification", **base):
        if head != "masked_lm":
            raise ConfigError(
                f"method=mlm needs a masked-LM task (task.head=masked_lm), got task.head={head}: "
                "use task=corpus/<name>, e.g. task=corpus/local task.files=[<text files>]."
            )
        super().__init__(student, teacher, head=head, **base)
