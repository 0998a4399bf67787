"""The optimizer and learning-rate schedule of a run (the ``optim`` config)."""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import SchedulerType, get_scheduler

from kdlab.validation import NonNegative, NonNegativeInt, Positive, Probability


class Optim:
    """AdamW with a ``transformers`` learning-rate schedule and linear warm-up.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not on biases and LayerNorm weights, i.e.
            not on any one-dimensional parameter: the same set in every family, whatever
            its parameter names).
        betas: Adam's ``(β1, β2)``.
        eps: Adam's ε.
        scheduler: any ``transformers.get_scheduler`` name (linear, cosine, constant, ...).
        warmup_ratio: warm-up steps as a fraction of the training steps.
        warmup_steps: warm-up steps; overrides ``warmup_ratio`` when set.
    """

    def __init__(
        self,
        *,
        lr: Positive = 5e-5,
        weight_decay: NonNegative = 0.01,
        betas: tuple[Probability, Probability] = (0.9, 0.999),
        eps: Positive = 1e-8,
        scheduler: Literal[tuple(t.value for t in SchedulerType)] = "linear",
        warmup_ratio: Probability = 0.1,
        warmup_steps: NonNegativeInt | None = None,
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.scheduler = scheduler
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps

    def configure(
        self, named_parameters: Sequence[tuple[str, nn.Parameter]], total_steps: int
    ) -> dict:
        """What a LightningModule's ``configure_optimizers`` returns: the optimizer over
        ``named_parameters`` and its per-step schedule over ``total_steps``."""
        decay, plain = [], []
        for _, param in named_parameters:
            (plain if param.dim() < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": plain, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
        )
        warmup = (
            self.warmup_steps
            if self.warmup_steps is not None
            else round(self.warmup_ratio * total_steps)
        )
        scheduler = get_scheduler(
            self.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
