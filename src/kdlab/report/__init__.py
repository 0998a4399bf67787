"""Tables of runs: the summary printed at the end of a run, and the report of many runs.

:func:`summary_table` is what ``kdlab.train`` prints when a run (or a pipeline stage) ends.

The rest builds a paper-style report of every run under a directory (a Hydra sweep,
pipelines, single runs, at any depth)::

    python -m kdlab.report multirun/2026-12-01_10-00-00 [--out DIR] [--metric NAME]

It writes ``report.md``, ``report.csv`` and ``report.png`` (in ``--out``, default the
directory itself) and prints the tables. As a library: :func:`collect_runs` reads the run
directories, :func:`aggregate` makes the rows, :func:`build_report` does both, and
:func:`write_report` (or :func:`write_markdown`, :func:`write_csv`, :func:`write_plot`) writes
them; :func:`report_tables` gives the rich tables.

Runs
    A run directory is one holding ``config.yaml`` (``kdlab.train`` writes it first). It is
    *finished* when it holds ``metrics.json``; *failed* when it, or the Hydra job directory
    of a pipeline stage, holds ``error.txt`` (written by :class:`kdlab.sweep.SweepSummary`)
    or a job log (``*.log``) with a traceback; *unfinished* otherwise, with the step of
    ``checkpoints/last.ckpt`` when there is one. A Hydra job directory (``.hydra/``) with no
    run inside it failed before it wrote its config; it is read from ``.hydra/config.yaml``.
    (Hydra appends to a job log, so a run resumed in a directory whose log holds an earlier
    traceback reads as failed until it finishes; ``error.txt`` is removed when a job starts.)

Rows: one per task x method x model x varying config keys
    A config key becomes a column when it takes different values among the runs of one
    task x method x model (so keys that only follow the task, method or model, such as
    ``task.metrics`` or ``method._target_``, do not), after leaving out

    * ``seed`` (the rows average over it), ``run_dir``, ``ckpt_path`` and ``overwrite``
      (resuming or replacing is no experimental factor), ``pipeline``, the logger's filing
      of the run (``run_id``, ``run_group``, ``job_type``) and anything under ``hydra`` or
      ``logger``;
    * the run's own directory inside string values: ``<run>/checkpoints`` and
      ``<run>/teacher/student`` (a pipeline's own teacher) are the same in every run;
    * keys that follow the seed: every seed of the task x method x model has a single value
      of the key, though the key varies (per-seed names and paths such as ``logger.name``,
      ``...-seed3``, or a per-seed ``teacher.path``; ``${seed}`` interpolations). A factor
      that was only ever changed together with the seed cannot be told apart from it, and
      is averaged over too.

    A key a run does not have shows as ``-``.

Values: the metric on validation and test, mean ± sample standard deviation (n - 1) over
    the runs of the row, and n; one run shows no standard deviation. The metric is each
    run's ``main_metric`` unless ``--metric`` names another.

    Validation figures marked † come from checkpoints selected on that same validation set,
    which for GLUE is the dev set: ``kdlab.train`` evaluates the best checkpoint of
    ``callbacks.model_checkpoint``, which monitors ``val/<task.main_metric>``. A run is marked
    when its ``metrics.json`` names a ``best_checkpoint`` and that callback monitors a ``val``
    metric (so not a pruned student, evaluated as training left it, nor a run without that
    callback); a row when any of its runs is. Such figures tend to overestimate held-out
    performance.

GLUE scores: rows per method x model (x varying keys) that has their tasks, on the runs'
    0-1 scale, on the validation (dev) sets, and on test only where all their tasks have test
    metrics. A task's score is the unweighted mean of its GLUE metrics, as the GLUE benchmark
    scores tasks with several metrics: CoLA Matthews correlation; MRPC and QQP F1 and
    accuracy; STS-B Pearson and Spearman; MNLI matched and mismatched accuracy (its two dev
    sets count as two metrics of one task); SST-2, QNLI, RTE, WNLI accuracy.

    * ``GLUE (no WNLI)``: the mean of the scores of the eight tasks CoLA, SST-2, MRPC, STS-B,
      QQP, MNLI, QNLI, RTE, leaving WNLI out as BERT's average and MiniLM's table do. Papers
      differ in the rest, so compare with a paper's average recomputed from its per-task
      figures by this rule: BERT's (on test) counts MNLI-m and -mm as two of nine figures,
      one metric per task (MRPC and QQP F1, STS-B Spearman); MiniLM's dev table has neither
      STS-B nor MNLI-mm; DistilBERT's dev score counts WNLI.
    * ``GLUE``: the GLUE benchmark's score, the mean of the scores of all nine tasks.

    They ignore ``--metric``. Their standard deviation is over per-seed scores, so only when
    every task has the same seeds; otherwise n is the smallest number of runs of a task.
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from kdlab.rundir import CONFIG, RunDir

MARKDOWN = "report.md"
CSV = "report.csv"
PLOT = "report.png"

FINISHED = "finished"
FAILED = "failed"
UNFINISHED = "unfinished"

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
GLUE_ROW = "GLUE"
GLUE_NO_WNLI_ROW = "GLUE (no WNLI)"
# The GLUE averages and their tasks, in the order of their rows (see the module docstring).
GLUE_AVERAGES: dict[str, tuple[str, ...]] = {
    GLUE_NO_WNLI_ROW: tuple(t for t in GLUE_TASKS if t != "wnli"),
    GLUE_ROW: GLUE_TASKS,
}
GLUE_METRIC = "GLUE score"
# Marks validation figures of checkpoints selected on the validation set.
SELECTED_ON_VAL = "†"
# Each GLUE task's metrics, as metrics.json keys after the split ("val", "test"): the task's
# score is their unweighted mean. MNLI's mismatched set is validated as "val_mm".
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("/matthews",),
    "sst2": ("/accuracy",),
    "mrpc": ("/f1", "/accuracy"),
    "qqp": ("/f1", "/accuracy"),
    "stsb": ("/pearson", "/spearman"),
    "mnli": ("/accuracy", "_mm/accuracy"),
    "qnli": ("/accuracy",),
    "rte": ("/accuracy",),
    "wnli": ("/accuracy",),
}

# Config keys that never make a row: the seed is averaged over, the others name where and how
# a run ran rather than what it ran.
_IGNORED_KEYS = frozenset(
    {"seed", "run_dir", "ckpt_path", "overwrite", "pipeline", "run_id", "run_group", "job_type"}
)
# ``stage_dirs``: a pipeline stage's map of every stage's directory (bookkeeping, like
# ``pipeline``), in which each stage's own entry differs.
_IGNORED_PREFIXES = ("hydra.", "logger.", "stage_dirs.")
# The row's own columns.
_IDENTITY_KEYS = frozenset({"task.name", "method.name", "model.name"})
MISSING = "-"
RUN_PLACEHOLDER = "<run>"
_TRACEBACK = "Traceback (most recent call last):"


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (``None`` for one value) and count of some values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat | None":
        """The statistics of the values that are not ``None`` (``None`` if there are none)."""
        kept = [float(v) for v in values if v is not None]
        if not kept:
            return None
        std = statistics.stdev(kept) if len(kept) > 1 else None
        return cls(statistics.fmean(kept), std, len(kept))

    def __str__(self) -> str:
        if self.std is None:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.std:.4f}"


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

    @property
    def task(self) -> str:
        """The task name (``task.name``)."""
        return str(_lookup(self.config, "task.name", MISSING))

    @property
    def method(self) -> str:
        """The method name (``method.name``)."""
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

    def score(self, key: str) -> float | None:
        """The student's ``metrics.json`` value ``key`` (e.g. ``val/accuracy``), if any."""
        value = ((self.metrics or {}).get("student") or {}).get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    @property
    def selected_on_val(self) -> bool:
        """Whether the validation figures are of a checkpoint selected by a validation metric
        (see the module docstring)."""
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


