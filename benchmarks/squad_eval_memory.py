"""Peak memory of evaluating a SQuAD dev file with kdlab's per-batch post-processing.

Usage::

    PYTHONPATH=src python benchmarks/squad_eval_memory.py \
        --validation-file ../shared/data/squad/dev-v1.1.json [--model bert_L2_H128]

``--model`` is a ``model`` config option (``minilm``, ``bert_L2_H128``, ...) or
``model.path`` of a trained QA model. Datamodule, student and ``FineTune`` module are what
``kdlab.train.assemble`` builds from the composed config, as in a run: students on MiniLM's
vocabulary, with a freshly initialised span head. The answers are meaningless, but the
windows, logits and post-processing are those of any model (the encoder's depth and width
change the forward time and its activations, not the SQuAD metrics' memory). Prints the
process's peak resident memory (``ru_maxrss``) before and after the evaluation, the most
windows ``SquadMetrics`` held at once, and what the start/end logits of all windows would
take if held together.
"""

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

from kdlab.components import validate
from kdlab.final_evaluation import evaluate, evaluation_trainer
from kdlab.train import CONF_DIR, assemble


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WindowTracker(L.Callback):
    """Records the largest number of windows the ``val`` split's ``SquadMetrics`` held back between
    batches (read after each batch's update)."""

    def __init__(self) -> None:
        self.max_pending = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        pending = pl_module.split_metrics["val"].pending_windows
        self.max_pending = max(self.max_pending, pending)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation-file", required=True)
    parser.add_argument("--model", default="bert_L2_H128", help="model option or directory")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    is_dir = Path(args.model).is_dir()
    overrides = [
        "method=finetune",
        "task=squad",
        "model=pretrained" if is_dir else f"model={args.model}",
        *([f"model.path={args.model}"] if is_dir else []),
        # The training split is not evaluated; one question of the dev file stands in for it.
        f"task.train_file={args.validation_file}",
        f"task.validation_file={args.validation_file}",
        "task.max_train_samples=1",
        f"task.max_seq_length={args.max_seq_length}",
        f"task.doc_stride={args.doc_stride}",
        f"task.eval_batch_size={args.batch_size}",
        "task.cache_dir=null",
        "trainer=cpu",
        "~logger",
        "callbacks=quiet",
        "run_dir=.",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
    parts = assemble(cfg)  # the datamodule is set up: windows of both splits are built
    datamodule = parts.datamodule
    windows = len(datamodule.features["validation"])
    questions = len(datamodule.examples["validation"])
    before = peak_rss_mib()
    start = time.perf_counter()
    # The evaluation a run ends with: its FineTune module and SQuAD metrics.
    trainer = evaluation_trainer(cfg.trainer, parts.trainer.strategy.root_device)
    tracker = WindowTracker()
    trainer.callbacks.append(tracker)
    metrics = evaluate(trainer, parts.method, datamodule)
    seconds = time.perf_counter() - start
    all_logits_mib = windows * args.max_seq_length * 2 * 4 / 2**20
    report = {
        "model": args.model,
        "parameters": sum(p.numel() for p in parts.student.parameters()),
        "questions": questions,
        "windows": windows,
        "predictions": len(parts.method.evaluation_files()["predictions.json"]),
        "max_seq_length": args.max_seq_length,
        "eval_batch_size": args.batch_size,
        "peak_rss_mib_before_eval": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "max_windows_held": tracker.max_pending,
        "all_logits_fp32_mib": round(all_logits_mib, 1),
        "eval_seconds": round(seconds, 1),
        "metrics": metrics,
    }
    print(json.dumps(report, indent=2))  # noqa: T201 (a script's report)


if __name__ == "__main__":
    main()
