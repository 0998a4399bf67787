"""GPU benchmark of kdlab's distillation methods and of HomoDistil's pruning, on a
BERT-base-shaped teacher in bf16-mixed: one script, under 10 minutes on one H200.

1. **Methods** (``kd`` and ``mixkd`` into ``bert6``, the teacher's first 6 layers;
   ``homodistil`` with ``pruning=homotopic`` into a teacher copy pruned towards
   HomoBERT-small, ``model=small``): sequences per second, the step time over a reference
   step (teacher forward + student forward and backward on the same batch, run beside each
   step), peak device memory and model FLOPs utilisation.
2. **HomoDistil**: a ``method=homodistil pruning=homotopic`` run of ``--homodistil-steps``
   steps with mask updates, against the same method and batches on a student without masks
   (no importance, no mask updates), fitted before and after it; the final masks are
   compacted and the masked and compacted students' outputs compared in fp32.
3. **Teacher-output cache**: ``kd`` with ``method.cache_teacher=true`` at the run's
   precision: the cache is built when fitting starts, in the trainer's precision context,
   under a key that records the teacher's dtype and autocast dtype; on each step's batch its
   outputs are compared with the live teacher's in that context.

Everything is what a run builds: configs composed from ``conf/`` and checked by
``kdlab.components.validate``, components from ``kdlab.train.assemble`` (the no-pruning
baseline from ``kdlab.components.build``), and each timed step is a step of a real
``lightning.Trainer.fit`` (logger, callbacks, gradient clipping, AdamW and its schedule as
configured). The data are random words of the teacher's vocabulary written as an SST-2
folder and a corpus file in a temporary directory; the teacher has random weights. Nothing
is downloaded. See ``benchmarks/README.md`` for the command and what each figure means.

Usage (from the repository root)::

    PYTHONPATH=src:. python benchmarks/gpu.py --out gpu.json           # one GPU
    PYTHONPATH=src:. python benchmarks/gpu.py --device cpu --tiny      # a CPU smoke test
"""

import os

# The device machine reaches no network: hub look-ups must fail at once, not retry. Set
# before transformers and datasets are imported (they read these at import).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Clock,
    FlopCounter,
    InterleavedTimer,
    Marks,
    first_batches,
    unpruned_method,
    write_random_corpus,
    write_random_sst2,
    write_random_teacher,
)
from kdlab.components import validate  # noqa: E402
from kdlab.losses import task_loss  # noqa: E402
from kdlab.methods import BaseMethod  # noqa: E402
from kdlab.models.build import count_parameters  # noqa: E402
from kdlab.models.heads import model_inputs  # noqa: E402
from kdlab.pruning import Pruner, compacted_copy  # noqa: E402
from kdlab.train import CONF_DIR, assemble, build_trainer  # noqa: E402

# H200 SXM (and H100 SXM) dense bf16 tensor-core peak, by NVIDIA's datasheet.
H200_BF16_DENSE_TFLOPS = 989.0

FLOPS_FORMULA = (
    "model FLOPs of a step = sum over nn.Linear calls of 2*rows*in*out + sum over BERT "
    "self-attention calls of 4*B*T^2*(heads*head_size), each x3 where the call records "
    "gradients (student: forward + backward) and x1 where it does not (teacher under "
    "no_grad); counted by hooks on the first (warm-up) step of each fit. For a BERT encoder "
    "this is 2*(matrix parameters)*tokens + attention; masked-LM heads count at the graded "
    "positions only (kdlab scores them there), a classifier on [CLS]; a pruned student "
    "counts at its full width (masks zero structures, the matrices keep their size). "
    "Embeddings, LayerNorm, softmax, GELU, losses and the optimizer are not counted. "
    "MFU = model FLOPs per step / median step time / peak_tflops."
)