@dataclass
class Row:
    """One line of the report: the runs of one task x method x model x varying keys.

    Attributes:
        task: the task, or a GLUE average (:data:`GLUE_AVERAGES`).
        method: the method.
        model: the student model.
        extra: the value of each varying config key.
        metric: the metric name (``accuracy``, ..., or :data:`GLUE_METRIC`).
        val: the metric on validation over the runs.
        test: the metric on test, where the runs have one.
        params: mean student parameter count.
        speedup: mean teacher/student inference-time ratio (runs with a teacher).
        seeds: the seeds of the runs.
        selected_on_val: whether ``val`` comes (in part) from checkpoints selected on the
            validation set.
    """

    task: str
    method: str
    model: str
    extra: dict[str, str]
    metric: str
    val: Stat | None
    test: Stat | None
    params: float | None
    speedup: float | None
    seeds: list = field(default_factory=list)
    selected_on_val: bool = False


@dataclass
class Report:
    """The runs under a directory and their rows.

    Attributes:
        root: the directory the runs were collected from.
        records: every run found.
        keys: the varying config keys (the extra columns).
        rows: the aggregated rows, GLUE averages last.
    """

    root: Path
    records: list[RunRecord]
    keys: list[str]
    rows: list[Row]

    @property
    def incomplete(self) -> list[RunRecord]:
        """The failed and unfinished runs."""
        return [r for r in self.records if r.status != FINISHED]

    @property
    def counts(self) -> Counter:
        """The number of runs by status."""
        return Counter(r.status for r in self.records)


