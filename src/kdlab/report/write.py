"""Writing a report: rich tables, ``report.md``, ``report.csv`` and ``report.png``.

Tables and pictures show a config value that is a float to 4 significant digits (an Optuna
study's ``alpha=0.2248`` rather than the 17 digits of the sampled value); the CSV, the
report's data, keeps every value exactly as the runs' configs have it.
"""

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.table import Table

from kdlab.report.aggregate import GLUE_AVERAGES, History, Report, Row, Stat, search_history
from kdlab.report.collect import FAILED, FINISHED, MISSING, UNFINISHED, RunRecord
from kdlab.rundir import SHOWN_BATCH
from kdlab.summary import format_bytes, format_count

MARKDOWN = "report.md"
CSV = "report.csv"
PLOT = "report.png"
# Marks validation figures of checkpoints selected on the validation set.
SELECTED_ON_VAL = "†"


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
    header = _row_header(report)
    for column in header:
        main.add_column(column, justify="right" if column in _NUMERIC_COLUMNS else "left")
    for row in report.rows:
        main.add_row(*_row_cells(row, report))
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
        *_markdown_table(_row_header(report), [_row_cells(r, report) for r in report.rows]),
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
                *(
                    ("deployed_bytes", "deployed_ms", "deployed_val_mean")
                    if report.deployed
                    else ()
                ),
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
                    *(_deployed_fields(row) if report.deployed else ()),
                ]
            )
    return path


def write_plot(report: Report, path: str | Path) -> Path | None:
    """The picture of the report; ``None`` (nothing written) when it has no value to show.

    A search's (:func:`~kdlab.report.aggregate.search_history`): each trial's objective by
    trial number, and the best so far as a step line, one panel per study x task x method x
    model. Other reports': the validation metric by method with standard-deviation error
    bars, one panel per task (and per GLUE average).
    """
    histories = search_history(report.records)
    rows = [r for r in report.rows if r.val is not None]
    if not histories and not rows:
        return None
    # A Figure on the Agg canvas directly: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r.task for r in rows))
    if histories:
        panels, width = len(histories), 4.5
    else:
        per_panel = max(sum(r.task == t for r in rows) for t in tasks)
        panels, width = len(tasks), max(3.5, 0.9 * per_panel + 1.5)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(width * ncols, 3.6 * nrows), layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if histories:
        _plot_histories(axes, histories, report.root)
    else:
        _plot_bars(axes, rows, tasks, report.keys)
    for ax in axes[panels:]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _plot_histories(axes: Sequence, histories: list[History], root: Path) -> None:
    several = len({h.sweep for h in histories}) > 1
    for ax, history in zip(axes, histories, strict=False):
        ax.plot(history.trials, history.values, "o", color="C0", label="trial")
        best = "best so far" + (" (lowest)" if history.mode == "min" else "")
        ax.step(history.trials, history.best, where="post", color="C3", label=best)
        title = f"{history.task} {history.method} {history.model}"
        ax.set_title(f"{_where(history.sweep, root)}\n{title}" if several else title)
        ax.set_xlabel("trial")
        ax.set_ylabel(history.metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)


def _plot_bars(axes: Sequence, rows: list[Row], tasks: list[str], keys: Sequence[str]) -> None:
    methods = list(dict.fromkeys(r.method for r in rows))
    # Label bars by what differs between rows: the method always, the model and keys if they vary.
    label_fields = [f for f in ("model", *keys) if len({_field(r, f) for r in rows}) > 1]
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


# Columns of the deployed ONNX model (int8 where there is one), shown where a run has one.
_DEPLOYED_COLUMNS = ("ONNX file", f"ONNX ms / batch {SHOWN_BATCH}", "ONNX val")
_NUMERIC_COLUMNS = frozenset({"val", "n", "test", "params", "speed-up", *_DEPLOYED_COLUMNS})
_SELECTED_NOTE = (
    "validation figures of checkpoints selected on that same validation set (the best by "
    "callbacks.model_checkpoint.monitor): optimistic as estimates of held-out performance."
)


def _row_header(report: Report) -> list[str]:
    return [
        *("task", "method", "model", *report.keys, "metric", "val", "n", "test", "params"),
        "speed-up",
        *(_DEPLOYED_COLUMNS if report.deployed else ()),
    ]


def _row_cells(row: Row, report: Report) -> list[str]:
    keys = report.keys
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
        *(_shown(row.extra[k]) for k in keys),
        row.metric,
        val,
        "0" if row.val is None else str(row.val.n),
        test,
        "-" if row.params is None else format_count(row.params),
        "-" if row.speedup is None else f"{row.speedup:.2f}x",
        *(_deployed_cells(row) if report.deployed else ()),
    ]


def _deployed_cells(row: Row) -> list[str]:
    return [
        "-" if row.deployed_bytes is None else format_bytes(row.deployed_bytes),
        "-" if row.deployed_ms is None else f"{row.deployed_ms:.1f}",
        "-" if row.deployed_val is None else str(row.deployed_val),
    ]


def _deployed_fields(row: Row) -> list:
    return [
        "" if row.deployed_bytes is None else row.deployed_bytes,
        "" if row.deployed_ms is None else row.deployed_ms,
        "" if row.deployed_val is None else row.deployed_val.mean,
    ]


def _incomplete_header(keys: Sequence[str]) -> list[str]:
    return ["status", "task", "method", "model", "seed", *keys, "detail", "directory"]


def _incomplete_cells(record: RunRecord, report: Report) -> list[str]:
    return [
        record.status,
        record.task,
        record.method,
        record.model,
        str(record.seed),
        *(_shown(v) for v in record.values(report.keys).values()),
        record.detail,
        _where(record.path, report.root),
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
    return value if name == "model" else f"{name.rsplit('.', 1)[-1]}={_shown(value)}"


def _shown(value: str) -> str:
    """A config value's text as tables and pictures show it: a float to 4 significant digits
    (``0.2248`` for ``0.22481491235394074``; ``5e-05``), anything else as it is."""
    try:
        number = json.loads(value)
    except ValueError:
        return value
    return f"{number:.4g}" if isinstance(number, float) else value


def _where(path: Path, root: Path) -> str:
    """``path`` relative to the report's root when it is under it."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