# ------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Scale:
    """Shapes and default budgets of a benchmark run.

    Attributes:
        teacher: ``BertConfig`` shape of the random teacher.
        vocab_size: its vocabulary.
        pruned_student: overrides that pick HomoDistil's pruned student (the head size of
            the target must stay the teacher's).
        batch, seq: training batch size and ``task.max_seq_length``.
        steps, warmup: measured and discarded steps of each method's fit.
        homodistil_steps: training steps of the HomoDistil run (the pruning schedule's T).
        interval: its steps between mask updates (``pruning.update_interval``).
        matmul_size: side of the square bf16 product that measures the matmul ceiling.
    """

    teacher: dict[str, int]
    vocab_size: int
    pruned_student: list[str]
    batch: int
    seq: int
    steps: int
    warmup: int
    homodistil_steps: int
    interval: int
    matmul_size: int


BERT_BASE = Scale(
    teacher=dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    vocab_size=30522,
    pruned_student=["model=small"],  # HomoBERT-small: hidden 256, 4 heads of 64, FFN 1024
    batch=32,
    seq=128,
    steps=50,
    warmup=10,
    homodistil_steps=200,
    interval=10,
    matmul_size=8192,
)
TINY = Scale(
    teacher=dict(
        hidden_size=128, num_hidden_layers=8, num_attention_heads=2, intermediate_size=256
    ),
    vocab_size=1000,
    pruned_student=[  # one head of 64, as the teacher's
        "model=pruned",
        "model.target.hidden_size=64",
        "model.target.num_attention_heads=1",
        "model.target.intermediate_size=128",
    ],
    batch=4,
    seq=16,
    steps=3,
    warmup=1,
    homodistil_steps=6,
    interval=2,
    matmul_size=128,
)

TRAINERS = {"cuda": "gpu", "cpu": "cpu"}  # --device -> the trainer config of that device
# The HomoDistil run's initial and final warm-ups (t_i / T, t_f / T).
WARMUPS = (0.1, 0.3)


@dataclass(frozen=True)
class Inputs:
    """Files the runs read (the teacher, an SST-2 folder, a corpus) and where they write."""

    teacher: Path
    sst2: Path
    corpus: Path
    workdir: Path

    def run_dir(self, name: str) -> Path:
        return self.workdir / "runs" / name


def method_overrides(scale: Scale, inputs: Inputs) -> dict[str, list[str]]:
    """The benchmarked methods and the overrides that pick each (method, student, task)."""
    return {
        # A step with its teacher forward, as the reference: kd would otherwise read the
        # teacher-output cache (benchmarks/teacher_cache.py measures that).
        "kd": [
            "method=kd",
            "method.cache_teacher=false",
            "model=bert6",
            "task=sst2",
            f"task.data_dir={inputs.sst2}",
        ],
        "mixkd": ["method=mixkd", "model=bert6", "task=sst2", f"task.data_dir={inputs.sst2}"],
        # pruning=homotopic is homodistil's default; no teacher-student KL tracking steps.
        "homodistil": [
            "method=homodistil",
            *scale.pruned_student,
            "task=corpus/local",
            f"task.files=[{inputs.corpus}]",
            "pruning.track_interval=0",
        ],
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Scale]:
    """Command-line options (those left unset take the scale's defaults) and the scale."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(TRAINERS), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and a few steps")
    parser.add_argument("--steps", type=int, help="measured steps per method")
    parser.add_argument("--warmup", type=int, help="discarded steps per fit")
    parser.add_argument("--batch", type=int, help="training batch size")
    parser.add_argument("--seq", type=int, help="task.max_seq_length (every batch fills it)")
    parser.add_argument("--homodistil-steps", type=int, help="steps of the HomoDistil run")
    parser.add_argument("--interval", type=int, help="pruning.update_interval")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_DENSE_TFLOPS,
        help="the device's dense peak at the training precision (MFU's denominator)",
    )
    parser.add_argument("--precision", default="bf16-mixed", help="trainer.precision")
    parser.add_argument("--only", choices=["methods", "homodistil"], help="run one part")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="masked vs compacted: max |difference| allowed, times max(1, max |output|)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else BERT_BASE
    for name in ("steps", "warmup", "batch", "seq", "homodistil_steps", "interval"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(scale, name))
    return args, scale


# --------------------------------------------------------------------------- inputs
def write_inputs(directory: Path, args: argparse.Namespace, scale: Scale) -> Inputs:
    """The random teacher, SST-2 rows for every method fit, and a corpus with enough
    chunks for the longest fit."""
    teacher = directory / "teacher"
    words = write_random_teacher(teacher, scale.vocab_size, seed=args.seed, **scale.teacher)
    sst2 = directory / "SST-2"
    write_random_sst2(sst2, words, method_batches(args) * args.batch, args.seq, args.seed)
    # A chunk holds seq - 2 words ([CLS], [SEP]) and 2 % of the chunks are held out for
    # validation: a tenth more lines than the training chunks needed covers both.
    needed = max(method_batches(args), args.homodistil_steps) * args.batch
    corpus = directory / "corpus.txt"
    write_random_corpus(corpus, words, math.ceil(1.1 * needed), args.seq, args.seed)
    return Inputs(teacher, sst2, corpus, directory)


def method_batches(args: argparse.Namespace) -> int:
    """Batches of a method's fit: the warm-up, the measured steps, and one whose start
    closes the last measured step's window."""
    return args.warmup + args.steps + 1


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed and validated ``train`` config."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    validate(cfg)
    return cfg


