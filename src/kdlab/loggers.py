"""What a run does with its Lightning logger beyond the calls Lightning makes itself.

Lightning's ``WandbLogger`` starts a W&B run (``wandb.init``) the first time its
``experiment`` is used and never finishes it: ``Trainer.fit`` ends with
``logger.finalize(...)``, which for W&B only uploads checkpoints. The W&B run stays the
process's current run (``wandb.run``), and every later ``WandbLogger`` in the same process,
the next job of a multirun sweep or the next stage of a pipeline, finds it and logs into it
instead of starting its own ("There is a wandb run already in progress..."). So each
training run finishes its logger's run itself, once it has logged its last value (the
``best/...`` metrics, after ``fit``): :func:`logger_run`.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


@contextmanager
def logger_run(logger: Logger | None) -> Iterator[None]:
    """Start the logger's run on entry and finish it when the block ends.

    On success the logger is finalised (``"success"``: the CSV logger writes its rows) and
    its W&B run finished with exit code 0; when the block raises, it is finalised as
    ``"failed"`` and the W&B run finished with exit code 1 (state *failed*), and the
    exception propagates. Either way the next run in the process starts a W&B run of its own.

    Args:
        logger: the trainer's logger; None (no logger) makes this a no-op.
    """
    if logger is None:
        yield
        return
    if isinstance(logger, WandbLogger):
        _ = logger.experiment  # wandb.init; rank zero only (other ranks get a dummy)
    try:
        yield
    except BaseException:
        _finish(logger, "failed")
        raise
    _finish(logger, "success")


def _finish(logger: Logger, status: str) -> None:
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish(exit_code=0 if status == "success" else 1)


def log_image(logger: Logger | None, key: str, path: Path, step: int) -> None:
    """Log a picture file (a PNG the run wrote) to a logger that keeps media (W&B); other
    loggers have nowhere to put it, and the file stays in the run directory."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key, [str(path)], step=step)
    else:
        log.debug("%s keeps no images: %s stays in the run directory only.", logger, path)
