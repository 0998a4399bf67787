"""Training methods: one LightningModule per method on the shared ``BaseMethod``."""

from kdlab.methods.base import BaseMethod
from kdlab.methods.finetune import FineTune
from kdlab.methods.kd import KnowledgeDistillation
from kdlab.methods.mixkd import MixKD

__all__ = ["BaseMethod", "FineTune", "KnowledgeDistillation", "MixKD"]
