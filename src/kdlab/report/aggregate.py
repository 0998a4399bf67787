"""The report's rows: runs grouped, their statistics, the GLUE averages, a search's history.

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

Searches: the report of a search (every finished run a trial, see
    :mod:`kdlab.report.collect`) has the study's history (:func:`search_history`) for each
    task x method x model (a pipeline's stage) of each sweep directory: each trial's
    ``val/<main_metric>``, the value the study optimises (not ``--metric``), by trial number,
    and the best value so far, the highest or lowest as ``task.main_metric_mode`` says.
    Failed and unfinished trials have no value.
"""

import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.report.collect import (
    FINISHED,
    MISSING,
    RunRecord,
    collect_runs,
    natural_key,
)

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
GLUE_ROW = "GLUE"
GLUE_NO_WNLI_ROW = "GLUE (no WNLI)"
# The GLUE averages and their tasks, in the order of their rows (see the module docstring).
GLUE_AVERAGES: dict[str, tuple[str, ...]] = {
    GLUE_NO_WNLI_ROW: tuple(t for t in GLUE_TASKS if t != "wnli"),
    GLUE_ROW: GLUE_TASKS,
}
GLUE_METRIC = "GLUE score"
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
# The row's own columns.
_IDENTITY_KEYS = frozenset({"task.name", "method.name", "model.name"})


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
        deployed_bytes: mean size of the deployed ONNX file (int8 where there is one) of
            the runs with a ``deploy/deploy.json``.
        deployed_ms: its mean latency (batch ``kdlab.rundir.SHOWN_BATCH``, every core).
        deployed_val: its metric on validation, where the deploy evaluated it.
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
    deployed_bytes: float | None = None
    deployed_ms: float | None = None
    deployed_val: Stat | None = None


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
    def deployed(self) -> bool:
        """Whether some row has deployed figures (the report then shows their columns)."""
        return any(r.deployed_bytes is not None for r in self.rows)

    @property
    def counts(self) -> Counter:
        """The number of runs by status."""
        return Counter(r.status for r in self.records)


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
                seeds=sorted((r.seed for r in runs), key=natural_key),
                selected_on_val=any(r.selected_on_val for r in runs),
                **_deployed(runs, name),
            )
        )
    rows.sort(key=_row_order)
    return rows + _glue_rows(groups)


def _deployed(runs: Sequence[RunRecord], metric: str) -> dict:
    """The :class:`Row` fields of the runs' deployed models (None where no run has one)."""
    deployed = [r.deployed for r in runs if r.deployed is not None]
    return {
        "deployed_bytes": _mean(d["bytes"] for d in deployed),
        "deployed_ms": _mean(d["ms"] for d in deployed),
        "deployed_val": Stat.of(d["metrics"].get(f"val/{metric}") for d in deployed),
    }


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
                        key=natural_key,
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
    seed_lists = [sorted((seed for seed, _ in pairs), key=natural_key) for pairs in scores.values()]
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


@dataclass
class History:
    """A search's objective by trial, for one task x method x model (a pipeline's stage) of
    one sweep directory: what Optuna's history plot shows.

    Attributes:
        sweep: the sweep directory holding the trials.
        task: the task.
        method: the method.
        model: the student model.
        metric: the objective, ``val/<main_metric>``.
        mode: ``max`` when higher is better, ``min`` when lower is.
        trials: the numbers of the trials that have a value, in order.
        values: their objective values.
        best: the best value of the trials up to each of them.
    """

    sweep: Path
    task: str
    method: str
    model: str
    metric: str
    mode: str
    trials: list[int]
    values: list[float]
    best: list[float]


def search_history(records: Sequence[RunRecord]) -> list[History]:
    """The history of each study, when every finished run is a trial of a search (see the
    module docstring).

    Args:
        records: the runs, as :func:`collect_runs` returns them.

    Returns:
        One history per sweep directory x task x method x model, in the order of the runs;
        ``[]`` when some finished run is no trial, or none finished.
    """
    finished = [r for r in records if r.status == FINISHED]
    if not finished or any(r.trial is None or r.job_dir is None for r in finished):
        return []
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in finished:
        groups[(record.job_dir.parent, record.task, record.method, record.model)].append(record)
    histories = []
    for (sweep, task, method, model), runs in groups.items():
        metric = f"val/{Counter(r.main_metric for r in runs).most_common(1)[0][0]}"
        points = sorted((r.trial, r.score(metric)) for r in runs if r.score(metric) is not None)
        if not points:
            continue
        mode = runs[0].main_metric_mode
        values = [value for _, value in points]
        histories.append(
            History(
                sweep=sweep,
                task=task,
                method=method,
                model=model,
                metric=metric,
                mode=mode,
                trials=[trial for trial, _ in points],
                values=values,
                best=list(itertools.accumulate(values, max if mode == "max" else min)),
            )
        )
    return histories


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


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
        *(natural_key(v) for v in row.extra.values()),
    )
