"""The layout of a run directory, one home for the names of the files a run writes, and how
a run takes its directory (:func:`claim_run_dir`: refuse, clear or resume, the run's id, its
``config.yaml``).

``kdlab.train`` writes them, ``kdlab.pipeline`` reads them to skip or resume stages,
``kdlab.compact`` and ``kdlab.report`` read them back, and the tests check them.
"""

import errno
import fnmatch
import logging
import os
import secrets
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.json"
STUDENT = "student"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
PRUNING_HISTORY = "pruning_history.json"
PRUNING_PLOT = "pruning_history.png"
PIPELINE_SUMMARY = "summary.json"
# A deploy stage's output (kdlab.deploy: ONNX files, tokenizer, deploy.json).
DEPLOY = "deploy"
DEPLOY_RECORD = "deploy.json"
# The latency tables show of a deployed model (deployed_figures): a batch of this size on
# every core.
SHOWN_BATCH, SHOWN_THREADS = 32, "all"
# The run's id (config key run_id, the W&B run id), kept so that a resumed run continues it.
RUN_ID = "run_id.txt"
# W&B's own folder (wandb.init(dir=<run dir>)): offline-run-<time>-<id>/ per start of the run.
WANDB_DIR = "wandb"
# Written by kdlab.sweep.SweepSummary when the job raised (its overrides and traceback), and
# by kdlab.pipeline in the directory of a stage that raised (its traceback).
ERROR = "error.txt"
# Hydra's record in every job directory, written by kdlab once the job has claimed it
# (JobRecord; hydra.output_subdir is null): the composed, unresolved config, Hydra's config and
# the command-line overrides of the job.
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = "config.yaml"
HYDRA_HYDRA = "hydra.yaml"
HYDRA_OVERRIDES = "overrides.yaml"
# Hydra's job log (hydra/job_logging default): ${hydra.job.name}.log, e.g. train.log.
JOB_LOG_GLOB = "*.log"
# The record of a job, written for it whether or not it ever runs: Hydra's files and the
# error of a job that failed. It neither makes a directory a run nor is foreign to one.
JOB_RECORD = (HYDRA_DIR, JOB_LOG_GLOB, ERROR)
# Everything a run writes (patterns): the above, the CSV logger's folder (conf/logger/csv) and
# the evaluation files of a split (SQuAD's predictions.json, test_null_odds.json, ...).
# overwrite=true removes these and nothing else.
RUN_FILES = (
    *JOB_RECORD,
    CONFIG,
    RUN_ID,
    METRICS,
    STUDENT,
    CHECKPOINTS,
    PRUNING_HISTORY,
    PRUNING_PLOT,
    PIPELINE_SUMMARY,
    DEPLOY,
    WANDB_DIR,
    "csv",
    "*predictions.json",
    "*null_odds.json",
    # A file or folder being written, left by a killed process (write_whole, written_whole).
    ".*.partial-*",
    ".*.replaced-*",
)
# Keys of every resolved config.yaml a run writes: a config.yaml with them is a run's, even
# without its run_id.txt (which a user may have deleted to start its W&B run afresh).
_RUN_CONFIG_KEYS = {"run_dir", "run_id", "method", "task", "model", "trainer"}


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
    def deploy(self) -> Path:
        """A deploy stage's output (``kdlab.deploy.stage``); ``deploy.json`` in it."""
        return self.path / DEPLOY

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
    def is_run(self) -> bool:
        """Whether a kdlab run has claimed the directory: it wrote ``run_id.txt`` first, then a
        ``config.yaml`` with kdlab's root keys. A ``config.yaml`` of any other shape (a user's
        own) is not a run's."""
        if self.run_id.is_file():
            return True
        try:
            keys = set(OmegaConf.load(self.config).keys()) if self.config.is_file() else set()
        except Exception:  # not YAML, not a mapping: not a config kdlab wrote
            return False
        return keys >= _RUN_CONFIG_KEYS

    def foreign_entries(self, patterns: tuple[str, ...]) -> list[Path]:
        """The entries of the directory whose names match none of ``patterns``."""
        if not self.path.is_dir():
            return []
        return [
            entry
            for entry in sorted(self.path.iterdir())
            if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
        ]

    @property
    def finished(self) -> bool:
        """Whether the run wrote its metrics (the last thing a run does)."""
        return self.metrics.is_file()

    @property
    def run_outputs(self) -> list[Path]:
        """What of a run is here: its config, checkpoints, metrics or exported student.

        A directory with any of them holds a run, which a new run may not silently replace
        (:func:`claim_run_dir`); Hydra's own files do not count, since Hydra writes
        them for every job before it starts.
        """
        marks = (self.config, self.checkpoints, self.metrics, self.student)
        return [path for path in marks if path.exists()]

    def clear(self) -> list[Path]:
        """Remove what an earlier run wrote (:data:`RUN_FILES`) but Hydra's record of the job
        about to run (``.hydra/`` and the job log): its config, checkpoints (no stale
        ``best.ckpt`` beside a new one), metrics, student, logger files, evaluation outputs
        and pruning history. Anything else in the directory is left alone.

        Returns:
            The entries removed.
        """
        kept = {self.hydra_dir, *self.job_logs, *self.foreign_entries(RUN_FILES)}
        removed = [entry for entry in sorted(self.path.iterdir()) if entry not in kept]
        for entry in removed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return removed