# --------------------------------------------------------------------------------------------
# The end-of-run summary


def summary_table(title: str, metrics: dict) -> Table:
    """Teacher and student side by side: main metric on validation and test, parameters,
    inference time per batch and speed-up, and where the student was exported.

    Args:
        title: table title (the stage or run name).
        metrics: the content of a run's ``metrics.json``.
    """
    main = metrics["main_metric"]
    table = Table(title=title, caption=f"exported student: {metrics['student']['path']}")
    for column in ("model", f"val {main}", f"test {main}", "parameters", "ms / batch", "speed-up"):
        table.add_column(column, justify="left" if column == "model" else "right")
    speed = metrics.get("inference") or {}
    for role in ("teacher", "student"):
        row = metrics.get(role)
        if row is None:
            continue
        ms = speed.get(f"{role}_ms_per_batch")
        table.add_row(
            f"{role} ({row['name']})",
            _fmt(row.get(f"val/{main}")),
            _fmt(row.get(f"test/{main}")),
            _count(row["params"]),
            "-" if ms is None else f"{ms:.1f}",
            f"{speed['speedup']:.2f}x" if role == "student" and "speedup" in speed else "-",
        )
    return table


# --------------------------------------------------------------------------------------------
# Collecting runs


def pipeline_table(title: str, rows: list[dict]) -> Table:
    """The stages of a pipeline (``kdlab.pipeline.pipeline_summary``) in one table."""
    table = Table(title=title)
    for column in ("stage", "method", "student", "metric", "val", "test", "parameters", "time"):
        table.add_column(column, justify="left" if column in ("stage", "method") else "right")
    for row in rows:
        table.add_row(
            row["stage"] + ("" if row["ran"] else " (done before)"),
            row["method"],
            row["model"],
            row["main_metric"],
            _fmt(row["val"]),
            _fmt(row["test"]),
            _count(row["params"]),
            "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f} s",
        )
    return table


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
        files = RunDir(Path(here))
        if files.config.is_file():
            run_dirs.append(files.path)
        elif files.hydra_config.is_file():
            job_dirs.append(files.path)
    never_started = [j for j in job_dirs if not any(r.is_relative_to(j) for r in run_dirs)]
    records = [_read_run(p) for p in run_dirs] + [
        _read_run(p, resolved=False) for p in never_started
    ]
    records.sort(key=lambda r: _natural_key(str(r.path)))
    return records


def _read_run(path: Path, resolved: bool = True) -> RunRecord:
    files = RunDir(path)
    job_dir = _job_dir(path)
    config_file = files.config if resolved else files.hydra_config
    record = RunRecord(
        path=path,
        config=_load_yaml(config_file, dict),
        job_dir=job_dir,
        resolved=resolved,
        overrides=[str(o) for o in _load_yaml(RunDir(job_dir).hydra_overrides, list)]
        if job_dir
        else [],
    )
    if files.finished:
        try:
            record.metrics = json.loads(files.metrics.read_text())
            return record
        except (OSError, ValueError) as err:
            record.status, record.detail = FAILED, f"unreadable {files.metrics.name}: {err}"
            return record
    error = _error_line(path, job_dir)
    if error is not None:
        record.status, record.detail = FAILED, error
        return record
    record.status = UNFINISHED
    record.last_step = _last_step(files.last_checkpoint)
    if record.last_step is not None:
        record.detail = f"last checkpoint at step {record.last_step}"
    elif files.last_checkpoint.is_file():
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
        files = RunDir(directory)
        if files.error.is_file():
            return _exception_line(files.error.read_text(errors="replace"))
        for job_log in files.job_logs:
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


