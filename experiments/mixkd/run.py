"""MixKD limited-data experiment: MiniLM teachers, bert3 students, finetune / kd / mixkd
(and mixkd with kd's teacher term, ``mixkd_kd``).

1. Fine-tune the MiniLM teacher on each task (``method=finetune model=minilm``).
2. Train ``bert3`` students (first 3 layers of that teacher) with each method on 1 %, 10 %
   and 100 % of the training set: the same subset (``task.subset_seed``), the same number
   of steps, batch size, learning rate and seeds for every method; dev accuracy is taken
   once, at the last step (no checkpoint picking on the dev set).
3. Aggregate dev accuracy (mean ± std over seeds) and the median training step time of each
   method relative to ``kd`` into ``results.md``.

A run whose ``metrics.json`` exists is skipped, so the script resumes where it stopped and
more seeds can be added later (``--seeds 1 2 3``). Usage::

    KDLAB_DATA_DIR=/path/to/glue python experiments/mixkd/run.py --jobs 2 --seeds 1 2 3
    python experiments/mixkd/run.py --aggregate-only --seeds 1 2 3
"""

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdlab.rundir import RunDir

HERE = Path(__file__).resolve().parent
OUT = HERE / "outputs"
TASKS = {
    # Teachers: MiniLM fine-tuned for whole epochs (the best epoch on dev is kept, as is
    # usual for GLUE teachers); SST-2 on a 20,000-sentence subset, which reaches 0.88.
    # Students: the same optimizer steps for every method and data fraction; RTE's pairs are
    # about four times longer than SST-2's sentences, so it gets fewer steps on 2 CPU cores.
    "sst2": {
        "seq": 64,
        "teacher_samples": 20000,
        "teacher_epochs": 1,
        "teacher_batch": 32,
        "teacher_lr": 1e-4,
        "student_steps": 200,
    },
    "rte": {
        "seq": 128,
        "teacher_samples": None,
        "teacher_epochs": 5,
        "teacher_batch": 16,
        "teacher_lr": 5e-5,
        "student_steps": 100,
    },
}
FRACTIONS = (0.01, 0.1, 1.0)
# Run name -> method overrides. ``mixkd_kd`` adds kd's teacher term on the original examples
# (``method.kd_alpha``), so that it differs from ``kd`` by the mixup terms alone.
METHODS = {
    "finetune": ["method=finetune"],
    "kd": ["method=kd"],
    "mixkd": ["method=mixkd"],
    "mixkd_kd": ["method=mixkd", "method.kd_alpha=0.5"],
}
COMMON = [
    "logger=csv",
    "callbacks=quiet",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=5",
    "eval.speed_batches=0",
]
# Students train for a fixed number of optimizer steps whatever the data fraction.
STEP_BUDGET = ["trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=null"]


def teacher_command(task: str) -> tuple[Path, list[str]]:
    spec = TASKS[task]
    run_dir = OUT / f"teacher-{task}"
    subset = spec["teacher_samples"]
    return run_dir, [
        "method=finetune",
        "model=minilm",
        f"task={task}",
        f"task.max_seq_length={spec['seq']}",
        f"task.batch_size={spec['teacher_batch']}",
        *([f"task.max_train_samples={subset}"] if subset else []),
        f"optim.lr={spec['teacher_lr']}",
        f"trainer.max_epochs={spec['teacher_epochs']}",
        "seed=1",
        *COMMON,
        f"hydra.run.dir={run_dir}",
    ]


def student_dir(task: str, fraction: float, method: str, seed: int, grouped: bool) -> Path:
    """Runs on length-grouped batches (``task.group_by_length``) live under ``grouped/``."""
    return (
        OUT / ("grouped" if grouped else "") / task / f"frac{fraction:g}" / f"{method}-seed{seed}"
    )


def student_command(
    task: str,
    fraction: float,
    method: str,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    grouped: bool = False,
) -> tuple[Path, list[str]]:
    run_dir = student_dir(task, fraction, method, seed, grouped)
    teacher = RunDir(OUT / f"teacher-{task}").student
    return run_dir, [
        *METHODS[method],
        "model=bert3",
        "teacher=local",
        f"teacher.path={teacher}",
        f"task={task}",
        f"task.max_seq_length={TASKS[task]['seq']}",
        f"task.batch_size={batch}",
        f"task.train_fraction={fraction}",
        f"task.group_by_length={str(grouped).lower()}",
        f"optim.lr={lr}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        *COMMON,
        *STEP_BUDGET,
        f"hydra.run.dir={run_dir}",
    ]


