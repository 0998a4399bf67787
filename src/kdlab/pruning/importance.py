"""PLATON importance scores (Zhang et al., "PLATON: Pruning Large Transformer Models with
Upper Confidence Bound of Weight Importance", ICML 2022).

Per parameter, at each step t::

    s(t) = |θ ⊙ ∇θ L|                       sensitivity
    Ī(t) = β1·Ī(t−1) + (1 − β1)·s(t)          smoothed importance
    Ū(t) = β2·Ū(t−1) + (1 − β2)·|s(t) − Ī(t)|  uncertainty
    score = Ī(t) · Ū(t)

With β2 = 1 the uncertainty never leaves zero, so the score falls back to Ī alone (plain
smoothed sensitivity).

Two ways of feeding the EMAs:

- per step (the default, the formula above as the paper writes it): every training step
  updates Ī and Ū with that step's s(t);
- windowed (``window=True``, what the PLATON authors' code does): the sensitivity is
  averaged over the ΔT steps between two mask updates, and Ī and Ū are updated once per
  window from that mean, s̄ = (1/ΔT)·Σ s(t). Ī then smooths over windows rather than steps
  (β1 = 0.85 remembers ~7 windows instead of ~7 steps), and Ū measures how much the window
  means vary, which is less noisy than the per-step |s(t) − Ī(t)|. It costs one more
  fp32 tensor per parameter (the running window sum).

The EMAs are fp32 whatever the parameters' dtype.
"""

import torch
from torch import Tensor, nn


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    One sum per tensor, accumulated in fp32, and one host sync for the whole list: a sum is
    NaN or infinite exactly when an entry is (inf − inf is NaN), or when finite entries
    add up beyond fp32's range (~3.4e38), where skipping the update is as right. A sum
    reads each entry once at full vector speed; a max-|x| (``_foreach_norm(ord=inf)``)
    costs ~80× more per entry on CPU, which on MiniLM made this check most of the update.
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return bool(sums.sum().isfinite())


# Entries per block of the CPU update: the block's slices of θ, ∇θ, Ī, Ū and the fp32
# sensitivity buffer (5 × 256 KiB) stay in a core's L2 cache between the update's element-wise
# passes, so main memory sees each tensor read once and Ī, Ū written once. On a GPU a
# parameter is one block (the passes are bandwidth-cheap there, kernel launches are not).
CPU_BLOCK = 65536


def _blocks(param: nn.Parameter):
    """``(start, stop)`` of the blocks a parameter's flattened entries are updated in."""
    size = param.numel()
    step = CPU_BLOCK if param.device.type == "cpu" else max(size, 1)
    return ((start, min(start + step, size)) for start in range(0, size, step))


def _sensitivity_into(out: Tensor, theta: Tensor, grad: Tensor) -> Tensor:
    """``|θ ⊙ ∇θ L|`` in fp32, written into ``out`` (a flat fp32 buffer of their size)."""
    if theta.dtype == torch.float32 and grad.dtype == torch.float32:
        return torch.mul(theta, grad, out=out).abs_()
    return out.copy_(theta).mul_(grad).abs_()


class PlatonImportance:
    """Exponential moving averages of sensitivity and its uncertainty, per parameter.

    Args:
        beta1: EMA factor of the sensitivity ``Ī``.
        beta2: EMA factor of the uncertainty ``Ū``; 1 switches the uncertainty off.
        window: average the sensitivity over a window of steps and update the EMAs once per
            window (:meth:`end_window`), instead of at every step (see module docstring).
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95, window: bool = False) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.window = window
        self.sensitivity: dict[str, Tensor] = {}
        self.uncertainty: dict[str, Tensor] = {}
        # Window mode: Σ s(t) over the open window and the number of steps summed, per
        # parameter (a parameter without a gradient in some step has fewer).
        self.window_sum: dict[str, Tensor] = {}
        self.window_steps: dict[str, int] = {}

    @torch.no_grad()
    def update(self, named_parameters: list[tuple[str, nn.Parameter]]) -> None:
        """One step from the current gradients (parameters without one are skipped): an
        EMA step, or in window mode one more term of the window's sum."""
        # This runs every training step over the whole model: memory passes are what it
        # costs, so each parameter is updated in place, block by block (CPU_BLOCK).
        buffer = None
        for name, param in named_parameters:
            if param.grad is None:
                continue
            if name not in self.sensitivity and not self.window:
                self._start(name, param)
            opened = self.window and name not in self.window_sum
            if opened:
                self.window_sum[name] = param.new_zeros(param.shape, dtype=torch.float32)
                self.window_steps[name] = 0
            theta, grad = param.detach().reshape(-1), param.grad.detach().reshape(-1)
            for start, stop in _blocks(param):
                if buffer is None or buffer.numel() < stop - start or buffer.device != theta.device:
                    buffer = theta.new_empty(stop - start, dtype=torch.float32)
                s = _sensitivity_into(buffer[: stop - start], theta[start:stop], grad[start:stop])
                if self.window:
                    self.window_sum[name].view(-1)[start:stop].add_(s)
                else:
                    self._ema_step(name, s, start, stop)
            if self.window:
                self.window_steps[name] += 1

    @torch.no_grad()
    def end_window(self) -> None:
        """Window mode: one EMA step from the window's mean sensitivity, then open a new
        window. Nothing happens per step, or when no step was summed since the last call."""
        for name, total in self.window_sum.items():
            if name not in self.sensitivity:
                self._start(name, total)
            self._ema_step(name, total.div_(self.window_steps[name]).view(-1), 0, total.numel())
        self.window_sum, self.window_steps = {}, {}

    def _start(self, name: str, like: Tensor) -> None:
        self.sensitivity[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        self.uncertainty[name] = torch.zeros_like(self.sensitivity[name])

    def _ema_step(self, name: str, s: Tensor, start: int, stop: int) -> None:
        """``Ī ← β1·Ī + (1−β1)·s`` then ``Ū ← β2·Ū + (1−β2)·|s − Ī|`` on the flattened
        entries ``start:stop`` of one parameter; overwrites ``s`` (those entries, flat)."""
        ema_i = self.sensitivity[name].view(-1)[start:stop].lerp_(s, 1 - self.beta1)
        self.uncertainty[name].view(-1)[start:stop].lerp_(s.sub_(ema_i).abs_(), 1 - self.beta2)

    def score(self, name: str) -> Tensor | None:
        """``Ī · Ū`` of one parameter (``Ī`` alone when ``β2 = 1``), or None before any update."""
        if name not in self.sensitivity:
            return None
        if self.beta2 == 1.0:
            return self.sensitivity[name]
        return self.sensitivity[name] * self.uncertainty[name]

    def apply(self, fn) -> None:
        """Apply ``fn`` (e.g. a device move) to every average and the open window's sums."""
        self.sensitivity = {k: fn(v) for k, v in self.sensitivity.items()}
        self.uncertainty = {k: fn(v) for k, v in self.uncertainty.items()}
        self.window_sum = {k: fn(v) for k, v in self.window_sum.items()}

    def state_dict(self) -> dict:
        return {
            "sensitivity": self.sensitivity,
            "uncertainty": self.uncertainty,
            "window_sum": self.window_sum,
            "window_steps": self.window_steps,
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict` on ``device`` (checkpoints without the window keys,
        from before window mode existed, load with an empty window)."""

        def to_device(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, torch.float32) for k, v in tensors.items()}

        self.sensitivity = to_device(state["sensitivity"])
        self.uncertainty = to_device(state["uncertainty"])
        self.window_sum = to_device(state.get("window_sum", {}))
        self.window_steps = dict(state.get("window_steps", {}))
