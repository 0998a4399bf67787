"""The report of every run under a directory (a Hydra sweep or search, pipelines, single
runs, at any depth)::

    python -m kdlab.report multirun/2026-12-01_10-00-00 [--out DIR] [--metric NAME]

It writes ``report.md``, ``report.csv`` and ``report.png`` (in ``--out``, default the
directory itself) and prints the tables. One module per step, each with its rules in its
docstring:

* :mod:`~kdlab.report.collect`: :func:`collect_runs` reads the run directories (status,
  failures, unfinished runs' last step, a search's trial numbers);
* :mod:`~kdlab.report.aggregate`: :func:`aggregate` groups the runs into rows (varying config
  keys, mean ± std over seeds, the GLUE averages), :func:`build_report` collects and
  aggregates, :func:`search_history` gives a search's objective by trial;
* :mod:`~kdlab.report.write`: :func:`write_report` (or :func:`write_markdown`,
  :func:`write_csv`, :func:`write_plot`) writes the files, :func:`report_tables` gives the rich
  tables;
* :mod:`~kdlab.report.cli`: :func:`main`, the command line.

The tables ``kdlab.train`` prints at the end of a run are :mod:`kdlab.summary`'s.
"""

from kdlab.report.aggregate import (
    GLUE_AVERAGES,
    GLUE_METRIC,
    GLUE_NO_WNLI_ROW,
    GLUE_ROW,
    Report,
    Row,
    build_report,
    search_history,
)
from kdlab.report.cli import main
from kdlab.report.collect import FAILED, collect_runs
from kdlab.report.write import report_tables, write_csv, write_markdown, write_report

__all__ = [
    "FAILED",
    "GLUE_AVERAGES",
    "GLUE_METRIC",
    "GLUE_NO_WNLI_ROW",
    "GLUE_ROW",
    "Report",
    "Row",
    "build_report",
    "collect_runs",
    "main",
    "report_tables",
    "search_history",
    "write_csv",
    "write_markdown",
    "write_report",
]