def claim_run_dir(cfg: DictConfig, run_dir: RunDir, *, rank_zero: bool) -> str | None:
    """Take ``run_dir`` for this run; returns the checkpoint it resumes from (None: it starts
    afresh).

    Rank 0 (or the only process) checks what the directory holds (a run there is refused,
    resumed or cleared: :func:`_refuse_or_clear`), creates it, sets ``cfg.run_id``
    (:func:`choose_run_id`) and writes ``config.yaml`` (:func:`save_config`). Any other rank
    reads and writes nothing there: a DDP process that rank 0 launched once it had written
    ``config.yaml``, or one that SLURM started beside rank 0, which may be clearing or writing
    the directory now, only needs the checkpoint to resume from (its logger logs nothing).

    Args:
        cfg: the run's validated config (``ckpt_path``, ``overwrite``; ``run_id`` is set).
        run_dir: the run directory.
        rank_zero: whether this process is global rank 0.

    Raises:
        ConfigError: before anything loads, for a run that would replace another's files,
            resume a finished run, delete the checkpoint it resumes from, or resume from a
            checkpoint that does not exist.
    """
    if not rank_zero:
        return _checkpoint_to_resume(cfg, run_dir)
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise ConfigError(
            f"run_dir {run_dir.path} is a file, not a directory: set hydra.run.dir to a "
            "directory (a new one, or a run's to resume it)."
        )
    _refuse_or_clear(cfg, run_dir)
    ckpt_path = _checkpoint_to_resume(cfg, run_dir)
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        cfg.run_id = choose_run_id(run_dir, resuming=ckpt_path is not None)
        save_config(cfg, run_dir)
    except OSError as error:  # read-only, a full disk, ...: before anything loads
        raise ConfigError(
            f"run_dir {run_dir.path} cannot be written ({error.strerror or error}): make it "
            "writable, free space there, or set hydra.run.dir to another directory."
        ) from error
    return ckpt_path


