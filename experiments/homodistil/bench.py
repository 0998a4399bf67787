"""Benchmarks of the pruning component on CPU (figures in README.md next to this file).

1. Step overhead: the same HomoDistil training step (teacher forward, student forward and
   backward, AdamW step) with and without pruning (masks in the forward pass, a PLATON update
   every step, a mask update every ``--interval`` steps), alternated step by step in one
   process so that machine load affects both alike. Reports the ratio of median step times.
2. Inference: the teacher against its compacted half-width copy (BertModel forward), timed
   alternately, next to the ratio of their forward FLOPs.

Teacher, students, pruner and method are what ``kdlab.train.assemble`` (and
``kdlab.components.build``) make of a ``method=homodistil model=minilm_half`` config: the
teacher is a random MiniLM-shaped masked LM written to a temporary directory with a
word-level vocabulary of BERT's size, and the batch comes from a corpus of random words of
that vocabulary.

Usage (from the repository root): ``PYTHONPATH=src:. python experiments/homodistil/bench.py
[--steps 12] [--batch 16] [--seq 64]``
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmarks.common import (
    FlopCounter,
    fresh_student,
    unpruned_method,
    write_random_corpus,
    write_random_teacher,
)
from kdlab.components import build, validate
from kdlab.pruning import compacted_copy
from kdlab.train import CONF_DIR, Assembly, assemble

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
VOCAB_SIZE = 30522  # BERT's (and MiniLM's) vocabulary


def write_inputs(directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random MiniLM-shaped masked LM with its tokenizer, and a corpus of random words
    long enough for one training batch of ``--batch`` × ``--seq`` tokens and a held-out
    share; returns (teacher directory, corpus file)."""
    teacher = directory / "teacher"
    words = write_random_teacher(teacher, VOCAB_SIZE, **MINILM)
    # Twice the chunks one batch needs: the validation share (2 %) is held out of them.
    corpus = directory / "corpus.txt"
    write_random_corpus(corpus, words, lines=2 * args.batch, length=args.seq)
    return teacher, corpus


def homodistil_config(args: argparse.Namespace, directory: Path) -> DictConfig:
    """The composed, validated config: HomoDistil to half width from the random teacher,
    pruning from the first step (cubic), no discrepancy tracking."""
    teacher, corpus = write_inputs(directory, args)
    overrides = [
        "method=homodistil",
        "model=minilm_half",
        "teacher=local",
        f"teacher.path={teacher}",
        "task=corpus/local",
        f"task.files=[{corpus}]",
        f"task.max_seq_length={args.seq}",
        f"task.batch_size={args.batch}",
        "task.cache_dir=null",
        "pruning.initial_warmup=0",
        "pruning.final_warmup=0",
        f"pruning.update_interval={args.interval}",
        "pruning.track_interval=0",
        "optim.lr=1e-4",
        "trainer=cpu",
        "~logger",
        "callbacks=quiet",
        f"run_dir={directory / 'run'}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
    return cfg


def step_overhead(args, cfg: DictConfig, parts: Assembly) -> dict:
    # The pruned run's masks never finish within the benchmark: the total is set beyond it.
    total = 10 * args.steps
    modules = {"plain": unpruned_method(cfg, parts, "cpu"), "pruned": parts.method}
    pruner = parts.pruner
    batch = next(iter(parts.datamodule.train_dataloader()))
    optimizers = {}
    for name, module in modules.items():
        module.on_train_epoch_start()  # student in training mode, teacher in eval mode
        optimization = module.optim.configure(module.trainable_parameters(), total)
        optimizers[name] = optimization["optimizer"]
    times = {"plain": [], "pruned": []}
    for step in range(1, args.steps + 2):
        for name, module in modules.items():
            opt = optimizers[name]
            start = time.perf_counter()
            loss = module.compute_losses(batch)["loss"]
            loss.backward()
            # What PruningCallback does around each optimizer step.
            if name == "pruned":
                pruner.accumulate()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if name == "pruned":
                pruner.update(step, total)
            if step > 1:  # the first step warms up allocations
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_s": medians["plain"],
        "pruned_s": medians["pruned"],
        "ratio": medians["pruned"] / medians["plain"],
        "final_counts": pruner.masks.counts(),
        "steps": args.steps,
        "batch": [args.batch, args.seq],
    }


@torch.no_grad()
def inference(args, cfg: DictConfig, parts: Assembly) -> dict:
    # Both on the default attention (the run's teacher was switched to eager for HomoDistil).
    teacher = fresh_student(cfg, parts).bert.eval()
    masked = fresh_student(cfg, parts)
    pruner = build(cfg, "pruning", model=masked)
    # Straight to the target shape. No importance has been gathered, so the kept structures
    # are arbitrary: which ones are kept changes neither the compacted shape nor its speed.
    pruner.update(step=10**6, total=10**6)
    compacted = compacted_copy(masked, pruner.masks).bert.eval()
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (args.infer_batch, args.infer_seq))
    times = {"teacher": [], "student": []}
    flops = {}
    for name, model in (("teacher", teacher), ("student", compacted)):
        with FlopCounter(model) as counter:  # the untimed first round
            model(input_ids=ids)
        flops[name] = counter.flops
    for _ in range(args.infer_rounds):
        for name, model in (("teacher", teacher), ("student", compacted)):
            start = time.perf_counter()
            model(input_ids=ids)
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "teacher_ms": 1000 * medians["teacher"],
        "student_ms": 1000 * medians["student"],
        "speedup": medians["teacher"] / medians["student"],
        "flops_ratio": flops["teacher"] / flops["student"],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in compacted.parameters()),
        "batch": [args.infer_batch, args.infer_seq],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--infer-seq", type=int, default=128)
    parser.add_argument("--infer-rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdlab-homodistil-bench-") as tmp:
        cfg = homodistil_config(args, Path(tmp))
        torch.manual_seed(0)
        parts = assemble(cfg)
        results = {
            "threads": torch.get_num_threads(),
            "step": step_overhead(args, cfg, parts),
            "inference": inference(args, cfg, parts),
        }
    print(json.dumps(results, indent=2))  # noqa: T201 - a script's report


if __name__ == "__main__":
    main()
