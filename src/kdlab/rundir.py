"""The layout of a run directory: one home for the names of the files a run writes.

``kdlab.train`` writes them, ``kdlab.pipeline`` reads them to skip or resume stages,
``kdlab.compact`` and ``kdlab.report`` read them back, and the tests check them.
"""

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.json"
STUDENT = "student"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
PRUNING_HISTORY = "pruning_history.json"
PRUNING_PLOT = "pruning_history.png"
PIPELINE_SUMMARY = "summary.json"


@dataclass(frozen=True)
class RunDir:
    """The files of one run (or pipeline) directory.

    Args:
        path: the run directory.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        """The composed, resolved config of the run."""
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        """Written last: its presence means the run finished."""
        return self.path / METRICS

    @property
    def student(self) -> Path:
        """The exported student (``save_pretrained`` model and tokenizer)."""
        return self.path / STUDENT

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """Written after every validation; ``ckpt_path=last`` resumes from it."""
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST_CHECKPOINT

    @property
    def pruning_history(self) -> Path:
        return self.path / PRUNING_HISTORY

    @property
    def pruning_plot(self) -> Path:
        return self.path / PRUNING_PLOT

    @property
    def pipeline_summary(self) -> Path:
        return self.path / PIPELINE_SUMMARY

    @property
    def finished(self) -> bool:
        """Whether the run wrote its metrics (the last thing a run does)."""
        return self.metrics.is_file()
