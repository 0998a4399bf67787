"""Tables and the discrepancy figure of `experiment=homodistil_claim` from its run directory.

Usage: python experiments/homodistil/report.py <pipeline dir> [--out DIR]
Prints Markdown tables and writes results.md and discrepancy.png to DIR (default: next to
this file).
"""

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdlab.rundir import RunDir  # noqa: E402

HERE = Path(__file__).parent
# Distillation stages: (stage, label, colour of its curve).
STUDENTS = [
    ("homo_cubic", "HomoDistil (teacher copy, cubic schedule)", "C0"),
    ("homo_oneshot", "teacher copy, one-shot pruning at t_i", "C3"),
    ("random_init", "random init, same shape and distillation", "C2"),
]
# Fine-tuning families: (stage prefix, label).
FINETUNED = [
    ("ft_cubic", "HomoDistil (cubic)"),
    ("ft_oneshot", "one-shot pruning"),
    ("ft_random", "random init"),
    ("ft_teacher", "MiniLM itself (reference, 22.7M)"),
]


def load(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def distillation_table(root: Path) -> list[str]:
    lines = [
        "| stage | val perplexity | parameters | KL at start / max / end | "
        "mean KL while pruning | wall time |",
        "|---|---|---|---|---|---|",
    ]
    teacher = load(RunDir(root / "mlm_head").metrics)
    if teacher:
        s = teacher["student"]
        lines.append(
            f"| teacher: MiniLM, MLM head trained on the frozen encoder | "
            f"{s['val/perplexity']:.1f} | {s['params'] / 1e6:.2f}M | | | "
            f"{teacher['wall_time_s'] / 60:.0f} min |"
        )
    for stage, label, _ in STUDENTS:
        metrics = load(RunDir(root / stage).metrics)
        history = load(RunDir(root / stage).pruning_history) or []
        if metrics is None:
            lines.append(f"| {label} | not run | | | | |")
            continue
        kl = [r["kl"] for r in history if r["kl"] is not None]
        pruning = [
            r["kl"] for r in history if r["kl"] is not None and r["step"] > 0 and r["remaining"] < 1
        ]
        s = metrics["student"]
        curve = f"{kl[0]:.3f} / {max(kl):.3f} / {kl[-1]:.3f}" if kl else ""
        mean = f"{statistics.mean(pruning):.3f}" if pruning else ""
        lines.append(
            f"| {label} | {s['val/perplexity']:.1f} | {s['params'] / 1e6:.2f}M | {curve} | "
            f"{mean} | {metrics['wall_time_s'] / 60:.0f} min |"
        )
    return lines


def finetuning_table(root: Path) -> list[str]:
    lines = ["| student | SST-2 dev accuracy (mean ± std) | n | parameters |", "|---|---|---|---|"]
    for prefix, label in FINETUNED:
        runs = [load(RunDir(p).metrics) for p in sorted(root.glob(f"{prefix}_s*"))]
        accs = [m["student"]["val/accuracy"] for m in runs if m]
        if not accs:
            lines.append(f"| {label} | not run | 0 | |")
            continue
        std = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        params = next(m for m in runs if m)["student"]["params"]
        seeds = ", ".join(f"{a:.3f}" for a in accs)
        lines.append(
            f"| {label} | {statistics.mean(accs):.3f}{std} ({seeds}) | {len(accs)} | "
            f"{params / 1e6:.2f}M |"
        )
    return lines


def plot(root: Path, path: Path) -> None:
    fig, left = plt.subplots(figsize=(7, 4))
    right = left.twinx()
    for stage, label, color in STUDENTS:
        history = load(RunDir(root / stage).pruning_history)
        if not history:
            continue
        rows = [r for r in history if r["kl"] is not None]
        left.plot([r["step"] for r in rows], [r["kl"] for r in rows], f"{color}-", label=label)
        right.plot([r["step"] for r in history], [r["remaining"] for r in history], f"{color}:")
    left.set_xlabel("training step")
    left.set_ylabel("KL(teacher ‖ student), fixed held-out batch")
    left.set_yscale("log")
    right.set_ylabel("remaining parameter fraction (dotted)")
    right.set_ylim(0, 1.05)
    left.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="the pipeline's run directory")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    text = "\n".join([*distillation_table(args.root), "", *finetuning_table(args.root)]) + "\n"
    print(text)  # noqa: T201 (a script's report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    plot(args.root, args.out / "discrepancy.png")


if __name__ == "__main__":
    main()
