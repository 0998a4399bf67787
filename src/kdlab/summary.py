"""The tables ``kdlab.train`` prints when a run (or a pipeline) ends, and the console that
prints them and the report's tables.

:func:`summary_table`: teacher and student of one run; :func:`pipeline_table`: the stages of a
pipeline; :func:`table_console`: where to print them, so that a log file gets them whole.
"""

from rich.console import Console
from rich.table import Table

# The line width of a console that is not a terminal: wide enough for any table row, path or
# traceback line, so that none is wrapped.
_LOG_WIDTH = 10_000


def table_console(stderr: bool = False) -> Console:
    """A console for tables and the lines around them.

    In a terminal, rich's: tables fit the terminal's width. Elsewhere (a log file, a SLURM
    job's output, a pipe) rich would assume 80 columns, squeeze tables into them and break
    run paths over several lines; there every line is printed whole instead (soft wrap on a
    very wide console): a table is as wide as its cells, a path on one line.

    Args:
        stderr: print to standard error rather than standard output.
    """
    terminal = Console(stderr=stderr)
    if terminal.is_terminal:
        return terminal
    return Console(stderr=stderr, width=_LOG_WIDTH, soft_wrap=True)


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
            format_count(row["params"]),
            "-" if ms is None else f"{ms:.1f}",
            f"{speed['speedup']:.2f}x" if role == "student" and "speedup" in speed else "-",
        )
    return table


def pipeline_table(title: str, rows: list[dict]) -> Table:
    """The stages of a pipeline (``kdlab.pipeline.pipeline_summary``) in one table; where a
    stage deployed its model, the file's size and latency too (other stages: ``-``)."""
    table = Table(title=title)
    columns = ["stage", "method", "student", "metric", "val", "test", "parameters", "time"]
    deployed = [row.get("deployed") for row in rows]
    shown = next((d for d in deployed if d), None)
    if shown:
        columns += ["file", f"ms / batch {shown['batch']}"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "method") else "right")
    for row, deploy in zip(rows, deployed, strict=True):
        cells = []
        if shown:
            cells = ["-", "-"] if not deploy else [format_bytes(deploy["bytes"]), _ms(deploy["ms"])]
        table.add_row(
            row["stage"] + ("" if row["ran"] else " (done before)"),
            row["method"],
            row["model"],
            row["main_metric"],
            _fmt(row["val"]),
            _fmt(row["test"]),
            format_count(row["params"]),
            "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f} s",
            *cells,
        )
    return table


def format_bytes(n: float) -> str:
    """A file size in MB (``23.0 MB``) or KB (``880.1 KB``), powers of 1000."""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_count(n: float) -> str:
    """A parameter count in millions (``17.4M``) or thousands (``960.0K``)."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
