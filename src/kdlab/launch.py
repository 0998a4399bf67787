"""The other DDP processes of a run, as Lightning starts them under Hydra, run that run.

With ``strategy=ddp`` on one machine, Lightning's ``_SubprocessScriptLauncher`` starts ranks
1..N-1 at the beginning of ``trainer.fit`` by running this process's command line again
(``lightning.fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd``)::

    python -m kdlab.train <sys.argv[1:]> hydra.run.dir="<HydraConfig run.dir>" \\
        hydra.job.name=train_ddp_process_<rank> hydra.output_subdir=null

That is the run only for a single run. A job of a multirun sweep (``-m ... seed=1,2``) would
start the whole sweep again in every child, and its ``hydra.run.dir`` is not the job's
directory; a pipeline stage's directory is not ``hydra.run.dir`` either. Lightning also leaves
``MASTER_PORT``, ``LOCAL_RANK``, ``WORLD_SIZE``, ... in this process's environment, where the
next job of a sweep (or the next stage of a pipeline) in the same process reads them as
"my processes were started for me" and waits for ranks that never come.

:func:`every_rank_runs` covers ``trainer.fit``: Lightning still starts the processes, but
its command line names the run's own resolved ``config.yaml`` (written before training) as the
config to compose, and its ``hydra.run.dir`` is the run directory; afterwards the command
line, Hydra's ``run.dir`` and those environment variables are as they were. If the fit fails,
the processes it started are stopped: they are of no use any more (and may wait in a
collective for this one until the timeout), and Lightning watches them from a thread that
kills this process, the sweep that runs the next job, once one exits with an error.
Launchers whose cluster starts every rank itself (SLURM tasks: Lightning's
``SLURMEnvironment``) start no processes, and are left alone.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, read_write

from kdlab.rundir import RunDir

# What Lightning's launcher sets in its own environment before it starts the other ranks.
DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def rank_command_line(run_dir: RunDir) -> list[str]:
    """The arguments after the program that make ``kdlab.train`` run ``run_dir.config`` as is."""
    return [f"--config-path={run_dir.path}", f"--config-name={run_dir.config.stem}"]


@contextmanager
def every_rank_runs(run_dir: RunDir, trainer: L.Trainer) -> Iterator[None]:
    """Within it, DDP processes that Lightning starts run the run of ``run_dir``, and end with
    the fit if it fails (see the module).

    Args:
        files: the run's directory; its ``config.yaml`` must hold the run's resolved config.
        trainer: the trainer that fits within it.
    """
    if not HydraConfig.initialized():  # Lightning starts its processes without Hydra then
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, hydra_run_dir = sys.argv, hydra_cfg.run.dir
    environment = {name: os.environ.get(name) for name in DDP_ENVIRONMENT}
    sys.argv = [argv[0], *rank_command_line(run_dir)]
    _set_run_dir(hydra_cfg, str(run_dir.path))
    try:
        yield
    except BaseException:
        _stop_started_ranks(trainer)
        raise
    finally:
        sys.argv = argv
        _set_run_dir(hydra_cfg, hydra_run_dir)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_run_dir(hydra_cfg: DictConfig, path: str) -> None:
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = path


def _stop_started_ranks(trainer: L.Trainer) -> None:
    # Lightning's watch thread shares the launcher's list of the processes it started:
    # emptied first, it sees nothing exit (killed, or failed on their own meanwhile).
    started = getattr(trainer.strategy.launcher, "procs", [])
    children = list(started)
    started.clear()
    for child in children:
        child.kill()
        child.wait()
