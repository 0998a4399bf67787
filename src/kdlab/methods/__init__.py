"""Training methods: one LightningModule per method on the shared ``BaseMethod``."""

from kdlab.methods.base import BaseMethod
from kdlab.methods.finetune import FineTune
from kdlab.methods.homodistil import HomoDistil
from kdlab.methods.kd import KnowledgeDistillation
from kdlab.methods.mixkd import MixKD
from kdlab.methods.mlm import MaskedLanguageModeling
from kdlab.methods.pd import PreTrainedDistillation
from kdlab.methods.traits import MethodTraits

__all__ = [
    "BaseMethod",
    "FineTune",
    "HomoDistil",
    "KnowledgeDistillation",
    "MaskedLanguageModeling",
    "MethodTraits",
    "MixKD",
    "PreTrainedDistillation",
]
