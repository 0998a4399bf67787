"""kdlab's submitit launchers (``hydra/launcher=local`` and ``slurm``): those of
hydra-submitit-launcher, except that a job whose process ended without handing back its
result (killed, out of memory, past its time) is a failed job of the sweep, as one that
raised is, instead of an ``UncompletedJobError`` that ends the sweep without its report.

Hydra finds launchers only in the ``hydra_plugins`` package, hence this one.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict


class _ReportsLostJobs(submitit_launcher.BaseSubmititLauncher):
    """A submitit launcher whose lost jobs are failed jobs, given to Hydra's ``on_job_end``
    callbacks (where :class:`kdlab.sweep.SweepSummary` writes their ``error.txt``)."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        with self._lost_jobs_fail():
            return super().launch(job_overrides, initial_job_idx)

    @contextmanager
    def _lost_jobs_fail(self) -> Iterator[None]:
        # The plugin's launch waits for each job's result in one expression, which raises at
        # the first job without one (while later jobs may still run): its results are read
        # through this instead, for the time of the launch.
        from submitit.core.core import Job
        from submitit.core.utils import UncompletedJobError

        results = Job.results

        def results_or_failure(job: Job) -> list:
            try:
                return results(job)
            except UncompletedJobError as error:
                return [self._failed_job(job, error)]

        Job.results = results_or_failure
        try:
            yield
        finally:
            Job.results = results

    def _failed_job(self, job, error: Exception) -> JobReturn:
        """The ``JobReturn`` of a job that handed back nothing, after the callbacks saw it."""
        assert self.hydra_context is not None and self.config is not None
        overrides, _, job_num = job.submission().args[:3]
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra):
            config.hydra.job.id = job.job_id
            config.hydra.job.num = job_num
            job_dir = Path(str(self.config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
            config.hydra.runtime.output_dir = str(job_dir.absolute())
        job_dir.mkdir(parents=True, exist_ok=True)
        job_return = JobReturn(overrides=list(overrides), hydra_cfg=config, status=JobStatus.FAILED)
        job_return.return_value = error
        self.hydra_context.callbacks.on_job_end(config=config, job_return=job_return)
        return job_return


class LocalLauncher(_ReportsLostJobs, submitit_launcher.LocalLauncher):
    """``hydra/launcher=local``: each job in a local process."""


class SlurmLauncher(_ReportsLostJobs, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: each job an sbatch array task."""