def run_overrides(args: argparse.Namespace, inputs: Inputs, run_dir: Path, steps: int) -> list[str]:
    """What every benchmarked run shares: the teacher, device and precision, the batch
    shape, a fit of ``steps`` steps without validation, checkpoints or progress bar, and
    the CSV logger with the other default callbacks."""
    return [
        "teacher=local",
        f"teacher.path={inputs.teacher}",
        "teacher.require_trained_head=false",  # random weights: timing only
        f"trainer={TRAINERS[args.device]}",
        f"trainer.precision={args.precision}",
        "logger=csv",
        "callbacks=quiet",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "+trainer.enable_checkpointing=false",
        "+trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=1",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        f"task.batch_size={args.batch}",
        f"task.max_seq_length={args.seq}",
        f"task.cache_dir={inputs.workdir / 'cache'}",
        f"run_dir={run_dir}",
        f"seed={args.seed}",
    ]


# --------------------------------------------------------------------------- device
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes of the most device memory allocated since the last reset (None on the CPU,
    where PyTorch keeps no such count)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_memory(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def release_memory(device: torch.device) -> None:
    """Collect what earlier fits left behind, so the next fit's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def float32_matmuls():
    """Full-precision float32 matrix products (no TF32) within the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """The bf16 matrix-product rate the device reaches on random ``size``² operands
    (median of ``repeats`` after three warm-ups): a measured ceiling beside the datasheet's."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    clock = Clock(device)
    for _ in range(3):
        a @ b
    marks = []
    for _ in range(repeats):
        start = clock.mark()
        a @ b
        marks.append((start, clock.mark()))
    seconds = statistics.median(clock.seconds(*m) for m in marks)
    return 2 * size**3 / seconds / 1e12


def environment(device: torch.device) -> dict:
    """What ran: device, library versions."""
    versions = {
        name: importlib.metadata.version(name)
        for name in ("torch", "lightning", "transformers", "datasets", "hydra-core")
    }
    info = {
        "device": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        **versions,
    }
    return info


# --------------------------------------------------------------------------- timing
class ProbedTimer(InterleavedTimer):
    """:class:`~benchmarks.common.InterleavedTimer` that also reads, per step window,
    the peak device memory, and counts the model FLOPs of the first step."""

    def __init__(self, clock: Clock, device: torch.device, side=None) -> None:
        super().__init__(clock, side)
        self.device = device
        self.peaks: dict[int, int | None] = {}
        self.flops: int | None = None
        self._counter: FlopCounter | None = None

    def window_opened(self, index: int, pl_module) -> None:
        reset_peak_memory(self.device)
        if index == 0:
            self._counter = FlopCounter(pl_module).start()

    def window_closed(self, index: int, pl_module) -> None:
        self.peaks[index] = peak_memory(self.device)
        if index == 0:
            self.flops = self._counter.stop()


class ReferenceStep:
    """The reference a method's step is divided by: the teacher's forward pass and the
    student's forward and backward passes on the same batch, with the task's loss and
    nothing else (no method terms, optimizer step, clipping, logging or hooks).

    It runs the method's own models (so the same attention implementation, masks and
    modes) under the trainer's autocast, as ``training_step`` does. Its gradients land
    in the student's ``.grad``; the step's ``zero_grad`` clears them before the step's
    backward, so training is unaffected but for dropout draws.

    Args:
        method: the run's method (``teacher``, ``student``, ``forward_model``).
        trainer: the run's trainer (its precision plugin's autocast).
        clock: the timer's clock.
    """

    def __init__(self, method: BaseMethod, trainer: L.Trainer, clock: Clock) -> None:
        self.method = method
        self.precision = trainer.precision_plugin
        self.clock = clock
        self.flops: int | None = None

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Marks]:
        if self.flops is not None:
            return self._passes(batch)
        # The first call (on a warm-up step, never measured) also counts the FLOPs.
        with FlopCounter(self.method) as counter:
            marks = self._passes(batch)
        self.flops = counter.flops
        return marks

    def _passes(self, batch: dict[str, Tensor]) -> dict[str, Marks]:
        method = self.method
        start = self.clock.mark()
        with self.precision.train_step_context():
            method.teacher_outputs(batch)  # under no_grad
            outputs = method.forward_model(method.student, batch)
            loss = task_loss(method.logits(outputs), method.targets(batch))
        loss.backward()
        return {"reference": (start, self.clock.mark())}


def timed_fit(trainer: L.Trainer, module: BaseMethod, batches: list, timer: ProbedTimer) -> None:
    """``trainer.fit`` of ``module`` on ``batches`` (one epoch), the timer first."""
    trainer.callbacks.insert(0, timer)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def distribution(values: list[float]) -> dict[str, float]:
    """Median, quartiles, mean, extremes and count of ``values``."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {
        "median": q2,
        "p25": q1,
        "p75": q3,
        "mean": statistics.mean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fit_figures(
    timer: ProbedTimer, args: argparse.Namespace
) -> tuple[dict, dict[str, list[float]]]:
    """The figures of a fit's measured steps (those after the warm-up that every part
    timed): step time (ms), throughput, FLOP rate, MFU and peak memory; and the measured
    seconds of each part (``step``, and each side-step part)."""
    seconds = timer.seconds()
    keys = [
        k
        for k in sorted(seconds["step"])
        if k >= args.warmup and all(k in part for part in seconds.values())
    ]
    measured = {name: [part[k] for k in keys] for name, part in seconds.items()}
    median = statistics.median(measured["step"])
    peaks = [timer.peaks[k] for k in keys if timer.peaks[k] is not None]
    figures = {
        "step_ms": distribution([1e3 * s for s in measured["step"]]),
        "sequences_per_s": args.batch / median,
        "model_flops_per_step": timer.flops,
        "achieved_tflops": timer.flops / median / 1e12,
        "mfu": timer.flops / median / (args.peak_tflops * 1e12),
        "peak_memory_bytes": max(peaks) if peaks else None,
    }
    return figures, measured


