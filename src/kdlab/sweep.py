"""A multirun sweep ends with its report, names its failed jobs and exits non-zero.

What Hydra 1.3 does by itself when a job of ``python -m kdlab.train -m ...`` raises: the job's
exception is caught and stored in its ``JobReturn``; the basic launcher goes on with the other
jobs of the batch; once the batch is over, the basic sweeper re-raises the *first* failed
job's exception, after writing only that job's overrides ("Error executing job with
overrides: ..."). The process exits with status 1, but ``on_multirun_end`` is never called,
any later batch (``hydra.sweeper.max_batch_size``) never runs, and the other failed jobs are
not named. By default the whole sweep is one batch, so every job does run.

:class:`SweepSummary` (registered in ``conf/hydra/default.yaml``) takes the failures over:

* every job that raises, single run or sweep job, leaves its overrides and traceback in
  ``error.txt`` in its directory, where ``kdlab.report`` finds it (rank 0's, where SLURM runs
  the job in every rank's task: another rank's traceback is in its own log), unless the
  directory held a run (or other files) that the job was refused before it claimed it: that
  directory is left as it was, and the failure is in the log and the sweep's list;
* in a sweep with the basic sweeper, the failure is logged (traceback included, into the
  job's log) and marked handled, so that the sweep runs to its end;
* at the end of the sweep it prints and writes the report of the sweep directory
  (``report.md``, ``report.csv``, ``report.png``), lists the failed jobs with their
  directory and the command that re-runs each (:func:`rerun_command`), and exits with status
  1 if any failed. A job of the submitit launchers whose process was killed (no result came
  back) is a failed job too: ``hydra_plugins.kdlab_launchers`` hands it to ``on_job_end``.

Other sweepers (Optuna, Ax, ...) read the jobs' return values, so their failures are left to
them (Optuna tells a failed job's trial as failed, and stops the study once a batch of trials
fails more often than ``hydra.sweeper.max_failure_rate``; the ``search`` presets never stop).
In those sweeps a job that returns no finite number (a NaN metric; ``None``) is made a failed
job, with a :class:`kdlab.errors.NoObjectiveError` saying so: Optuna would otherwise fail
on the NaN (it cannot tell it) or fail its trial with a message that names no metric. If the
study ends, ``on_multirun_end`` reports it as above.

:class:`StudyCheck` stops an Optuna study that would optimise the main metric the wrong way
(the plugin's default direction is ``minimize``; ``search=<method>`` takes the direction from
``task.main_metric_mode``), or search one method's hyper-parameters while another runs
(``method=kd search=mlm``: the command line's method wins over the preset's).

Single runs are unchanged apart from ``error.txt``: Hydra still prints the traceback and
exits 1.
"""

import logging
import math
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdlab import report
from kdlab.errors import NoObjectiveError
from kdlab.rundir import RunDir, holds_anything, record_error, record_stamp
from kdlab.summary import table_console

log = logging.getLogger("kdlab.sweep")

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
_OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