# --------------------------------------------------------------------------------------------
# Aggregating


def varying_keys(records: Sequence[RunRecord]) -> list[str]:
    """The config keys that distinguish runs of the same task x method x model.

    See the module docstring for the rule. Records read from Hydra's unresolved config
    (jobs that never started) are left out: their interpolations would differ from every
    resolved value.

    Args:
        records: the runs, as :func:`collect_runs` returns them.

    Returns:
        The keys, sorted.
    """
    groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for record in records:
        if record.resolved:
            groups[(record.task, record.method, record.model)].append(record)
    keys: set[str] = set()
    for runs in groups.values():
        for key in set().union(*(r.flat for r in runs)) - _IDENTITY_KEYS - keys:
            values = [r.flat.get(key, MISSING) for r in runs]
            if len(set(values)) > 1 and not _follows_seed(runs, values):
                keys.add(key)
    return sorted(keys)


def _follows_seed(runs: Sequence[RunRecord], values: Sequence[str]) -> bool:
    """Whether each seed has one value of the key (and there are several seeds)."""
    by_seed: dict[object, set[str]] = defaultdict(set)
    for run, value in zip(runs, values, strict=True):
        by_seed[run.seed].add(value)
    return len(by_seed) > 1 and all(len(v) == 1 for v in by_seed.values())


def aggregate(
    records: Sequence[RunRecord],
    metric: str | None = None,
    keys: Sequence[str] | None = None,
) -> list[Row]:
    """The report's rows: finished runs grouped by task x method x model x ``keys``.

    Args:
        records: the runs (unfinished and failed ones are skipped).
        metric: the metric to report; default each run's ``main_metric``.
        keys: the extra grouping keys; default :func:`varying_keys` of ``records``.

    Returns:
        One row per group, ordered by task (GLUE order first), method, model and keys, then
        a row per GLUE average and method x model x keys that has the average's tasks.
    """
    keys = varying_keys(records) if keys is None else list(keys)
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        if record.status == FINISHED:
            extra = tuple(record.values(keys).items())
            groups[(record.task, record.method, record.model, extra)].append(record)
    rows = []
    for (task, method, model, extra), runs in groups.items():
        name = metric or Counter(r.main_metric for r in runs).most_common(1)[0][0]
        rows.append(
            Row(
                task=task,
                method=method,
                model=model,
                extra=dict(extra),
                metric=name,
                val=Stat.of(r.score(f"val/{name}") for r in runs),
                test=Stat.of(r.score(f"test/{name}") for r in runs),
                params=_mean(r.params for r in runs),
                speedup=_mean(r.speedup for r in runs),
                seeds=sorted((r.seed for r in runs), key=_natural_key),
                selected_on_val=any(r.selected_on_val for r in runs),
            )
        )
    rows.sort(key=_row_order)
    return rows + _glue_rows(groups)


def glue_task_score(metrics: dict, task: str, split: str = "val") -> float | None:
    """A GLUE task's score in one run: the unweighted mean of its GLUE metrics.

    Args:
        metrics: the run's ``metrics.json`` content.
        task: a GLUE task name (``mrpc``, ...).
        split: ``val`` or ``test``.

    Returns:
        The score, the main metric when the run has none of the task's GLUE metrics, or
        ``None`` when it has neither.
    """
    student = metrics.get("student") or {}
    found = [student[split + suffix] for suffix in GLUE_METRICS[task] if split + suffix in student]
    if not found:
        main = student.get(f"{split}/{metrics.get('main_metric')}")
        return None if main is None else float(main)
    return statistics.fmean(found)


