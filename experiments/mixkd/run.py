"""MixKD limited-data experiment: MiniLM teachers, bert3 students, finetune / kd / mixkd.

1. Fine-tune the MiniLM teacher on each task (``method=finetune model=minilm``).
2. Train ``bert3`` students (first 3 layers of that teacher) with each method on 1 %, 10 %
   and 100 % of the training set: the same subset (``task.subset_seed``), the same number
   of steps, batch size, learning rate and seeds for every method; dev accuracy is taken
   once, at the last step (no checkpoint picking on the dev set).
3. Aggregate dev accuracy (mean ± std over seeds) and the median training step time of each
   method relative to ``kd`` into ``results.md``.

A run whose ``metrics.json`` exists is skipped, so the script resumes where it stopped and
more seeds can be added later (``--seeds 1 2 3``). Usage::

    KDLAB_DATA_DIR=/path/to/glue python experiments/mixkd/run.py --jobs 2 --seeds 1
    python experiments/mixkd/run.py --aggregate-only
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

HERE = Path(__file__).resolve().parent
OUT = HERE / "outputs"
TASKS = {
    # max_seq_length, teacher steps / batch size / learning rate
    "sst2": {"seq": 64, "teacher_steps": 50, "teacher_batch": 32, "teacher_lr": 1e-4},
    "rte": {"seq": 128, "teacher_steps": 60, "teacher_batch": 16, "teacher_lr": 1e-4},
}
FRACTIONS = (0.01, 0.1, 1.0)
METHODS = ("finetune", "kd", "mixkd")
COMMON = [
    "logger=csv",
    "callbacks=quiet",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.max_epochs=-1",
    "trainer.check_val_every_n_epoch=null",
    "trainer.log_every_n_steps=5",
    "eval.speed_batches=0",
]


def teacher_command(task: str) -> tuple[Path, list[str]]:
    spec = TASKS[task]
    run_dir = OUT / f"teacher-{task}"
    steps = spec["teacher_steps"]
    return run_dir, [
        "method=finetune",
        "model=minilm",
        f"task={task}",
        f"task.max_seq_length={spec['seq']}",
        f"task.batch_size={spec['teacher_batch']}",
        f"optim.lr={spec['teacher_lr']}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "seed=1",
        *COMMON,
        f"hydra.run.dir={run_dir}",
    ]


def student_command(
    task: str, fraction: float, method: str, seed: int, steps: int, batch: int, lr: float
) -> tuple[Path, list[str]]:
    run_dir = OUT / task / f"frac{fraction:g}" / f"{method}-seed{seed}"
    teacher = OUT / f"teacher-{task}" / "student"
    return run_dir, [
        f"method={method}",
        "model=bert3",
        "teacher=local",
        f"teacher.path={teacher}",
        f"task={task}",
        f"task.max_seq_length={TASKS[task]['seq']}",
        f"task.batch_size={batch}",
        f"task.train_fraction={fraction}",
        f"optim.lr={lr}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "+callbacks.step_timer._target_=kdlab.callbacks.StepTimer",
        *COMMON,
        f"hydra.run.dir={run_dir}",
    ]


def launch(run_dir: Path, overrides: list[str], threads: int) -> None:
    if (run_dir / "metrics.json").is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    # On a loaded machine, multi-threaded kernels of small models spend most of their time
    # waiting for each other: one thread per run is faster.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "kdlab.train", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )


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
    lines = [
        "| task | data | teacher | method | dev accuracy | seeds | step time vs kd |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, fraction in itertools.product(TASKS, FRACTIONS):
        teacher_metrics = OUT / f"teacher-{task}" / "metrics.json"
        teacher_acc = (
            json.loads(teacher_metrics.read_text())["student"]["val/accuracy"]
            if teacher_metrics.is_file()
            else None
        )
        times: dict[str, list[float]] = {}
        accs: dict[str, list[float]] = {}
        for method, seed in itertools.product(METHODS, seeds):
            run_dir = OUT / task / f"frac{fraction:g}" / f"{method}-seed{seed}"
            metrics = run_dir / "metrics.json"
            if not metrics.is_file():
                continue
            accs.setdefault(method, []).append(
                json.loads(metrics.read_text())["student"]["val/accuracy"]
            )
            step = median_step_time(run_dir)
            if step is not None:
                times.setdefault(method, []).append(step)
        kd_time = statistics.mean(times["kd"]) if times.get("kd") else None
        for method in METHODS:
            if method not in accs:
                continue
            values = accs[method]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            rel = (
                f"{statistics.mean(times[method]) / kd_time:.2f}×"
                if kd_time and times.get(method)
                else "-"
            )
            teacher = f"{teacher_acc:.3f}" if teacher_acc is not None else "-"
            lines.append(
                f"| {task} | {fraction:.0%} | {teacher} | {method} | "
                f"{statistics.mean(values):.3f} ± {std:.3f} | {len(values)} | {rel} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=40, help="training steps of every student")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()

    if not args.aggregate_only:
        if "KDLAB_DATA_DIR" not in os.environ:
            parser.error("set KDLAB_DATA_DIR to the GLUE root (with SST-2/ and RTE/).")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda t: launch(*teacher_command(t), args.threads), args.tasks))
            # Seed-major order: every cell gets its first seed before any gets a second.
            runs = [
                student_command(t, f, m, s, args.steps, args.batch_size, args.lr)
                for s, t, f, m in itertools.product(args.seeds, args.tasks, args.fractions, METHODS)
            ]
            list(pool.map(lambda r: launch(*r, args.threads), runs))
    table = aggregate(args.seeds)
    (HERE / "results.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