def _refuse_or_clear(cfg: DictConfig, run_dir: RunDir) -> None:
    """A directory that already holds a run (:attr:`RunDir.run_outputs`) is never silently
    reused. It is resumed with ``ckpt_path=last`` (or a checkpoint in its own
    ``checkpoints/``), only while that run has not finished; or, with ``overwrite=true``,
    its files are removed first (:meth:`RunDir.clear`), provided it holds nothing else
    (:data:`RUN_FILES`). A directory that is not a run's (:attr:`RunDir.is_run`) is used only
    if it holds no more than a job's record (:data:`JOB_RECORD`). Anything else is refused."""
    resumes_here = cfg.ckpt_path is not None and (
        cfg.ckpt_path == "last" or _is_within(Path(cfg.ckpt_path), run_dir.checkpoints)
    )
    if cfg.overwrite and resumes_here:
        raise ConfigError(
            f"overwrite=true would delete the checkpoint ckpt_path={cfg.ckpt_path} resumes "
            "from: drop overwrite=true to resume, or drop ckpt_path to start afresh."
        )
    if not run_dir.is_run:
        foreign = run_dir.foreign_entries(JOB_RECORD)
        if foreign:
            raise ConfigError(
                f"run_dir {run_dir.path} holds files that are not a kdlab run's "
                f"({_names(foreign)}; a run writes {RUN_ID} first): kdlab neither writes among "
                "nor removes them. Set another hydra.run.dir, or move them out."
            )
        return
    found = run_dir.run_outputs
    if found and resumes_here and run_dir.finished:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: the run in {run_dir.path} is finished ({run_dir.metrics} "
            "exists), there is nothing to resume. To train it again from scratch add "
            "overwrite=true; to train on from its last checkpoint, write to another "
            f"hydra.run.dir with ckpt_path={run_dir.last_checkpoint}."
        )
    if found and not resumes_here:
        if not cfg.overwrite:
            names = ", ".join(path.name for path in found)
            raise ConfigError(
                f"run_dir {run_dir.path} already holds a run ({names}). Resume it with "
                "ckpt_path=last (if it has not finished), or replace it with overwrite=true "
                "(its files are removed first); or set another hydra.run.dir."
            )
        foreign = run_dir.foreign_entries(RUN_FILES)
        if foreign:
            raise ConfigError(
                f"overwrite=true removes only what a kdlab run wrote, and run_dir "
                f"{run_dir.path} also holds {_names(foreign)}: move them out, or set another "
                "hydra.run.dir."
            )
        log.info("overwrite=true: removing the earlier run in %s.", run_dir.path)
        run_dir.clear()


def _names(entries: list[Path]) -> str:
    return ", ".join(entry.name + ("/" if entry.is_dir() else "") for entry in entries)


def _is_within(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _checkpoint_to_resume(cfg: DictConfig, run_dir: RunDir) -> str | None:
    """The checkpoint ``ckpt_path`` names (``last``: the run directory's ``last.ckpt``).

    Raises:
        ConfigError: if that checkpoint does not exist (resuming nothing must not silently
            start a new run), or is truncated (a write the run did not finish).
    """
    if cfg.ckpt_path is None:
        return None
    path = run_dir.last_checkpoint if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: there is no checkpoint {path}. To resume, point "
            "hydra.run.dir at the run that wrote checkpoints/last.ckpt (or ckpt_path at a "
            "checkpoint file); to start afresh, leave ckpt_path unset."
        )
    problem = unreadable_checkpoint(path)
    if problem:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: checkpoint {path} cannot be read: {problem}. Resume "
            f"from another checkpoint (ckpt_path={run_dir.best_checkpoint}, if it reads), or "
            "start afresh: leave ckpt_path unset (with overwrite=true in this hydra.run.dir)."
        )
    return str(path)


def choose_run_id(run_dir: RunDir, resuming: bool) -> str:
    """The run's id (``run_id``, the W&B run id): the one stored in its directory when it
    resumes, else a new one, stored there for a later resume. Rank zero's alone."""
    stored = run_dir.run_id.read_text().strip() if run_dir.run_id.is_file() else None
    if resuming and stored:
        return stored
    run_id = secrets.token_hex(6)  # 12 characters of [0-9a-f]: W&B accepts it as a run id
    run_dir.run_id.write_text(run_id + "\n")
    return run_id