def _glue_rows(groups: dict[tuple, list[RunRecord]]) -> list[Row]:
    by_combo: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(dict)
    for (task, method, model, extra), runs in groups.items():
        if task in GLUE_TASKS:
            by_combo[(method, model, extra)][task] = runs
    rows = []
    for (method, model, extra), all_tasks in by_combo.items():
        for average, names in GLUE_AVERAGES.items():
            if not set(names) <= set(all_tasks):
                continue
            tasks = {name: all_tasks[name] for name in names}
            val, test = (_glue_stat(tasks, split) for split in ("val", "test"))
            rows.append(
                Row(
                    task=average,
                    method=method,
                    model=model,
                    extra=dict(extra),
                    metric=GLUE_METRIC,
                    val=val,
                    test=test,
                    params=_mean(_mean(r.params for r in runs) for runs in tasks.values()),
                    speedup=_mean(_mean(r.speedup for r in runs) for runs in tasks.values()),
                    seeds=sorted(
                        set.intersection(*({r.seed for r in runs} for runs in tasks.values())),
                        key=_natural_key,
                    ),
                    selected_on_val=any(r.selected_on_val for runs in tasks.values() for r in runs),
                )
            )
    rows.sort(key=_row_order)
    return rows


def _glue_stat(tasks: dict[str, list[RunRecord]], split: str) -> Stat | None:
    scores = {
        task: [(r.seed, glue_task_score(r.metrics or {}, task, split)) for r in runs]
        for task, runs in tasks.items()
    }
    if any(score is None for pairs in scores.values() for _, score in pairs):
        return None
    task_means = [statistics.fmean(s for _, s in pairs) for pairs in scores.values()]
    seed_lists = [
        sorted((seed for seed, _ in pairs), key=_natural_key) for pairs in scores.values()
    ]
    same_seeds = all(s == seed_lists[0] for s in seed_lists) and len(set(seed_lists[0])) == len(
        seed_lists[0]
    )
    if same_seeds and len(seed_lists[0]) > 1:
        # One GLUE score per seed; their mean equals the mean of the task means.
        per_seed = [
            statistics.fmean(dict(pairs)[seed] for pairs in scores.values())
            for seed in seed_lists[0]
        ]
        return Stat(statistics.fmean(per_seed), statistics.stdev(per_seed), len(per_seed))
    return Stat(statistics.fmean(task_means), None, min(len(s) for s in seed_lists))


def build_report(root: str | Path, metric: str | None = None) -> Report:
    """:func:`collect_runs` and :func:`aggregate` of one directory.

    Args:
        root: the directory to collect runs from.
        metric: the metric to report instead of each run's ``main_metric``.
    """
    records = collect_runs(root)
    keys = varying_keys(records)
    return Report(Path(root), records, keys, aggregate(records, metric, keys))


# --------------------------------------------------------------------------------------------
# Writers


def report_tables(report: Report) -> list[Table]:
    """Rich tables: the rows, and the failed and unfinished runs when there are any."""
    counts = report.counts
    caption = "mean ± sample std over the runs (seeds) of each row"
    if any(r.selected_on_val for r in report.rows):
        caption += f"\n{SELECTED_ON_VAL} {_SELECTED_NOTE}"
    main = Table(
        title=f"{report.root}: {counts[FINISHED]} finished, {counts[FAILED]} failed, "
        f"{counts[UNFINISHED]} unfinished",
        caption=caption,
    )
    header = _row_header(report.keys)
    for column in header:
        main.add_column(column, justify="right" if column in _NUMERIC_COLUMNS else "left")
    for row in report.rows:
        main.add_row(*_row_cells(row, report.keys))
    tables = [main]
    if report.incomplete:
        other = Table(title="failed and unfinished runs")
        for column in _incomplete_header(report.keys):
            other.add_column(column)
        for record in report.incomplete:
            other.add_row(*_incomplete_cells(record, report))
        tables.append(other)
    return tables


