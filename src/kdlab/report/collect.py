"""Reading run directories: their configs, metrics, and how far each got.

Runs
    A run directory is one holding ``config.yaml`` (``kdlab.train`` writes it first). It is
    *finished* when it holds ``metrics.json``; *failed* when it, or the Hydra job directory
    of a pipeline stage, holds ``error.txt`` (written by :class:`kdlab.sweep.SweepSummary`)
    or a job log (``*.log``) with a traceback; *unfinished* otherwise, with the step of
    ``checkpoints/last.ckpt`` when there is one. A Hydra job directory (``.hydra/``) with no
    run inside it failed before it wrote its config; it is read from ``.hydra/config.yaml``.
    (Hydra appends to a job log, so a run resumed in a directory whose log holds an earlier
    traceback reads as failed until it finishes; ``error.txt`` is removed when a job starts.)

Trials
    A job of a sweep run by a sweeper other than Hydra's basic (grid) sweeper, such as the
    Optuna sweeper of ``search=<method>``, is a trial of a search; its number is the Hydra job
    number (``.hydra/hydra.yaml``), which is Optuna's trial number in a study of one sweep.
"""

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

from kdlab.rundir import DEPLOY_RECORD, RunDir, deployed_figures

FINISHED = "finished"
FAILED = "failed"
UNFINISHED = "unfinished"

