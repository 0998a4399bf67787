"""The discrepancy curve of a pruning run (HomoDistil's Figure 2): KL(teacher ‖ student) on
a fixed held-out batch and the remaining parameter fraction against training steps."""

import json
from pathlib import Path

from kdlab.rundir import RunDir


def write_history(history: list[dict], directory: Path) -> Path:
    """``pruning_history.json`` and ``pruning_history.png`` in ``directory``; returns the PNG."""
    run_dir = RunDir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run_dir.pruning_history.write_text(json.dumps(history, indent=2))
    # Imported here: plotting is needed once per run, and the backend must be non-interactive
    # on machines without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, left = plt.subplots(figsize=(6, 3.5))
    kl_rows = [r for r in history if r["kl"] is not None]
    left.plot([r["step"] for r in kl_rows], [r["kl"] for r in kl_rows], "C0-o", ms=3)
    left.set_xlabel("training step")
    left.set_ylabel("KL(teacher ‖ student)", color="C0")
    right = left.twinx()
    right.plot(steps, [r["remaining"] for r in history], "C1--")
    right.set_ylabel("remaining parameter fraction", color="C1")
    right.set_ylim(0, 1.05)
    fig.tight_layout()
    path = run_dir.pruning_plot
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
