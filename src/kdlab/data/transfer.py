"""Transfer sets: unlabelled training inputs for distillation (``task.transfer``).

Pre-trained Distillation (Turc et al. 2019) distils on a *transfer set*: inputs in the
task's format whose labels are never read, only the teacher's outputs on them. A transfer
set replaces a task's training split; validation and test stay labelled. It is made of:

- ``task_inputs``: the task's own training inputs (after ``task.train_fraction`` /
  ``task.max_train_samples``), labels dropped;
- ``files``: unlabelled text in the task's input format, one example per line (a sentence,
  or for pair tasks two texts separated by a tab);
- ``corpus``: sentences cut from plain-text corpus files (single-sentence tasks only): the
  lines of a paragraph (lines up to a blank line) are joined first, so hard-wrapped text
  (Project Gutenberg's) gives whole sentences, as does one paragraph per line (WikiText);
- ``size``: a subset of that many examples, drawn with ``seed`` alone (all of them when
  there are fewer), for the paper's transfer-set-size study.
"""

import glob
import itertools
import logging
import re
from pathlib import Path
from typing import TypedDict

import datasets
import torch

from kdlab.data.textfile import check_text_file
from kdlab.errors import ConfigError, DataFormatError
from kdlab.validation import PositiveInt

log = logging.getLogger(__name__)

# A sentence: text up to a full stop, question or exclamation mark and the closing quotes
# after it (or the paragraph's end). The full stop of a title before a name ends none.
_SENTENCE = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St)\.|[^.!?])+[.!?]*[\"'”’]*")
# Corpus sentences shorter than this many words (headings, fragments) are left out.
_MIN_WORDS = 4


class TransferOptions(TypedDict):
    """``task.transfer`` (``transfer=task_inputs`` and its keys)."""

    task_inputs: bool  # the task's training inputs, labels dropped
    files: list[str] | None  # unlabelled text in the task's format (paths or globs)
    corpus: list[str] | None  # corpus files whose sentences join (single-sentence tasks)
    size: PositiveInt | None  # a fixed-seed subset of this many examples
    seed: int  # the subset depends on it alone


def transfer_set(
    train: datasets.Dataset, options: TransferOptions, text_columns: list[str]
) -> datasets.Dataset:
    """The transfer set described by ``options``: columns ``text_columns``, no labels.

    Args:
        train: the task's (subset) training split.
        options: the ``task.transfer`` config.
        text_columns: ``["text_a"]``, or ``["text_a", "text_b"]`` for pair tasks.

    Raises:
        ConfigError: for a source the task cannot use, or an empty transfer set.
        DataFormatError: naming the file and line of a malformed transfer file.
    """
    parts = []
    if options["task_inputs"]:
        parts.append(train.select_columns(text_columns))
    for pattern in options.get("files") or []:
        for path in _matches(pattern, "task.transfer.files"):
            parts.append(_read_inputs(path, text_columns))
    if options.get("corpus"):
        if len(text_columns) > 1:
            raise ConfigError(
                "task.transfer.corpus gives single sentences, but this task's inputs are "
                "pairs: use task.transfer.files with tab-separated pairs instead."
            )
        for pattern in options["corpus"]:
            for path in _matches(pattern, "task.transfer.corpus"):
                parts.append(_corpus_sentences(path))
    if not parts:
        raise ConfigError(
            "task.transfer has no source: set task.transfer.task_inputs=true, "
            "task.transfer.files or task.transfer.corpus."
        )
    return sized(datasets.concatenate_datasets(parts), options)


def sized(transfer: datasets.Dataset, options: TransferOptions) -> datasets.Dataset:
    """``task.transfer.size`` examples of ``transfer`` drawn with ``task.transfer.seed``
    (in their original order), or all of them."""
    size = options.get("size")
    if size is not None and size < len(transfer):
        generator = torch.Generator().manual_seed(int(options["seed"]))
        order = torch.randperm(len(transfer), generator=generator)[:size].sort().values
        transfer = transfer.select(order.tolist())
    log.info("Transfer set: %d unlabelled examples", len(transfer))
    return transfer


def _matches(pattern: str, key: str) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
    files = [p for p in found if p.is_file()]
    if not files:
        raise ConfigError(f"{key}: '{pattern}' matches no file.")
    for path in files:
        check_text_file(path, key)
    return files


def _read_inputs(path: Path, text_columns: list[str]) -> datasets.Dataset:
    """One example per non-blank line; pair tasks have the two texts separated by a tab."""
    columns: dict[str, list[str]] = {c: [] for c in text_columns}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            texts = line.split("\t") if len(text_columns) > 1 else [line]
            if len(texts) != len(text_columns):
                raise DataFormatError(
                    f"{path}:{line_no}: expected {len(text_columns)} tab-separated texts (this "
                    f"task's inputs are pairs), found {len(texts)}."
                )
            for column, text in zip(text_columns, texts, strict=True):
                columns[column].append(text)
    return datasets.Dataset.from_dict(columns)


def _corpus_sentences(path: Path) -> datasets.Dataset:
    sentences = []
    with open(path, encoding="utf-8") as f:
        # Runs of non-blank lines are paragraphs: a hard-wrapped sentence spans lines.
        for blank, lines in itertools.groupby(f, key=lambda line: not line.strip()):
            if blank:
                continue
            paragraph = " ".join(line.strip() for line in lines)
            for match in _SENTENCE.finditer(paragraph):
                sentence = match.group().strip()
                if len(sentence.split()) >= _MIN_WORDS:
                    sentences.append(sentence)
    return datasets.Dataset.from_dict({"text_a": sentences})