def write_markdown(report: Report, path: str | Path) -> Path:
    """The tables as GitHub Markdown, with a line on how they were computed."""
    path = Path(path)
    counts = report.counts
    lines = [
        f"# Report: {report.root}",
        "",
        f"{len(report.records)} runs: {counts[FINISHED]} finished, {counts[FAILED]} failed, "
        f"{counts[UNFINISHED]} unfinished. Values are the mean ± sample standard deviation "
        "(n − 1) over the runs (seeds) of each row; n is their number.",
    ]
    if any(r.task in GLUE_AVERAGES for r in report.rows):
        lines.append(
            "GLUE: mean over the nine tasks of each task's score, the mean of its GLUE metrics "
            "(CoLA Matthews; MRPC, QQP F1 and accuracy; STS-B Pearson and Spearman; MNLI "
            "matched and mismatched accuracy; the others accuracy). GLUE (no WNLI): the same "
            "over the eight tasks other than WNLI, as distillation papers average dev sets."
        )
    lines += [
        "",
        *_markdown_table(
            _row_header(report.keys), [_row_cells(r, report.keys) for r in report.rows]
        ),
    ]
    if any(r.selected_on_val for r in report.rows):
        lines += ["", f"{SELECTED_ON_VAL} {_SELECTED_NOTE}"]
    if report.incomplete:
        lines += ["", "## Failed and unfinished runs", ""]
        lines += _markdown_table(
            _incomplete_header(report.keys),
            [_incomplete_cells(r, report) for r in report.incomplete],
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(report: Report, path: str | Path) -> Path:
    """The rows with full-precision numbers, one column per statistic (failed and unfinished
    runs are in the Markdown only)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "task",
                "method",
                "model",
                *report.keys,
                "metric",
                "val_mean",
                "val_std",
                "val_n",
                "selected_on_val",
                "test_mean",
                "test_std",
                "test_n",
                "params",
                "speedup",
                "seeds",
            ]
        )
        for row in report.rows:
            writer.writerow(
                [
                    row.task,
                    row.method,
                    row.model,
                    *(row.extra[k] for k in report.keys),
                    row.metric,
                    *_stat_fields(row.val),
                    row.selected_on_val,
                    *_stat_fields(row.test),
                    "" if row.params is None else row.params,
                    "" if row.speedup is None else row.speedup,
                    " ".join(str(s) for s in row.seeds),
                ]
            )
    return path


def write_plot(report: Report, path: str | Path) -> Path | None:
    """The validation metric by method with standard-deviation error bars, one panel per task
    (and one for the GLUE score); ``None`` (nothing written) when no row has a value."""
    rows = [r for r in report.rows if r.val is not None]
    if not rows:
        return None
    # A Figure on the Agg canvas directly: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    # Label bars by what differs between rows: the method always, the model and keys if they vary.
    label_fields = [f for f in ("model", *report.keys) if len({_field(r, f) for r in rows}) > 1]
    per_panel = max(sum(r.task == t for r in rows) for t in tasks)
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = Figure(figsize=(max(3.5, 0.9 * per_panel + 1.5) * ncols, 3.6 * nrows), layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks, strict=False):
        panel = [r for r in rows if r.task == task]
        x = list(range(len(panel)))
        means = [r.val.mean for r in panel]
        ax.bar(x, means, color=[f"C{methods.index(r.method) % 10}" for r in panel])
        # Error bars only where there is a standard deviation (n > 1).
        spread = [i for i, r in enumerate(panel) if r.val.std is not None]
        ax.errorbar(
            spread,
            [means[i] for i in spread],
            yerr=[panel[i].val.std for i in spread],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
        labels = [
            "\n".join(
                [
                    r.method,
                    *(_short(f, _field(r, f)) for f in label_fields if _field(r, f) != MISSING),
                ]
            )
            for r in panel
        ]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(task)
        ax.set_ylabel(f"val {panel[0].metric}" if len({r.metric for r in panel}) == 1 else "val")
        for i, r in enumerate(panel):
            ax.annotate(
                f"n={r.val.n}",
                (i, r.val.mean + (r.val.std or 0.0)),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.margins(y=0.12)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(report: Report, out: str | Path) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and ``report.png`` (when there is something to plot).

    Args:
        report: what :func:`build_report` returned.
        out: the folder to write into (created if missing).

    Returns:
        The written files by kind (``markdown``, ``csv``, ``plot``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": write_markdown(report, out / MARKDOWN),
        "csv": write_csv(report, out / CSV),
    }
    plot = write_plot(report, out / PLOT)
    if plot is not None:
        written["plot"] = plot
    return written


_NUMERIC_COLUMNS = frozenset({"val", "n", "test", "params", "speed-up"})
_SELECTED_NOTE = (
    "validation figures of checkpoints selected on that same validation set (the best by "
    "callbacks.model_checkpoint.monitor): optimistic as estimates of held-out performance."
)


def _row_header(keys: Sequence[str]) -> list[str]:
    return ["task", "method", "model", *keys, "metric", "val", "n", "test", "params", "speed-up"]


def _row_cells(row: Row, keys: Sequence[str]) -> list[str]:
    val = "-" if row.val is None else str(row.val)
    if row.val is not None and row.selected_on_val:
        val += f" {SELECTED_ON_VAL}"
    test = "-" if row.test is None else str(row.test)
    if row.test is not None and (row.val is None or row.test.n != row.val.n):
        test += f" (n={row.test.n})"
    return [
        row.task,
        row.method,
        row.model,
        *(row.extra[k] for k in keys),
        row.metric,
        val,
        "0" if row.val is None else str(row.val.n),
        test,
        "-" if row.params is None else _count(row.params),
        "-" if row.speedup is None else f"{row.speedup:.2f}x",
    ]


def _incomplete_header(keys: Sequence[str]) -> list[str]:
    return ["status", "task", "method", "model", "seed", *keys, "detail", "directory"]


def _incomplete_cells(record: RunRecord, report: Report) -> list[str]:
    try:
        where = str(record.path.relative_to(report.root))
    except ValueError:
        where = str(record.path)
    return [
        record.status,
        record.task,
        record.method,
        record.model,
        str(record.seed),
        *record.values(report.keys).values(),
        record.detail,
        where,
    ]


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _stat_fields(stat: Stat | None) -> list:
    if stat is None:
        return ["", "", 0]
    return [stat.mean, "" if stat.std is None else stat.std, stat.n]


def _field(row: Row, name: str) -> str:
    return row.model if name == "model" else row.extra[name]


def _short(name: str, value: str) -> str:
    return value if name == "model" else f"{name.rsplit('.', 1)[-1]}={value}"


# --------------------------------------------------------------------------------------------
# Helpers


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


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _natural_key(value: object) -> tuple:
    """Numbers in text compare as numbers: job 10 after job 9, lr 5e-5 before 1e-4."""
    text = str(value)
    try:
        return (0, float(text), "")
    except ValueError:
        parts = re.split(r"(\d+)", text)
        return (1, 0.0, tuple(int(p) if p.isdigit() else p for p in parts))


# GLUE tasks in GLUE order, other tasks, then the GLUE averages.
_TASK_RANK = {task: i for i, task in enumerate(GLUE_TASKS)} | {
    average: len(GLUE_TASKS) + 1 + i for i, average in enumerate(GLUE_AVERAGES)
}


def _row_order(row: Row) -> tuple:
    return (
        _TASK_RANK.get(row.task, len(GLUE_TASKS)),
        row.task,
        row.method,
        row.model,
        *(_natural_key(v) for v in row.extra.values()),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``python -m kdlab.report <dir> [--out DIR] [--metric NAME]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m kdlab.report",
        description="Tables of every run under a directory (a sweep, pipelines, single runs): "
        "mean ± std over seeds per task x method x model x varying config keys.",
    )
    parser.add_argument("dir", type=Path, help="directory holding run directories, at any depth")
    parser.add_argument(
        "--out", type=Path, help="where to write report.md/.csv/.png (default: dir)"
    )
    parser.add_argument("--metric", help="metric to report instead of each run's main_metric")
    args = parser.parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    if not args.dir.is_dir():
        errors.print(f"[red]error:[/] {args.dir} is not a directory")
        return 2
    try:
        report = build_report(args.dir, args.metric)
    except OSError:
        errors.print(f"[red]error:[/] cannot read {args.dir}:\n{traceback.format_exc()}")
        return 1
    if not report.records:
        errors.print(
            f"[red]error:[/] no runs under {args.dir}: a run directory holds {CONFIG} "
            "(kdlab.train writes it when a run starts)."
        )
        return 1
    if (
        args.metric
        and report.rows
        and all(r.val is None for r in report.rows if r.task not in GLUE_AVERAGES)
    ):
        errors.print(f"[yellow]warning:[/] no finished run has val/{args.metric}")
    written = write_report(report, args.out or args.dir)
    for table in report_tables(report):
        console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0