def launch(run_dir: Path, overrides: list[str], threads: int) -> None:
    if RunDir(run_dir).finished:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    # The lock lets several run.py processes share the runs (one per free core). A killed
    # run.py (SIGTERM or SIGKILL) leaves its lock behind: delete it to retry that run.
    lock = run_dir / "running.lock"
    try:
        lock.touch(exist_ok=False)
    except FileExistsError:
        return
    # On a loaded machine, multi-threaded kernels of small models spend most of their time
    # waiting for each other: one thread per run is faster.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        with open(run_dir / "train.log", "w") as log:
            subprocess.run(
                [sys.executable, "-m", "kdlab.train", *overrides],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
    finally:
        lock.unlink()


def median_step_time(run_dir: Path, skip: int = 2) -> float | None:
    """Median of ``train/step_time_s`` over the logged steps, without the first ``skip``."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        times = [
            float(r["train/step_time_s"]) for r in csv.DictReader(f) if r.get("train/step_time_s")
        ]
    times = times[skip:] or times
    return statistics.median(times) if times else None


def aggregate(seeds: list[int]) -> str:
    """One table per task: dev accuracy (mean ± std over the seeds found, their count in
    brackets) per data fraction and method, and each method's step time relative to kd
    (the median ``train/step_time_s`` of each run, averaged over the task's runs)."""
    sections = []
    for task in TASKS:
        teacher_metrics = RunDir(OUT / f"teacher-{task}").metrics
        teacher = (
            f"{json.loads(teacher_metrics.read_text())['student']['val/accuracy']:.3f}"
            if teacher_metrics.is_file()
            else "not trained"
        )
        lines = [
            f"{task} (teacher dev accuracy {teacher})",
            "",
            f"| data | {' | '.join(METHODS)} |",
            f"|---|{'---|' * len(METHODS)}",
        ]
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for fraction in FRACTIONS:
            cells = []
            for method in METHODS:
                accs = []
                for seed in seeds:
                    run_dir = student_dir(task, fraction, method, seed, grouped=False)
                    metrics = RunDir(run_dir).metrics
                    if not metrics.is_file():
                        continue
                    accs.append(json.loads(metrics.read_text())["student"]["val/accuracy"])
                    step = median_step_time(run_dir)
                    if step is not None:
                        times[method].append(step)
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                cells.append(
                    f"{statistics.mean(accs):.3f} ± {std:.3f} ({len(accs)})" if accs else "-"
                )
            lines.append(f"| {fraction:.0%} | {' | '.join(cells)} |")
        kd_time = statistics.mean(times["kd"]) if times["kd"] else None
        relative = [
            f"{statistics.mean(t) / kd_time:.2f}×" if t and kd_time else "-" for t in times.values()
        ]
        lines.append(f"| step time vs kd | {' | '.join(relative)} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def aggregate_grouping(seeds: list[int], tasks: list[str], methods: list[str]) -> str:
    """Random against length-grouped batches, full training sets: dev accuracy (mean ± std
    over the seeds found) and the grouped/random ratios of the median step time and of the
    median run wall time (training, evaluation and start-up; the median leaves out the one
    run that built the teacher-output cache, which the others reuse)."""
    lines = [
        "| task | method | random batches | grouped batches | step time grouped/random "
        "| run time grouped/random |",
        "|---|---|---|---|---|---|",
    ]
    for task, method in itertools.product(tasks, methods):
        cells, steps, walls = [], {}, {}
        for grouped in (False, True):
            accs, step, wall = [], [], []
            for seed in seeds:
                run_dir = student_dir(task, 1.0, method, seed, grouped)
                if not RunDir(run_dir).finished:
                    continue
                metrics = json.loads(RunDir(run_dir).metrics.read_text())
                accs.append(metrics["student"]["val/accuracy"])
                wall.append(metrics["wall_time_s"])
                if (median := median_step_time(run_dir)) is not None:
                    step.append(median)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.3f} ± {std:.3f} ({len(accs)})" if accs else "-")
            steps[grouped] = statistics.mean(step) if step else None
            walls[grouped] = statistics.median(wall) if wall else None
        ratios = [
            f"{d[True] / d[False]:.2f}×" if d[True] and d[False] else "-" for d in (steps, walls)
        ]
        lines.append(f"| {task} | {method} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--steps", type=int, help="training steps of every student (default: the task's)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument(
        "--group-by-length",
        choices=["off", "both"],
        default="off",
        help="both: every student run also on length-grouped batches (under outputs/grouped/), "
        "and grouping.md compares the two on the full training sets",
    )
    args = parser.parse_args()
    arms = [False, True] if args.group_by_length == "both" else [False]

    if not args.aggregate_only:
        if "KDLAB_DATA_DIR" not in os.environ:
            parser.error("set KDLAB_DATA_DIR to the GLUE root (with SST-2/ and RTE/).")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda t: launch(*teacher_command(t), args.threads), args.tasks))
            # Seed-major order: every cell gets its first seed before any gets a second.
            runs = [
                student_command(
                    t, f, m, s, args.steps or TASKS[t]["student_steps"], args.batch_size, args.lr, g
                )
                for s, t, f, m, g in itertools.product(
                    args.seeds, args.tasks, args.fractions, args.methods, arms
                )
            ]
            list(pool.map(lambda r: launch(*r, args.threads), runs))
    if args.group_by_length == "both":
        table = aggregate_grouping(args.seeds, args.tasks, args.methods)
        (HERE / "grouping.md").write_text(table)
    else:
        table = aggregate(args.seeds)
        (HERE / "results.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
