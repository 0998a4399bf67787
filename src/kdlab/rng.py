"""Random-generator states stored in checkpoints, so a resumed run draws what an
uninterrupted one would (dropout masks, masked-LM masking; MixKD draws from generators of
its own, seeded by the batch position).

Every DDP rank draws from generators of its own: its CPU generators and its device's CUDA
generator. Lightning writes checkpoints from rank 0 alone, so the states of all ranks are
gathered into the checkpoint (a list indexed by global rank), and each rank of the resumed
run restores its own entry. States are kept as tensors and plain Python values so that
checkpoints load with ``torch.load(weights_only=True)``.
"""

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def collect_rng_states() -> dict:
    """This process's states: Python's, NumPy's, torch's CPU generator and the CUDA generator
    of the current device (None where CUDA is not in use)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        # Lightning makes the rank's own GPU the current device before it fits.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def gather_rng_states() -> list[dict]:
    """Every rank's :func:`collect_rng_states`, indexed by global rank (this process's alone
    without a process group). A collective: every rank of the group must call it.
    """
    states = collect_rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [states]
    gathered: list = [None] * dist.get_world_size()
    # Under NCCL the pickled states travel as tensors on the current CUDA device, the rank's
    # own (see collect_rng_states); under gloo on the CPU.
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(states: list[dict], rank: int) -> None:
    """Restore global rank ``rank``'s entry of what :func:`gather_rng_states` returned.

    A rank with no entry (the run resumes on more processes than saved the checkpoint, or
    from a checkpoint without states) keeps its generators as the run seeded them, and a
    warning says so: its random draws then differ from an uninterrupted run's.
    """
    if rank >= len(states):
        log.warning(
            "The checkpoint holds the random-generator states of %d rank(s), none for rank %d: "
            "its generators stay as this run seeded them, so its dropout masks (and other "
            "random draws) differ from an uninterrupted run's.",
            len(states),
            rank,
        )
        return
    state = states[rank]
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device, the rank's own


def _as_tuples(value):
    # Checkpoint round trips may turn tuples into lists; random.setstate wants tuples.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