# -------------------------------------------------------------------------- issue 10
def bench_method(name: str, args: argparse.Namespace, scale: Scale, inputs: Inputs) -> dict:
    """One method's fit, each step beside its reference step (see the module docstring)."""
    device = torch.device(args.device)
    n = method_batches(args)
    run_dir = inputs.run_dir(name)
    cfg = compose_config(
        method_overrides(scale, inputs)[name] + run_overrides(args, inputs, run_dir, n)
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = assemble(cfg)
    batches = first_batches(parts, n)
    clock = Clock(device)
    reference = ReferenceStep(parts.method, parts.trainer, clock)
    timer = ProbedTimer(clock, device, side=reference)
    release_memory(device)
    resident = allocated_memory(device)
    timed_fit(parts.trainer, parts.method, batches, timer)
    figures, measured = fit_figures(timer, args)
    step, ref = measured["step"], measured["reference"]
    ref_median = statistics.median(ref)
    result = {
        "student": cfg.model.name,
        "student_params": count_parameters(parts.student),
        "teacher_params": count_parameters(parts.teacher),
        **figures,
        "reference_ms": distribution([1e3 * s for s in ref]),
        "reference_flops": reference.flops,
        "reference_mfu": reference.flops / ref_median / (args.peak_tflops * 1e12),
        # Paired: each step over the reference beside it.
        "ratio_to_reference": distribution([a / b for a, b in zip(step, ref, strict=True)]),
        "resident_bytes_before_fit": resident,
        "modes": {
            "student_training": timer.student_training,
            "teacher_training": timer.teacher_training,
        },
    }
    if parts.pruner is not None:
        result["pruned_to"] = parts.pruner.masks.counts()
        parts.pruner.cpu()  # its importance averages stay on the device otherwise
    del parts
    release_memory(device)
    return result


# -------------------------------------------------------------------------- issue 12
def bench_homodistil(args: argparse.Namespace, scale: Scale, inputs: Inputs) -> dict:
    """The HomoDistil run with pruning against the same method and batches without, then
    compaction (see the module docstring)."""
    device = torch.device(args.device)
    total = args.homodistil_steps
    pruning = [
        f"pruning.update_interval={args.interval}",
        f"pruning.initial_warmup={WARMUPS[0]}",
        f"pruning.final_warmup={WARMUPS[1]}",
    ]
    run_dir = inputs.run_dir("homodistil-pruned")
    cfg = compose_config(
        method_overrides(scale, inputs)["homodistil"]
        + pruning
        + run_overrides(args, inputs, run_dir, total)
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = assemble(cfg)
    batches = first_batches(parts, total)
    plain = unpruned_method(cfg, parts, device)
    clock = Clock(device)
    runs = {}

    def run(trainer: L.Trainer, module: BaseMethod) -> dict:
        timer = ProbedTimer(clock, device)
        release_memory(device)
        resident = allocated_memory(device)
        timed_fit(trainer, module, batches, timer)
        return {**fit_figures(timer, args)[0], "resident_bytes_before_fit": resident}

    runs["plain_before"] = run(plain_trainer(cfg, inputs, "before"), plain)
    runs["pruned"] = run(parts.trainer, parts.method)
    compaction = compaction_check(parts.student, parts.pruner, batches[0], device, args.tolerance)
    masks = parts.pruner.masks.counts()
    parts.pruner.cpu()  # the importance averages leave the device before the last fit
    runs["plain_after"] = run(plain_trainer(cfg, inputs, "after"), plain)
    del parts, plain
    release_memory(device)
    return {
        "steps": total,
        "update_interval": args.interval,
        "warmups": list(WARMUPS),
        "target": OmegaConf.to_container(cfg.model.target),
        "final_counts": masks,
        **runs,
        "ratio_pruned_to_plain": pruning_ratios(runs),
        "compaction": compaction,
    }


def plain_trainer(cfg: DictConfig, inputs: Inputs, when: str) -> L.Trainer:
    """A trainer for the no-pruning baseline: the run's trainer config, callbacks and
    logger (in a run directory of its own), without the pruning callback."""
    variant = copy.deepcopy(cfg)
    variant.run_dir = str(inputs.run_dir(f"homodistil-plain-{when}"))
    return build_trainer(variant)


def pruning_ratios(runs: dict[str, dict]) -> dict[str, float]:
    """Pruned over no-pruning step time, by median and by mean (the mean carries the mask
    update steps), against the mean of the two baseline fits, and how far apart those two
    are (their spread: a ratio closer to 1 than that is noise)."""
    ratios = {}
    for stat in ("median", "mean"):
        before, after = (runs[k]["step_ms"][stat] for k in ("plain_before", "plain_after"))
        plain = (before + after) / 2
        ratios[stat] = runs["pruned"]["step_ms"][stat] / plain
        ratios[f"plain_spread_{stat}"] = abs(before - after) / plain
    return ratios


@torch.no_grad()
def compaction_check(
    student, pruner: Pruner, batch: dict[str, Tensor], device: torch.device, tolerance: float
) -> dict:
    """Compact the student with its final masks and compare both models' outputs (the
    masked-LM logits at every position) in float32 on one batch.

    Passes when ``max |masked - compacted| <= tolerance * max(1, max |masked|)``.
    """
    student.to(device).eval()
    pruner.to(device)
    compacted = compacted_copy(student, pruner.masks).eval()
    inputs = {k: v.to(device) for k, v in model_inputs(batch, student).items()}
    with float32_matmuls():
        masked = student(**inputs).logits.float()
        small = compacted(**inputs).logits.float()
    difference = (masked - small).abs().max().item()
    scale = masked.abs().max().item()
    bound = tolerance * max(1.0, scale)
    config = compacted.config
    result = {
        "reached_target": pruner.finished,
        "params_masked": count_parameters(student),
        "params_compacted": count_parameters(compacted),
        "compacted_shape": {
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
        },
        "max_abs_diff": difference,
        "max_abs_output": scale,
        "relative_l2": ((masked - small).norm() / masked.norm()).item(),
        "tolerance": bound,
        "equal": difference <= bound,
    }
    student.cpu()
    del compacted, masked, small
    return result


# -------------------------------------------------------------------------- issue 17
class CachedBesideLive(L.Callback):
    """On each training batch, in the step's precision context: the largest difference
    between the cached teacher outputs the step reads and the live teacher's, and the
    largest live output."""

    def __init__(self) -> None:
        self.max_abs_diff = self.max_abs_output = 0.0
        self.excess = -math.inf  # max over entries of |cached - live| - 2^-11 |live|

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with trainer.precision_plugin.train_step_context(), torch.no_grad():
            cached = pl_module.teacher_outputs(batch).logits
            live = pl_module.forward_model(pl_module.teacher, batch).logits.float()
        difference = (cached - live).abs()
        self.max_abs_diff = max(self.max_abs_diff, difference.max().item())
        self.max_abs_output = max(self.max_abs_output, live.abs().max().item())
        self.excess = max(self.excess, (difference - 2**-11 * live.abs()).max().item())


def bench_teacher_cache(args: argparse.Namespace, scale: Scale, inputs: Inputs) -> dict:
    """kd reading the teacher-output cache at ``--precision`` (see the module docstring).

    float16 storage rounds each output to 2^-11 of it; anything beyond that bound is the
    live teacher's own variation between batches (another batch size, kernel or order of
    sums) or a cache not built as training computes the teacher.
    """
    kd = [o for o in method_overrides(scale, inputs)["kd"] if "cache_teacher" not in o]
    steps = args.warmup + args.steps
    run_dir = inputs.run_dir("kd-cached")
    cfg = compose_config(
        [*kd, "method.cache_teacher=true"] + run_overrides(args, inputs, run_dir, steps)
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = assemble(cfg)
    batches = first_batches(parts, steps)
    probe = CachedBesideLive()
    parts.trainer.callbacks.append(probe)
    parts.trainer.fit(parts.method, train_dataloaders=DataLoader(batches, batch_size=None))
    cache = parts.method.teacher_cache
    fields = ("teacher_dtype", "autocast_dtype", "float32_matmul_precision")
    result = {
        "status": cache.status,
        "rows": cache.rows,
        "key_precision": {k: cache.fields[k] for k in fields},
        "batches_compared": steps,
        "max_abs_diff": probe.max_abs_diff,
        "max_abs_output": probe.max_abs_output,
        "within_fp16_bound": probe.excess <= 0.0,
    }
    del parts
    release_memory(torch.device(args.device))
    return result


# ---------------------------------------------------------------------------- report
def summary_lines(report: dict) -> list[str]:
    """A short table of the headline figures (printed last)."""
    lines = []
    for name, r in report.get("methods", {}).items():
        lines.append(
            f"{name:>10}: {r['step_ms']['median']:8.2f} ms/step  {r['sequences_per_s']:9.1f} seq/s"
            f"  x{r['ratio_to_reference']['median']:.3f} of reference  MFU {r['mfu']:.3f}"
            f"  peak {format_bytes(r['peak_memory_bytes'])}"
        )
    cache = report.get("teacher_cache")
    if cache:
        lines.append(
            f"teacher cache ({cache['status']}, {cache['key_precision']}): cached vs live "
            f"max |diff| {cache['max_abs_diff']:.3g} on outputs up to "
            f"{cache['max_abs_output']:.3g}: "
            + ("within" if cache["within_fp16_bound"] else "BEYOND")
            + " the float16 bound (2^-11 relative)"
        )
    homo = report.get("homodistil")
    if homo:
        ratio, check = homo["ratio_pruned_to_plain"], homo["compaction"]
        lines.append(
            f"HomoDistil run: pruned / plain step x{ratio['median']:.3f} (median), "
            f"x{ratio['mean']:.3f} (mean); plain spread {ratio['plain_spread_median']:.3f}; "
            f"MFU {homo['pruned']['mfu']:.3f}; peak {format_bytes(homo['pruned']['peak_memory_bytes'])}"
        )
        lines.append(
            f"compaction: {check['params_masked']} -> {check['params_compacted']} params, "
            f"max |diff| {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}): "
            + ("EQUAL" if check["equal"] else "DIFFERENT")
        )
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return lines


def format_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print and write the report; non-zero if compaction changed the
    outputs."""
    start = time.perf_counter()
    args, scale = parse_args(argv)
    # Random checkpoints load with new heads by design: keep their load reports and the
    # tokenising progress bars out of the output, which ends with the report.
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device (use --device cpu).")
    report = {
        "environment": environment(device),
        "settings": {
            "tiny": args.tiny,
            "precision": args.precision,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "homodistil_steps": args.homodistil_steps,
            "peak_tflops": args.peak_tflops,
            "teacher": scale.teacher | {"vocab_size": scale.vocab_size},
        },
        "flops_formula": FLOPS_FORMULA,
        "matmul_ceiling_tflops": matmul_tflops(device, scale.matmul_size),
    }
    with tempfile.TemporaryDirectory(prefix="kdlab-gpu-bench-") as tmp:
        inputs = write_inputs(Path(tmp), args, scale)
        if args.only in (None, "methods"):
            names = method_overrides(scale, inputs)
            report["methods"] = {name: bench_method(name, args, scale, inputs) for name in names}
            report["teacher_cache"] = bench_teacher_cache(args, scale, inputs)
        if args.only in (None, "homodistil"):
            report["homodistil"] = bench_homodistil(args, scale, inputs)
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["wall_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n\n" + "\n".join(summary_lines(report)) + "\n")
    equal = report.get("homodistil", {}).get("compaction", {}).get("equal", True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
