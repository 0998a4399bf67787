"""``python -m kdlab.report <dir> [--out DIR] [--metric NAME]`` (also ``kdlab-report``)."""

import argparse
import traceback
from pathlib import Path

from kdlab.report.aggregate import GLUE_AVERAGES, build_report
from kdlab.report.write import report_tables, write_report
from kdlab.rundir import CONFIG
from kdlab.summary import table_console


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
    stdout, errors = table_console(), table_console(stderr=True)
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
        stdout.print(table)
    stdout.print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
