"""Checks of plain-text data files that name the line to fix: bytes that are not UTF-8, or
a file with no text at all."""

import codecs
from pathlib import Path

from kdlab.errors import DataFormatError

# Bytes decoded per read when a whole file is checked: big enough to run at decoder speed,
# small enough not to hold a large corpus in memory.
_BLOCK = 1 << 20

RE_ENCODE = "Re-encode the file as UTF-8 (for a Latin-1 file: iconv -f latin1 -t utf-8 IN > OUT)."


def not_utf8_error(path: Path) -> DataFormatError:
    """The error for a file that does not decode as UTF-8, naming the first bad byte.

    Meant for the error path only: it reads the file again, line by line. A UTF-8 character
    never contains the newline byte, so each line decodes on its own and the first line that
    fails holds the first bad byte.

    Args:
        path: the file whose decoding failed.

    Returns:
        ``<path>:<line>: not valid UTF-8 (byte 0x.. at column N)`` with a hint; the column
        counts characters from 1, after a leading byte-order mark.
    """
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(line[: err.start].decode("utf-8")) + 1
                return DataFormatError(
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                    f"column {column}). {RE_ENCODE}"
                )
    # Only if the file changed since the caller's read failed.
    return DataFormatError(f"{path}: not valid UTF-8. {RE_ENCODE}")


def check_text_file(path: Path, setting: str = "task.files") -> None:
    """Raise unless ``path`` is UTF-8 text with at least one non-blank character.

    Streams the file in blocks, so a large corpus costs one fast decoding pass and little
    memory.

    Args:
        path: the file.
        setting: the config key that names the file, for the message.

    Raises:
        DataFormatError: naming the file, and for bad bytes the line and column.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    with open(path, "rb") as f:
        try:
            while block := f.read(_BLOCK):
                text = decoder.decode(block)
                blank = blank and (not text or text.isspace())
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise not_utf8_error(path) from err
        empty = f.tell() == 0
    if empty:
        raise DataFormatError(f"{path}: the file is empty. Add text or remove it from {setting}.")
    if blank:
        raise DataFormatError(
            f"{path}: the file has only blank lines. Add text or remove it from {setting}."
        )
