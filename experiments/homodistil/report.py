"""Table and discrepancy figure of the HomoDistil experiment from its run directories.

Usage: python experiments/homodistil/report.py [runs/homodistil]
Prints a Markdown table and writes discrepancy.png next to this file.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdlab.rundir import RunDir  # noqa: E402

HERE = Path(__file__).parent
ROWS = [
    ("ft_teacher", "MiniLM-L6 (reference, fine-tuned)"),
    ("ft_homo", "HomoDistil half width → fine-tuned"),
    ("ft_oneshot", "one-shot pruning, same budget → fine-tuned"),
    ("ft_bert3", "BERT3 (first 3 MiniLM layers) fine-tuned"),
]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/homodistil")
    print("| student | SST-2 dev accuracy | parameters | CPU speed-up vs MiniLM |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for run, label in ROWS:
        metrics = load(RunDir(root / run).metrics)
        if metrics is None:
            print(f"| {label} | not run | | |")  # noqa: T201
            continue
        s = metrics["student"]
        speed = metrics.get("inference", {}).get("speedup")
        speed = f"{speed:.2f}×" if speed else "—"
        print(f"| {label} | {s['val/accuracy']:.3f} | {s['params'] / 1e6:.2f}M | {speed} |")  # noqa: T201
    for run in ("mlm", "homo", "oneshot"):
        metrics = load(RunDir(root / run).metrics)
        if metrics:
            s = metrics["student"]
            print(  # noqa: T201
                f"{run}: val/perplexity {s['val/perplexity']:.1f}, params {s['params']:,}, "
                f"inference {metrics.get('inference')}"
            )
    fig, left = plt.subplots(figsize=(6.5, 3.8))
    right = left.twinx()
    for run, color in (("homo", "C0"), ("oneshot", "C3")):
        history = load(RunDir(root / run).pruning_history)
        if not history:
            continue
        rows = [r for r in history if r["kl"] is not None]
        left.plot(
            [r["step"] for r in rows],
            [r["kl"] for r in rows],
            f"{color}-o",
            ms=3,
            label=f"KL, {'cubic (HomoDistil)' if run == 'homo' else 'one-shot'}",
        )
        right.plot([r["step"] for r in history], [r["remaining"] for r in history], f"{color}--")
    left.set_xlabel("training step")
    left.set_ylabel("KL(teacher ‖ student), held-out batch")
    right.set_ylabel("remaining parameter fraction (dashed)")
    right.set_ylim(0, 1.05)
    left.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(HERE / "discrepancy.png", dpi=120)


if __name__ == "__main__":
    main()
