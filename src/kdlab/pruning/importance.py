"""PLATON importance scores (Zhang et al., "PLATON: Pruning Large Transformer Models with
Upper Confidence Bound of Weight Importance", ICML 2022).

Per parameter, at each step t::

    s(t) = |θ ⊙ ∇θ L|                       sensitivity
    Ī(t) = β1·Ī(t−1) + (1 − β1)·s(t)          smoothed importance
    Ū(t) = β2·Ū(t−1) + (1 − β2)·|s(t) − Ī(t)|  uncertainty
    score = Ī(t) · Ū(t)

With β2 = 1 the uncertainty never leaves zero, so the score falls back to Ī alone (plain
smoothed sensitivity).

The EMAs are fp32 whatever the parameters' dtype.
"""

import torch
from torch import Tensor, nn


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    One fused max-|x| per tensor (``torch._foreach_norm`` with ``ord=inf``, which
    propagates NaN and, unlike the 2-norm, cannot overflow on finite values) and one
    host sync for the whole list, rather than one per tensor.
    """
    if not tensors:
        return True
    peaks = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.stack([p.float() for p in peaks]).isfinite().all())


def _sensitivity(param: nn.Parameter) -> Tensor:
    """``|θ ⊙ ∇θ L|`` in fp32, as a new tensor (callers update it in place)."""
    return param.detach().to(torch.float32, copy=True).mul_(param.grad.detach()).abs_()


class PlatonImportance:
    """Exponential moving averages of sensitivity and its uncertainty, per parameter.

    Args:
        beta1: EMA factor of the sensitivity ``Ī``.
        beta2: EMA factor of the uncertainty ``Ū``; 1 switches the uncertainty off.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95) -> None:
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"pruning.{key}={value} must be in [0, 1].")
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
            # One temporary per parameter, updated in place: this runs every training
            # step over the whole model, so memory passes are what it costs.
            self._ema_step(name, _sensitivity(param))

    def _ema_step(self, name: str, s: Tensor) -> None:
        """``Ī ← β1·Ī + (1−β1)·s`` then ``Ū ← β2·Ū + (1−β2)·|s − Ī|``; overwrites ``s``."""
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

    def state_dict(self) -> dict:
        return {
            "sensitivity": self.sensitivity,
            "uncertainty": self.uncertainty,
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict` on ``device``, in fp32."""

        def to_device(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, torch.float32) for k, v in tensors.items()}

        self.sensitivity = to_device(state["sensitivity"])
        self.uncertainty = to_device(state["uncertainty"])
