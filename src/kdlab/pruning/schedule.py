"""Pruning schedules: the fraction of each structure kept after ``step`` training steps.

Cubic (Zhu & Gupta 2017, as used by PLATON and HomoDistil), with ``t_i`` initial and
``t_f`` final warm-up steps out of ``T``::

    r(t) = 1                                                    t ≤ t_i
    r(t) = r_T + (1 − r_T) · (1 − (t − t_i) / (T − t_i − t_f))³   t_i < t ≤ T − t_f
    r(t) = r_T                                                  t > T − t_f

One-shot (the ablation HomoDistil compares against): 1 before ``t_i``, ``r_T`` from then on.
"""

from collections.abc import Callable


def cubic_remaining(step: int, total: int, initial: int, final: int, target: float) -> float:
    """Remaining fraction of the cubic schedule (see module docstring)."""
    span = total - initial - final
    if step <= initial:
        return 1.0
    if step > total - final or span <= 0:
        return target
    return target + (1.0 - target) * (1.0 - (step - initial) / span) ** 3


def oneshot_remaining(step: int, total: int, initial: int, final: int, target: float) -> float:
    """Remaining fraction of one-shot pruning at step ``initial`` (``final`` is unused)."""
    return 1.0 if step < initial else target


SCHEDULES: dict[str, Callable[[int, int, int, int, float], float]] = {
    "cubic": cubic_remaining,
    "oneshot": oneshot_remaining,
}