# Config keys that never make a row (see kdlab.report.aggregate): the seed is averaged over,
# the others name where and how a run ran rather than what it ran.
_IGNORED_KEYS = frozenset(
    {"seed", "run_dir", "ckpt_path", "overwrite", "pipeline", "run_id", "run_group", "job_type"}
)
# ``stage_dirs``: a pipeline stage's map of every stage's directory (bookkeeping, like
# ``pipeline``), in which each stage's own entry differs.
_IGNORED_PREFIXES = ("hydra.", "logger.", "stage_dirs.")
MISSING = "-"
RUN_PLACEHOLDER = "<run>"
_TRACEBACK = "Traceback (most recent call last):"
# The only sweeper whose jobs are no trials: Hydra's grid of every combination.
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class RunRecord:
    """One run directory, finished or not.

    Args:
        path: the run directory.
        config: its config (``config.yaml``, resolved; or Hydra's unresolved
            ``.hydra/config.yaml`` for a job that failed before writing its own).
        metrics: ``metrics.json``'s content; ``None`` unless the run finished.
        status: :data:`FINISHED`, :data:`FAILED` or :data:`UNFINISHED`.
        detail: why it failed (the exception line) or how far it got.
        last_step: the global step of ``checkpoints/last.ckpt`` of an unfinished run.
        overrides: the command-line overrides of the Hydra job the run belongs to.
        job_dir: that Hydra job's directory (the run's own, or its pipeline's).
        resolved: whether ``config`` is the resolved ``config.yaml``.
        trial: the trial number of a job of a search (see the module docstring); ``None``
            for other runs.
    """

    path: Path
    config: dict
    metrics: dict | None = None
    status: str = FINISHED
    detail: str = ""
    last_step: int | None = None
    overrides: list[str] = field(default_factory=list)
    job_dir: Path | None = None
    resolved: bool = True
    trial: int | None = None

    @property
    def task(self) -> str:
        """The task name (``task.name``)."""
        return str(_lookup(self.config, "task.name", MISSING))

    @property
    def method(self) -> str:
        """The method name (``method.name``); ``deploy`` for a run that deployed a model
        instead of training one (``deploy=onnx``)."""
        if self.config.get("deploy") is not None:
            return "deploy"
        return str(_lookup(self.config, "method.name", MISSING))

    @property
    def model(self) -> str:
        """The student model name (``model.name``)."""
        return str(_lookup(self.config, "model.name", MISSING))

    @property
    def seed(self) -> int | None:
        """The run's seed."""
        return self.config.get("seed")

    @property
    def main_metric(self) -> str:
        """The metric the run was selected by (``metrics.json``'s ``main_metric``)."""
        if self.metrics and self.metrics.get("main_metric"):
            return self.metrics["main_metric"]
        return str(_lookup(self.config, "task.main_metric", MISSING))

    @property
    def main_metric_mode(self) -> str:
        """``max`` when the main metric is better higher (``task.main_metric_mode``), or
        ``min``."""
        return "min" if _lookup(self.config, "task.main_metric_mode") == "min" else "max"

    def score(self, key: str) -> float | None:
        """The student's ``metrics.json`` value ``key`` (e.g. ``val/accuracy``), if any."""
        value = ((self.metrics or {}).get("student") or {}).get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    @property
    def selected_on_val(self) -> bool:
        """Whether the validation figures are of a checkpoint selected by a validation metric
        (see :mod:`kdlab.report.aggregate`)."""
        monitor = _lookup(self.config, "callbacks.model_checkpoint.monitor")
        return (
            bool((self.metrics or {}).get("best_checkpoint"))
            and isinstance(monitor, str)
            and monitor.startswith("val")
        )

    @property
    def params(self) -> int | None:
        """The exported student's parameter count."""
        return ((self.metrics or {}).get("student") or {}).get("params")

    @property
    def speedup(self) -> float | None:
        """Teacher / student inference time per batch, for runs with a teacher."""
        return ((self.metrics or {}).get("inference") or {}).get("speedup")

    @cached_property
    def deployed(self) -> dict | None:
        """What the run's ``deploy/deploy.json`` says of its deployed model
        (:func:`kdlab.rundir.deployed_figures`), where it has one (a deploy stage, or
        ``kdlab.deploy`` run into ``<run>/deploy``); None where it has none or it is
        unreadable."""
        path = RunDir(self.path).deploy / DEPLOY_RECORD
        try:
            return deployed_figures(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @cached_property
    def flat(self) -> dict[str, str]:
        """The config as ``dotted.key -> text``, without the ignored keys, and with the run's
        own directory in string values replaced by ``<run>``."""
        # Absolute paths only: a short relative name could match inside any value. run_dir
        # is where the run was when it ran, in case the directory has moved since.
        own = {self.path.resolve()}
        run_dir = self.config.get("run_dir")
        if isinstance(run_dir, str) and Path(run_dir).is_absolute():
            own.add(Path(run_dir))
        if self.job_dir is not None and self.job_dir != self.path:
            # A pipeline stage's values also point at its siblings (${stage:teacher}).
            own |= {self.job_dir.resolve(), *(p.parent for p in list(own))}
        # Longest first, so that a directory is not replaced inside a longer one.
        own_dirs = sorted({str(d) for d in own if d.parent != d}, key=len, reverse=True)
        flat = {}
        for key, value in _flatten(self.config).items():
            if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
                continue
            if isinstance(value, str):
                for d in own_dirs:
                    value = value.replace(d, RUN_PLACEHOLDER)
            flat[key] = _text(value)
        return flat

    def values(self, keys: Sequence[str]) -> dict[str, str]:
        """This run's value of each of ``keys`` (``-`` where it has none)."""
        return {k: self.flat.get(k, MISSING) for k in keys}


def collect_runs(root: str | Path) -> list[RunRecord]:
    """Every run under ``root`` (``root`` itself included), in directory order.

    Args:
        root: a sweep directory, a pipeline's, a single run's, or any folder above them.

    Returns:
        One record per run directory (one holding ``config.yaml``), plus one per Hydra job
        directory that holds no run (a job that failed before writing its config).

    Raises:
        NotADirectoryError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    run_dirs: list[Path] = []
    job_dirs: list[Path] = []
    for here, subdirs, _ in os.walk(root):
        # Hidden folders (.hydra, .git, ...) hold no runs; Hydra's .hydra/config.yaml is read
        # through the job directory that holds it.
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        run_dir = RunDir(Path(here))
        if run_dir.config.is_file():
            run_dirs.append(run_dir.path)
        elif run_dir.hydra_config.is_file():
            job_dirs.append(run_dir.path)
    never_started = [j for j in job_dirs if not any(r.is_relative_to(j) for r in run_dirs)]
    records = [_read_run(p) for p in run_dirs] + [
        _read_run(p, resolved=False) for p in never_started
    ]
    records.sort(key=lambda r: natural_key(str(r.path)))
    return records


def _read_run(path: Path, resolved: bool = True) -> RunRecord:
    run_dir = RunDir(path)
    job_dir = _job_dir(path)
    config_file = run_dir.config if resolved else run_dir.hydra_config
    record = RunRecord(
        path=path,
        config=_load_yaml(config_file, dict),
        job_dir=job_dir,
        resolved=resolved,
        overrides=[str(o) for o in _load_yaml(RunDir(job_dir).hydra_overrides, list)]
        if job_dir
        else [],
        trial=_trial(job_dir),
    )
    if run_dir.finished:
        try:
            record.metrics = json.loads(run_dir.metrics.read_text())
            return record
        except (OSError, ValueError) as err:
            record.status, record.detail = FAILED, f"unreadable {run_dir.metrics.name}: {err}"
            return record
    error = _error_line(path, job_dir)
    if error is not None:
        record.status, record.detail = FAILED, error
        return record
    record.status = UNFINISHED
    record.last_step = _last_step(run_dir.last_checkpoint)
    if record.last_step is not None:
        record.detail = f"last checkpoint at step {record.last_step}"
    elif run_dir.last_checkpoint.is_file():
        record.detail = "last checkpoint unreadable"
    else:
        record.detail = "no checkpoint"
    return record


def _job_dir(path: Path) -> Path | None:
    """The Hydra job directory of a run: its own, or its pipeline's (one level up)."""
    for candidate in (path, path.parent):
        if RunDir(candidate).hydra_dir.is_dir():
            return candidate
    return None


def _trial(job_dir: Path | None) -> int | None:
    """The trial number of a Hydra job of a search (see the module docstring)."""
    if job_dir is None:
        return None
    hydra = _load_yaml(RunDir(job_dir).hydra_dir / "hydra.yaml", dict).get("hydra") or {}
    sweeper = _lookup(hydra, "sweeper._target_")
    num = _lookup(hydra, "job.num")
    # A single run has no job number ("???"); a file that is not Hydra's, no sweeper.
    if sweeper in (None, _BASIC_SWEEPER) or not isinstance(num, int):
        return None
    return num


def _load_yaml(path: Path, kind: type) -> dict | list:
    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a missing, half-written or foreign file reads as empty
        return kind()
    return content if isinstance(content, kind) else kind()


def _error_line(path: Path, job_dir: Path | None) -> str | None:
    """The exception line of the error recorded for a run, or ``None`` when there is none.

    A pipeline records its error in the job directory, and only its failing stage is
    unfinished there, so the job directory's record is the stage's.
    """
    for directory in dict.fromkeys(d for d in (path, job_dir) if d is not None):
        run_dir = RunDir(directory)
        if run_dir.error.is_file():
            return _exception_line(run_dir.error.read_text(errors="replace"))
        for job_log in run_dir.job_logs:
            text = job_log.read_text(errors="replace")
            if _TRACEBACK in text:
                return _exception_line(text)
    return None


def _exception_line(text: str) -> str:
    """``Type: message`` of the last traceback in ``text`` (its last line if none)."""
    tail = text[text.rfind(_TRACEBACK) :] if _TRACEBACK in text else text
    lines = [line for line in tail.splitlines() if line.strip()]
    for line in lines[1:]:
        # Frames and source lines are indented; the exception line is not.
        if not line[0].isspace():
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "error"


def _last_step(checkpoint: Path) -> int | None:
    if not checkpoint.is_file():
        return None
    import torch  # only for unfinished runs with a checkpoint: torch is slow to import

    try:
        # mmap leaves the tensors on disk: only the pickled metadata is read, whatever the
        # size of the model and optimizer states.
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if step is not None else None


def _lookup(config: dict, dotted: str, default: object = None) -> object:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        flat: dict[str, object] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node} if prefix else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def natural_key(value: object) -> tuple:
    """Numbers in text compare as numbers: job 10 after job 9, lr 5e-5 before 1e-4."""
    text = str(value)
    try:
        return (0, float(text), "")
    except ValueError:
        parts = re.split(r"(\d+)", text)
        return (1, 0.0, tuple(int(p) if p.isdigit() else p for p in parts))