def save_config(cfg: DictConfig, run_dir: RunDir) -> None:
    """Writes the resolved ``cfg`` to the run's ``config.yaml``.

    Rank 0 alone writes it, whole or not at all (:func:`write_whole`): the DDP processes that
    Lightning starts compose their config from it (:mod:`kdlab.launch`), and a resumed run
    rewrites the file while a reader may be looking.
    """
    write_whole(run_dir.config, lambda partial: OmegaConf.save(cfg, partial, resolve=True))


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: a hidden sibling (the same
    file system, so the rename is atomic), one per process."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` writes the file, which then replaces ``path`` by a rename: an
    interruption or a full disk leaves the previous ``path`` (or none) and no partial file.

    Raises:
        OSError: from ``write``; errno 28 (a full disk) says so, naming the directory.
    """
    partial = _partial(path)
    try:
        write(partial)
        partial.replace(path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise _disk_full(error, path) from error
        raise


def check_output_dir(out_dir: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuses an ``out_dir`` whose content a command writing it whole (:func:`written_whole`)
    would replace unasked, or one holding what the command reads.

    Args:
        out_dir: the directory the command writes.
        inputs: what the command reads, by description (``"the checkpoint"``).
        overwrite: the user asked to replace what ``out_dir`` holds.

    Raises:
        ConfigError: for a file, a non-empty directory without ``overwrite`` (naming what it
            holds), or one that holds an input.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not an output directory.")
    held = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise ConfigError(
            f"{out_dir} is not empty ({_names(held)}): pass --overwrite to replace what it "
            "holds, or choose another output directory."
        )
    for what, path in inputs.items():
        if _is_within(path, out_dir):
            raise ConfigError(
                f"{out_dir} holds {what} {path}: --overwrite would delete it first; choose "
                "another output directory."
            )


@contextmanager
def written_whole(directory: Path) -> Iterator[Path]:
    """Yields a new hidden sibling folder of ``directory`` to write into; once the block ends,
    it replaces ``directory`` (an earlier one is removed only then). If the block raises
    (Ctrl-C, a full disk), ``directory`` is as it was and the sibling is removed.

    Raises:
        OSError: from the block; errno 28 (a full disk) says so, naming the directory.
    """
    partial = _partial(directory)
    shutil.rmtree(partial, ignore_errors=True)  # left by a process killed with this pid
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if _is_disk_full(error):
            raise _disk_full(error, directory) from error
        raise
    if directory.exists():
        replaced = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
        directory.rename(replaced)
        partial.rename(directory)
        shutil.rmtree(replaced)
    else:
        partial.rename(directory)


def deployed_figures(record: dict) -> dict:
    """What tables show of a ``deploy.json`` (``record``): the deployed model's int8 ONNX file
    (its fp32 one where there is none) as ``runtime`` and ``file``, its ``bytes``, its
    latency ``ms`` at batch :data:`SHOWN_BATCH` on every core (None where not timed) and its
    dev ``metrics`` (``{}`` where not evaluated). Read by the deploy stage
    (``kdlab.deploy.stage``) and ``kdlab.report``."""
    model = record["model"]
    runtime = "onnx_int8" if "onnx_int8" in model["files"] else "onnx_fp32"
    return {
        "runtime": runtime,
        "file": model["files"][runtime],
        "bytes": model["bytes"][runtime],
        "ms": shown_latency(record, "model", runtime),
        "batch": SHOWN_BATCH,
        "threads": SHOWN_THREADS,
        "metrics": (model.get("eval") or {}).get(runtime) or {},
    }


def shown_latency(record: dict, model: str, runtime: str) -> float | None:
    """The median latency in a ``deploy.json`` (``record``) of ``model`` (``model``,
    ``reference``) under ``runtime`` at batch :data:`SHOWN_BATCH` on every core; None where
    it was not timed."""
    shown = (model, runtime, SHOWN_BATCH, SHOWN_THREADS)
    rows = (record.get("latency") or {}).get("rows", [])
    keys = ("model", "runtime", "batch", "threads")
    return next((r["ms"] for r in rows if tuple(r[k] for k in keys) == shown), None)


@dataclass(frozen=True)
class JobRecord:
    """Hydra's record of a job (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
    which Hydra would write before the job runs (``hydra.output_subdir``). kdlab writes it
    itself, once the job has claimed its directory: a command refused before that (a run
    it may not replace) leaves that directory as it was.

    Args:
        config: the job's composed config, unresolved, as the job received it.
        hydra: Hydra's config of the job (``hydra:`` at the root).
        overrides: the job's command-line overrides.
    """

    config: str
    hydra: str
    overrides: str

    @classmethod
    def of_job(cls, cfg: DictConfig) -> "JobRecord":
        """The record of the running Hydra job whose config is ``cfg``; taken before the job
        changes ``cfg``."""
        hydra_cfg = HydraConfig.instance().cfg
        return cls(
            config=OmegaConf.to_yaml(cfg),
            hydra=OmegaConf.to_yaml(hydra_cfg),
            overrides=OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
        )

    def write(self, job_dir: RunDir) -> None:
        """Writes the three files into ``job_dir``'s ``.hydra/``, each whole."""
        job_dir.hydra_dir.mkdir(parents=True, exist_ok=True)
        files = {
            HYDRA_CONFIG: self.config,
            HYDRA_HYDRA: self.hydra,
            HYDRA_OVERRIDES: self.overrides,
        }
        for name, text in files.items():
            write_whole(
                job_dir.hydra_dir / name, lambda partial, text=text: partial.write_text(text)
            )


