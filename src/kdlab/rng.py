"""Random-generator states stored in checkpoints, so a resumed run draws what an
uninterrupted one would (dropout masks, masking, mixup coefficients).

States are kept as tensors and plain Python values so that checkpoints load with
``torch.load(weights_only=True)``.
"""

import random

import numpy as np
import torch


def collect_rng_states() -> dict:
    """The states of Python's, NumPy's, torch's CPU and CUDA generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    random.setstate(_as_tuples(states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value):
    # Checkpoint round trips may turn tuples into lists; random.setstate wants tuples.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
