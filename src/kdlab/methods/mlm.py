"""Masked-language-model training (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding").

``L = −(1/|M|) Σ_{i∈M} log p_s(x_i | x̃)`` over the masked positions ``M`` of the corrupted
input ``x̃``. Continued pre-training of an encoder (e.g. training MiniLM's untrained MLM
head transform before it teaches) or pre-training a random miniature from scratch.
"""

from kdlab.methods.finetune import FineTune
from kdlab.methods.traits import MethodTraits


class MaskedLanguageModeling(FineTune):
    """Supervised training on the masked tokens of a corpus task (``task=corpus/<name>``);
    the head's loss is the MLM loss. Other tasks are refused at build time."""

    traits = MethodTraits(
        requires_teacher=False,
        supported_heads=frozenset({"masked_lm"}),
        unsupported_head_hint=(
            "method=mlm needs a masked-LM task: use task=corpus/<name>, e.g. "
            "task=corpus/local task.files=[<text files>]"
        ),
    )
