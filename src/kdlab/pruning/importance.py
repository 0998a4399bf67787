"""PLATON importance scores (Zhang et al., "PLATON: Pruning Large Transformer Models with
Upper Confidence Bound of Weight Importance", ICML 2022).

Per parameter, at each step t::

    s(t) = |θ ⊙ ∇θ L|                       sensitivity
    Ī(t) = β1·Ī(t−1) + (1 − β1)·s(t)          smoothed importance
    Ū(t) = β2·Ū(t−1) + (1 − β2)·|s(t) − Ī(t)|  uncertainty
    score = Ī(t) · Ū(t)

With β2 = 1 the uncertainty never leaves zero, so the score falls back to Ī alone (plain
smoothed sensitivity).
"""

import torch
from torch import Tensor, nn


class PlatonImportance:
    """Exponential moving averages of sensitivity and its uncertainty, per parameter.

    Args:
        beta1: EMA factor of the sensitivity ``Ī``.
        beta2: EMA factor of the uncertainty ``Ū``; 1 switches the uncertainty off.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.sensitivity: dict[str, Tensor] = {}
        self.uncertainty: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, named_parameters: list[tuple[str, nn.Parameter]]) -> None:
        """One EMA step from the current gradients (parameters without one are skipped)."""
        for name, param in named_parameters:
            if param.grad is None:
                continue
            # In-place steps and one temporary per parameter: this runs every training step
            # over the whole model, so memory passes are what it costs.
            s = torch.mul(param.detach(), param.grad.detach()).abs_()
            if name not in self.sensitivity:
                self.sensitivity[name] = torch.zeros_like(s)
                self.uncertainty[name] = torch.zeros_like(s)
            ema_i = self.sensitivity[name].lerp_(s, 1 - self.beta1)
            self.uncertainty[name].lerp_(s.sub_(ema_i).abs_(), 1 - self.beta2)

    def score(self, name: str) -> Tensor | None:
        """``Ī · Ū`` of one parameter (``Ī`` alone when ``β2 = 1``), or None before any update."""
        if name not in self.sensitivity:
            return None
        if self.beta2 == 1.0:
            return self.sensitivity[name]
        return self.sensitivity[name] * self.uncertainty[name]

    def apply(self, fn) -> None:
        """Apply ``fn`` (e.g. a device move) to every average."""
        self.sensitivity = {k: fn(v) for k, v in self.sensitivity.items()}
        self.uncertainty = {k: fn(v) for k, v in self.uncertainty.items()}

    def state_dict(self) -> dict:
        return {"sensitivity": self.sensitivity, "uncertainty": self.uncertainty}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sensitivity = {k: v.to(device) for k, v in state["sensitivity"].items()}
        self.uncertainty = {k: v.to(device) for k, v in state["uncertainty"].items()}
