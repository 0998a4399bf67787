"""Reading GLUE TSV files as the official ``download_glue_data.py`` lays them out."""

import contextlib
import csv
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdlab.data.textfile import not_utf8_error
from kdlab.errors import DataFormatError


def read_labelled_tsv(
    path: Path,
    *,
    header: bool,
    text_columns: Sequence[str | int],
    label_column: str | int,
    label_values: Sequence[str] | None,
    setting: str | None = None,
) -> dict[str, list]:
    """Read a TSV of texts and labels into ``text_a`` / ``text_b`` / ``label`` columns.

    GLUE files quote nothing (``csv.QUOTE_NONE``), MRPC starts with a byte-order mark and
    CoLA has no header row; columns are addressed by header name or by 0-based index.
    Blank lines are skipped, also before the header.

    Args:
        path: the TSV file.
        header: whether the first line names the columns.
        text_columns: one or two columns holding the input texts.
        label_column: the column holding the label.
        label_values: the label strings in class-index order; ``None`` for a regression
            target parsed as float.
        setting: the config key that names the file (e.g. ``task.files.train``), for the
            message when the file has no data rows.

    Returns:
        Columns ``text_a`` (and ``text_b`` for pairs) and ``label``, at least one row.

    Raises:
        DataFormatError: naming the file and line of a short row, an unknown label or a
            byte that is not UTF-8, or naming the file when it has no data rows.
    """
    label_index = {v: i for i, v in enumerate(label_values)} if label_values is not None else None
    names = ["text_a", "text_b"][: len(text_columns)]
    columns: dict[str, list] = {name: [] for name in [*names, "label"]}
    # closing(): an error raised here closes the file at once, not when collected.
    with contextlib.closing(_non_blank_rows(path)) as rows:
        first = next(rows, None)
        if first is None:
            raise DataFormatError(
                f"{path}: no data rows (the file is empty or blank).{_fix(setting)}"
            )
        positions = _column_positions(path, first, header, [*text_columns, label_column])
        for line_no, row in rows if header else itertools.chain([first], rows):
            if len(row) <= max(positions):
                raise DataFormatError(
                    f"{path}:{line_no}: expected at least {max(positions) + 1} tab-separated "
                    f"fields, found {len(row)}. Fix or remove this line."
                )
            *texts, raw_label = (row[p] for p in positions)
            for name, text in zip(names, texts, strict=True):
                columns[name].append(text)
            columns["label"].append(_parse_label(path, line_no, raw_label.strip(), label_index))
    if not columns["label"]:
        raise DataFormatError(f"{path}: no data rows (only a header).{_fix(setting)}")
    return columns


def _non_blank_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each line with text; a bad byte names its line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for line_no, row in enumerate(rows, start=1):
                if any(cell.strip() for cell in row):
                    yield line_no, row
        except UnicodeDecodeError as err:
            # The decoder's position counts from its read buffer, not from the file.
            raise not_utf8_error(path) from err


def _fix(setting: str | None) -> str:
    where = f"point {setting} at the split's file, or " if setting else ""
    return f" A split needs at least one example: {where}add examples to this one."


def _column_positions(
    path: Path, first: tuple[int, list[str]], header: bool, wanted: Sequence[str | int]
) -> list[int]:
    line_no, first_row = first
    positions = []
    for col in wanted:
        if isinstance(col, int):
            positions.append(col)
        elif not header:
            raise DataFormatError(f"{path}: column '{col}' is named but the task has no header.")
        elif col not in first_row:
            raise DataFormatError(
                f"{path}:{line_no}: header has no column '{col}' (found {first_row}). "
                "Is task.data_dir pointing at the right GLUE task?"
            )
        else:
            positions.append(first_row.index(col))
    return positions


def _parse_label(path: Path, line_no: int, raw: str, label_index: dict[str, int] | None):
    if label_index is None:
        try:
            return float(raw)
        except ValueError:
            raise DataFormatError(
                f"{path}:{line_no}: regression label '{raw}' is not a number."
            ) from None
    if raw not in label_index:
        raise DataFormatError(f"{path}:{line_no}: label '{raw}' is not one of {list(label_index)}.")
    return label_index[raw]
