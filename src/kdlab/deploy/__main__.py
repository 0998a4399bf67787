"""``python -m kdlab.deploy MODEL_DIR OUT_DIR`` (``kdlab-deploy``): a ``save_pretrained``
model (a run's ``student/``, a compacted model, a teacher) to ONNX, with its parity to PyTorch
checked and recorded in ``OUT_DIR/deploy.json``.

Examples::

    kdlab-deploy runs/kd/student deployed/kd --int8
    kdlab-deploy runs/kd/student deployed/kd --int8 --prune-vocab task=sst2 \\
        --eval task=sst2 --reference runs/teacher/student

``--prune-vocab`` and ``--eval`` take a task and Hydra overrides, as ``kdlab.train`` does
(``task=sst2 task.data_dir=... task.max_seq_length=64``); ``--prune-vocab`` also takes text
files, one text a line.
"""

import argparse
import logging
import sys

from kdlab.deploy.deployment import ParityError, deploy
from kdlab.errors import ConfigError, DataFormatError

log = logging.getLogger("kdlab")


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m kdlab.deploy``."""
    p = argparse.ArgumentParser(
        prog="python -m kdlab.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", help="a save_pretrained model directory with its tokenizer")
    p.add_argument("out_dir", help="where model.onnx, the tokenizer and deploy.json go")
    p.add_argument("--int8", action="store_true", help="also write model_int8.onnx")
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="one int8 scale per weight tensor (default: one per output channel)",
    )
    p.add_argument(
        "--prune-vocab",
        nargs="+",
        metavar="FILE|task=NAME",
        help="keep only the tokens of these text files, or of task=NAME [overrides...]",
    )
    p.add_argument(
        "--eval",
        nargs="+",
        metavar="task=NAME",
        help="dev metrics of PyTorch, ONNX fp32 and int8: task=NAME [overrides...]",
    )
    p.add_argument("--reference", help="a model (the teacher) deployed and timed alongside")
    p.add_argument("--latency", action="store_true", help="time even without --reference")
    p.add_argument("--seq-len", type=int, help="timed tokens per sequence (default: the task's)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per figure (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        deploy(
            args.model_dir,
            args.out_dir,
            int8=args.int8,
            per_channel=not args.per_tensor,
            prune_vocab=args.prune_vocab,
            eval_overrides=args.eval,
            reference=args.reference,
            latency=args.latency,
            seq_len=args.seq_len,
            runs=args.runs,
            warmup=args.warmup,
            overwrite=args.overwrite,
        )
    except (ConfigError, DataFormatError, ParityError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
