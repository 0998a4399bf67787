"""The layout of a run directory: one home for the names of the files a run writes.

``kdlab.train`` writes them, ``kdlab.pipeline`` reads them to skip or resume stages,
``kdlab.compact`` and ``kdlab.report`` read them back, and the tests check them.
"""

import shutil
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
# The run's id (config key run_id, the W&B run id), kept so that a resumed run continues it.
RUN_ID = "run_id.txt"
# W&B's own folder (wandb.init(dir=<run dir>)): offline-run-<time>-<id>/ per start of the run.
WANDB_DIR = "wandb"
# Written by kdlab.sweep.SweepSummary when the job raised (its overrides and traceback), and
# by kdlab.pipeline in the directory of a stage that raised (its traceback).
ERROR = "error.txt"
# Hydra's own files in every job directory (hydra.output_subdir): the composed, unresolved
# config and the command-line overrides of the job.
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = "config.yaml"
HYDRA_OVERRIDES = "overrides.yaml"
# Hydra's job log (hydra/job_logging default): ${hydra.job.name}.log, e.g. train.log.
JOB_LOG_GLOB = "*.log"


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
    def run_id(self) -> Path:
        """The run's id, written when it starts afresh and read back when it resumes."""
        return self.path / RUN_ID

    @property
    def wandb_dir(self) -> Path:
        """W&B's files of the run: one ``offline-run-<time>-<id>`` folder per start offline
        (a resumed run adds one with the same id); ``wandb sync`` uploads them."""
        return self.path / WANDB_DIR

    @property
    def pipeline_summary(self) -> Path:
        return self.path / PIPELINE_SUMMARY

    @property
    def error(self) -> Path:
        """The traceback of a job (``kdlab.sweep.SweepSummary``) or pipeline stage
        (``kdlab.pipeline``) that raised."""
        return self.path / ERROR

    @property
    def hydra_dir(self) -> Path:
        """Hydra's record of the job; present in job directories, absent in pipeline stages."""
        return self.path / HYDRA_DIR

    @property
    def hydra_config(self) -> Path:
        """The composed config before interpolation (written before the job starts)."""
        return self.hydra_dir / HYDRA_CONFIG

    @property
    def hydra_overrides(self) -> Path:
        """The job's command-line overrides, one list item each."""
        return self.hydra_dir / HYDRA_OVERRIDES

    @property
    def job_logs(self) -> list[Path]:
        """Hydra's job log(s) in this directory."""
        return sorted(self.path.glob(JOB_LOG_GLOB))

    @property
    def finished(self) -> bool:
        """Whether the run wrote its metrics (the last thing a run does)."""
        return self.metrics.is_file()

    @property
    def run_outputs(self) -> list[Path]:
        """What of a run is here: its config, checkpoints, metrics or exported student.

        A directory with any of them holds a run, which a new run may not silently replace
        (``kdlab.train.claim_run_dir``); Hydra's own files do not count, since Hydra writes
        them for every job before it starts.
        """
        marks = (self.config, self.checkpoints, self.metrics, self.student)
        return [path for path in marks if path.exists()]

    def clear(self) -> list[Path]:
        """Remove everything in the directory but Hydra's record of the job about to run
        (``.hydra/`` and the job log, which Hydra has just rewritten): the earlier run's
        config, checkpoints (no stale ``best.ckpt`` beside a new one), metrics, student,
        logs, evaluation outputs and pruning history.

        Returns:
            The entries removed.
        """
        kept = {self.hydra_dir, *self.job_logs}
        removed = [entry for entry in sorted(self.path.iterdir()) if entry not in kept]
        for entry in removed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return removed