def holds_anything(run_dir: RunDir) -> bool:
    """Whether ``run_dir`` holds more than a job's record (:data:`JOB_RECORD`): a run, or
    files of the user's. A job that did not claim such a directory must leave it as it was."""
    return run_dir.is_run or bool(run_dir.foreign_entries(JOB_RECORD))


def record_stamp(run_dir: RunDir) -> tuple[int, int] | None:
    """Identifies the job record in ``run_dir`` (None: there is none): a job that writes its
    record (:meth:`JobRecord.write`) changes it, one refused before that does not."""
    try:
        stat = (run_dir.hydra_dir / HYDRA_HYDRA).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def record_error(run_dir: RunDir, text: str) -> None:
    """Writes ``text`` (a traceback) to the run's ``error.txt``, whole; where it cannot be
    written (a full disk, a read-only folder), the log gets it instead."""
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_whole(run_dir.error, lambda partial: partial.write_text(text))
    except OSError as error:
        log.error("%s could not be written (%s); what it records:\n%s", run_dir.error, error, text)


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


def _disk_full(error: OSError, path: Path) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"No space left on the device of {path.parent} while writing {path.name}: the previous "
        f"{path.name} (if any) is kept as it was. Free space there, then resume or re-run.",
        str(path),
    )


def unreadable_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None: it is). Cheap: ``torch.save`` writes
    a zip archive whose directory is at its end, which a truncated file lacks; only that
    directory is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "it is a zip archive, but not one torch.save wrote"
    except (zipfile.BadZipFile, OSError) as error:
        return f"it is truncated or not a torch checkpoint ({error})"
    return None


class RunDirCheck(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): a ``hydra.run.dir`` or
    ``hydra.sweep.dir`` that is a file stops the command with a message naming it, before
    Hydra creates the job's directory (where it failed with a bare ``FileExistsError``)."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        """Checks ``hydra.run.dir``."""
        _exit_if_file(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        """Checks ``hydra.sweep.dir``."""
        _exit_if_file(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def _exit_if_file(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        log.error(
            "%s=%s is a file, not a directory: set %s to a directory (a new one, or a run's "
            "to resume it).",
            key,
            path,
            key,
        )
        sys.exit(1)  # exceptions raised in Hydra callbacks become warnings
