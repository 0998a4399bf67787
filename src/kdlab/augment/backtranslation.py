"""Back-translation paraphrases of the training set (MixKD's data augmentation).

Each training example may get paraphrases made by translating it to a pivot language and
back (default MarianMT en→de→en). Paraphrases keep their source example's label and join
the training split, and with it the pool of mixup partners.

Paraphrases live in a TSV file (``task.augment.file``) with a header row
``index  text_a  [text_b]``: ``index`` is the example's row in the *full* training set
(before ``task.train_fraction`` subsetting), so one file serves every subset; an index may
appear on several rows. A file can be written by hand or by another tool; examples it lacks
are generated (``task.augment.generate``) and appended, so generation runs once.
"""

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, TypedDict

import datasets
import torch
from omegaconf import DictConfig
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from kdlab.errors import ConfigError, DataFormatError
from kdlab.validation import Positive, PositiveInt, Range

log = logging.getLogger(__name__)

# Column holding each example's row in the full training set.
EXAMPLE_INDEX = "example_index"
INDEX_HEADER = "index"

Paraphrases = dict[int, list[tuple[str, ...]]]


class BackTranslationOptions(TypedDict):
    """``task.augment`` of ``augment=backtranslation`` (``conf/augment/backtranslation.yaml``)."""

    file: str  # paraphrase TSV: read, and extended with what generation adds
    generate: bool  # translate the examples the file lacks
    forward_model: str
    backward_model: str
    batch_size: PositiveInt
    max_length: PositiveInt
    device: str
    sampling: bool  # sample (diverse paraphrases) rather than search
    top_p: Annotated[float, Range(gt=0, le=1)]
    temperature: Positive
    num_beams: PositiveInt


def read_paraphrases(path: Path, text_columns: Sequence[str]) -> Paraphrases:
    """``{example index: [paraphrase texts, ...]}`` from a paraphrase TSV file.

    Raises:
        DataFormatError: naming the file and line of a bad header or row.
    """
    result: Paraphrases = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        expected = [INDEX_HEADER, *text_columns]
        if header != expected:
            raise DataFormatError(
                f"{path}:1: header must be {expected} (tab-separated), found {header}."
            )
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(expected) or not row[0].isdigit():
                raise DataFormatError(
                    f"{path}:{line_no}: expected an example index and {len(text_columns)} "
                    f"text field(s), found {row}."
                )
            result.setdefault(int(row[0]), []).append(tuple(row[1:]))
    return result


def write_paraphrases(
    path: Path, paraphrases: Mapping[int, Sequence[tuple[str, ...]]], text_columns: Sequence[str]
) -> None:
    """Append rows to a paraphrase TSV file, writing the header if the file is new.

    Texts are quoted where needed, so tabs and newlines inside a paraphrase survive.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        if new:
            writer.writerow([INDEX_HEADER, *text_columns])
        for index in sorted(paraphrases):
            for texts in paraphrases[index]:
                writer.writerow([index, *texts])


def add_paraphrases(train: datasets.Dataset, cfg: DictConfig) -> datasets.Dataset:
    """The training split followed by the paraphrases of its examples.

    Args:
        train: split with ``text_a`` (``text_b``), ``label`` and :data:`EXAMPLE_INDEX`.
        cfg: the ``task.augment`` config (``file``, ``generate`` and the translation keys).

    Raises:
        ConfigError: if the file lacks examples and generation is off or cannot load its
            models.
    """
    text_columns = [c for c in ("text_a", "text_b") if c in train.column_names]
    path = Path(str(cfg.file)).expanduser()
    paraphrases = read_paraphrases(path, text_columns) if path.is_file() else {}
    indices = train[EXAMPLE_INDEX]
    missing = [p for p, index in enumerate(indices) if index not in paraphrases]
    if missing:
        if not cfg.generate:
            raise ConfigError(
                f"task.augment.file={path} has no paraphrase for {len(missing)} training "
                f"examples (first: index {indices[missing[0]]}). Add rows for them or set "
                "task.augment.generate=true."
            )
        log.info("Back-translating %d training examples into %s", len(missing), path)
        missing_rows = train.select(missing)
        columns = [back_translate(missing_rows[c], cfg) for c in text_columns]
        generated = {
            indices[p]: [tuple(column[k] for column in columns)] for k, p in enumerate(missing)
        }
        write_paraphrases(path, generated, text_columns)
        paraphrases.update(generated)
    rows: dict[str, list] = {c: [] for c in [*text_columns, "label", EXAMPLE_INDEX]}
    labels = train["label"]
    for position, index in enumerate(indices):
        for texts in paraphrases[index]:
            for column, text in zip(text_columns, texts, strict=True):
                rows[column].append(text)
            rows["label"].append(labels[position])
            rows[EXAMPLE_INDEX].append(index)
    extra = datasets.Dataset.from_dict(rows, features=train.features)
    log.info("Back-translation adds %d paraphrases to %d examples", len(extra), len(train))
    return datasets.concatenate_datasets([train, extra])


def back_translate(texts: Sequence[str], cfg: DictConfig) -> list[str]:
    """``texts`` translated with ``cfg.forward_model`` and back with ``cfg.backward_model``."""
    pivot = translate(texts, cfg.forward_model, "task.augment.forward_model", cfg)
    return translate(pivot, cfg.backward_model, "task.augment.backward_model", cfg)


def translate(texts: Sequence[str], model_id: str, key: str, cfg: DictConfig) -> list[str]:
    """Translate ``texts`` with a sequence-to-sequence model (hub id or local directory).

    Uses ``cfg.batch_size``, ``cfg.max_length``, ``cfg.device`` and the generation keys
    ``cfg.sampling`` (sample instead of search), ``cfg.top_p``, ``cfg.temperature`` and
    ``cfg.num_beams``.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_id))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(model_id))
    except ImportError as err:
        # MarianMT tokenizers need sentencepiece, which kdlab does not install by default.
        raise ConfigError(
            f"Loading translation model '{model_id}' ({key}) needs an optional package: {err}. "
            "Install it with `pip install 'kdlab[backtranslation]'`."
        ) from err
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not load translation model '{model_id}' ({key}): {err}. Offline, set {key} "
            "to a local directory, or write the paraphrases to task.augment.file (TSV with "
            f"header '{INDEX_HEADER}<TAB>text_a[<TAB>text_b]', one row per paraphrase) and set "
            "task.augment.generate=false."
        ) from err
    model.to(cfg.device).eval()
    sampling = {"do_sample": True, "top_p": cfg.top_p, "temperature": cfg.temperature}
    options = sampling if cfg.sampling else {"do_sample": False}
    outputs: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(
            list(texts[start : start + cfg.batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=cfg.max_length,
            return_token_type_ids=False,  # seq2seq models take none
        ).to(cfg.device)
        with torch.no_grad():
            generated = model.generate(
                **batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_length, **options
            )
        outputs.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return outputs