class SweepSummary(Callback):
    """Hydra callback: failed jobs are recorded, the sweep finishes, is reported, and exits 1
    if any job failed.

    Args:
        write_report: write and print the sweep directory's report at the end of a sweep.
    """

    def __init__(self, write_report: bool = True) -> None:
        self.write_report = write_report
        # Failures seen in this process; the sweep directory's error.txt files add those of
        # jobs run elsewhere (launchers that run jobs in other processes).
        self._failed: dict[Path, list[str]] = {}
        # The job record found in a job directory that held something as the job started.
        self._found: dict[Path, tuple[int, int] | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Drops the ``error.txt`` of an earlier attempt in the same directory, unless it holds
        a run (or other files), which the job must claim before it writes there: the run
        drops it then (:class:`kdlab.train.JobFiles`)."""
        job_dir = _job_dir(config)
        if job_dir is None:
            return
        if holds_anything(RunDir(job_dir)):
            self._found[job_dir] = record_stamp(RunDir(job_dir))
        elif rank_zero_only.rank == 0:
            RunDir(job_dir).error.unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Records a failed job; in a basic sweep, logs it and lets the sweep go on. In a sweep
        that optimises return values, a job without a finite one is failed first."""
        if job_return.status == JobStatus.COMPLETED and _objective_missing(config, job_return):
            error = NoObjectiveError(
                f"The job returned {job_return.return_value!r} where the sweeper needs a finite "
                f"number: the student's val/{OmegaConf.select(config, 'task.main_metric')} "
                "(see metrics.json in the job directory). The trial counts as failed."
            )
            job_return.status, job_return.return_value = JobStatus.FAILED, error
        if job_return.status != JobStatus.FAILED:
            return
        # The public `return_value` re-raises the exception; the attribute holds it.
        error = getattr(job_return, "_return_value", None)
        overrides = [str(o) for o in (job_return.overrides or [])]
        job_dir = _job_dir(config)
        if job_dir is not None and rank_zero_only.rank == 0 and _claimed(job_dir, self._found):
            text = "".join(traceback.format_exception(error)) if error is not None else ""
            record_error(RunDir(job_dir), f"overrides: {shlex.join(overrides)}\n\n{text}")
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        if job_dir is not None:
            self._failed[job_dir] = overrides
        log.error(
            "Job #%s failed (%s): %s",
            OmegaConf.select(config, "hydra.job.num", default="?"),
            job_dir,
            error,
            exc_info=error if isinstance(error, BaseException) else None,
        )
        if OmegaConf.select(config, "hydra.sweeper._target_") == _BASIC_SWEEPER:
            # The basic sweeper only reads the return value to re-raise the failure, which
            # would skip on_multirun_end; the failure is reported there instead.
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Prints and writes the sweep's report, lists its failed jobs, exits 1 if any."""
        # Hydra caches ${now:...} on this config: the same directory the jobs went to.
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        records = report.collect_runs(sweep_dir) if sweep_dir.is_dir() else []
        failed = dict(self._failed)
        for record in records:
            if record.status == report.FAILED:
                failed.setdefault(record.job_dir or record.path, record.overrides)
        if self.write_report and records:
            try:
                summary = report.build_report(sweep_dir)
                written = report.write_report(summary, sweep_dir)
                console = table_console()
                for table in report.report_tables(summary):
                    console.print(table)
                log.info("Sweep report: %s", ", ".join(str(p) for p in written.values()))
            except Exception:  # the report is a convenience; the failure list is not
                log.exception("The report of %s could not be written", sweep_dir)
        if not failed:
            return
        jobs = len({r.job_dir or r.path for r in records}) or len(failed)
        lines = [f"{len(failed)} of {jobs} jobs failed:"]
        for job_dir, overrides in sorted(failed.items(), key=lambda kv: str(kv[0])):
            lines += [f"  {job_dir}", f"    {shlex.join(rerun_command(job_dir, overrides))}"]
        log.error("\n".join(lines))
        # SystemExit passes through Hydra's callback wrapper, which turns exceptions into
        # warnings.
        sys.exit(1)


def rerun_command(job_dir: Path, overrides: list[str]) -> list[str]:
    """The command that runs a failed job of a sweep again, as a single run in its directory.

    It resumes from the job's own ``checkpoints/last.ckpt`` where the job wrote one; where the
    job left a run without one (its ``config.yaml``), that is replaced (``overwrite=true``).
    The sweep's own ``ckpt_path=last`` (a resumed sweep) would fail in a job that never
    checkpointed, so it is dropped; a pipeline job continues its stages by itself.

    Args:
        job_dir: the job's directory (``hydra.runtime.output_dir``).
        overrides: the job's overrides.

    Returns:
        The command, as the argument list of ``python -m kdlab.train``.
    """
    run_dir = RunDir(job_dir)
    settled = ("hydra.run.dir=", "overwrite=", "ckpt_path=")
    kept = [o for o in overrides if not o.startswith(settled)]
    if run_dir.last_checkpoint.is_file():
        how = ["ckpt_path=last"]
    else:
        # A checkpoint of another run that the job trained on from.
        how = [o for o in overrides if o.startswith("ckpt_path=") and o != "ckpt_path=last"]
        how += ["overwrite=true"] if run_dir.run_outputs else []
    return ["python", "-m", "kdlab.train", *kept, *how, f"hydra.run.dir={job_dir}"]


class StudyCheck(Callback):
    """Hydra callback: an Optuna study must optimise the runs' objective the way it improves,
    maximising a main metric that is better higher and minimising one that is better lower
    (``task.main_metric_mode``), and a search preset named after a method (``search=kd``)
    must search the method that runs. It exits 1 before the first trial otherwise."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Compares ``hydra.sweeper.direction`` with the task, the search preset with the
        method."""
        if OmegaConf.select(config, "hydra.sweeper._target_") != _OPTUNA_SWEEPER:
            return
        problem = _direction_problem(config) or _search_problem(config)
        if problem:
            log.error(problem)
            sys.exit(1)  # exceptions raised in Hydra callbacks become warnings


def _direction_problem(config: DictConfig) -> str | None:
    direction = OmegaConf.select(config, "hydra.sweeper.direction")
    direction = getattr(direction, "name", direction)  # the plugin's default is an enum
    mode = OmegaConf.select(config, "task.main_metric_mode")
    expected = f"{mode}imize"
    if direction == expected:
        return None
    return (
        f"hydra.sweeper.direction={direction}, but the trials return "
        f"val/{OmegaConf.select(config, 'task.main_metric')}, which is better "
        f"{'higher' if mode == 'max' else 'lower'} (task.main_metric_mode={mode}): set "
        f"hydra.sweeper.direction={expected}, or use a search preset (search=<method>, "
        "conf/search/), which takes the direction from the task."
    )


def _search_problem(config: DictConfig) -> str | None:
    choices = OmegaConf.select(config, "hydra.runtime.choices", default={})
    search, method = choices.get("search"), choices.get("method")
    # A preset selects its method itself; only a method on the command line can differ.
    methods = GlobalHydra.instance().config_loader().get_group_options("method")
    if search is None or search == method or search not in methods:
        return None
    return (
        f"search={search} searches the hyper-parameters of method={search}, but method={method} "
        f"runs: leave method={method} out, or use search={method}."
    )


def _objective_missing(config: DictConfig, job_return: JobReturn) -> bool:
    """Whether a completed job of a sweep whose sweeper reads return values returned no finite
    number. Only the process of rank 0 returns one: under SLURM every rank's task runs the
    job (and these callbacks), and the launcher reads the first task's value."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_")
    if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN or sweeper == _BASIC_SWEEPER:
        return False
    if rank_zero_only.rank != 0:
        return False
    value = job_return.return_value
    return not (isinstance(value, int | float) and math.isfinite(value))


def _claimed(job_dir: Path, found: dict[Path, tuple[int, int] | None]) -> bool:
    """Whether the job may write into ``job_dir``: it held nothing as the job started, or the
    job claimed it (wrote its record there)."""
    if job_dir not in found:
        return True
    return found.pop(job_dir) != record_stamp(RunDir(job_dir))


def _job_dir(config: DictConfig) -> Path | None:
    output_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
    return Path(output_dir) if output_dir else None
