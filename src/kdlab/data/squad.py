"""Extractive question answering (SQuAD v1.1 and v2.0): examples, windows and batches.

A question and its context are tokenised as the reference implementations do: question
first, context second, only the context truncated, long contexts cut into windows of
``task.max_seq_length`` tokens that share ``task.doc_stride`` tokens (the ``stride`` of
``transformers`` tokenizers). Each window is one feature, labelled with the token span of
the first gold answer, or with the CLS token when the answer is not inside the window or
the question has none. Evaluation windows also keep their example, the character offsets
of their context tokens and their CLS position, for post-processing.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NotRequired, TypedDict

import datasets
import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from typing_extensions import Unpack

from kdlab.data.base import TaskOptions, TokenizedDataModule, token_lengths, train_subset
from kdlab.data.squad_json import COLUMNS, AnswerCheck, read_squad_json
from kdlab.data.transfer import TransferOptions, sized
from kdlab.errors import ConfigError, DataFormatError
from kdlab.qa.metrics import SquadMetrics
from kdlab.validation import NonNegativeInt, PositiveInt, Range

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train_file", "validation": "validation_file"}
# Offsets of tokens outside the context (question, special tokens).
NO_OFFSET = (-1, -1)
# Columns of a batch; evaluation windows add ``feature_index``.
BATCH_COLUMNS = [
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "start_positions",
    "end_positions",
]

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    }
)


def load_squad(task: DictConfig) -> datasets.DatasetDict:
    """``train`` and ``validation`` questions from ``task.train_file`` /
    ``task.validation_file`` (official JSON format) where set, else from the hub
    (``task.hub.path``).

    Gold answers are checked against their contexts as they are read, before anything is
    tokenised; ``task.realign_answers`` repairs wrong spans instead of raising (see
    :class:`~kdlab.data.squad_json.AnswerCheck`) and logs what it fixed and dropped.

    Raises:
        ConfigError: a file key that names no file, or an unreachable hub.
        DataFormatError: a malformed file, or a wrong answer, naming the file or dataset,
            the article and the question id.
    """
    splits = {}
    hub_splits = []
    for split, key in SPLIT_FILES.items():
        path = task.get(key)
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                raise ConfigError(f"task.{key}={path} is not a file.")
            log.info("Reading %s/%s from %s", task.name, split, path)
            check = answer_check(task, split)
            splits[split] = datasets.Dataset.from_dict(
                read_squad_json(path, check), features=FEATURES
            )
            check.log_summary(f"task.{key}={path}")
            if not splits[split].num_rows:
                # Training on none would export an untrained student; scoring none, a 0.
                raise DataFormatError(
                    f"{path} (task.{key}) has no {split} questions"
                    + (" left after task.realign_answers" if check.questions_dropped else "")
                    + ": point the key at a SQuAD file with questions."
                )
        else:
            hub_splits.append(split)
    if hub_splits:
        log.info("Loading %s %s from the hub (%s)", task.name, hub_splits, task.hub.path)
        try:
            raw = datasets.load_dataset(task.hub.path)
        except Exception as err:  # the hub raises many types when unreachable
            keys = " ".join(f"task.{SPLIT_FILES[s]}=<official JSON file>" for s in hub_splits)
            raise ConfigError(
                f"Could not load task '{task.name}' from the hub ({task.hub.path}): {err}. "
                f"Offline, set {keys}."
            ) from err
        for split in hub_splits:
            hub_split = task.hub.splits[split]
            questions = raw[hub_split].select_columns(list(COLUMNS))
            source = f"hub dataset {task.hub.path} (split {hub_split})"
            splits[split] = check_hub_answers(questions, answer_check(task, split), source)
    return datasets.DatasetDict(splits)


def answer_check(task: DictConfig, split: str) -> AnswerCheck:
    """The answer check of one split, from ``task.version_2_with_negative`` and
    ``task.realign_answers``."""
    return AnswerCheck(
        split=split,
        with_negative=bool(task.get("version_2_with_negative", False)),
        realign=bool(task.get("realign_answers", False)),
    )


def check_hub_answers(
    questions: datasets.Dataset, check: AnswerCheck, source: str
) -> datasets.Dataset:
    """``questions`` (hub columns) with their answers checked as a file's are; the same
    dataset object when nothing changed, so its cache fingerprint is kept.

    Args:
        questions: a split with the columns of ``COLUMNS``.
        check: the split's answer check.
        source: the dataset and split, for messages; the hub has no article index.
    """
    columns = questions.to_dict()
    kept: dict[str, list] = {name: [] for name in COLUMNS}
    for i in range(len(questions)):
        row = {name: columns[name][i] for name in COLUMNS}
        where = _hub_where(source, row["title"], row["id"])
        check.question_id(row["id"], where)
        row["answers"] = check.answers(row["context"], row["answers"], where)
        if row["answers"] is None:
            continue
        for name in COLUMNS:
            kept[name].append(row[name])
    check.log_summary(source)
    if not check.changed:
        return questions
    return datasets.Dataset.from_dict(kept, features=questions.features)


def _hub_where(source: str, title: str, qid: str) -> Callable[[], str]:
    return lambda: f"{source}: article '{title}', question {qid}"


def encode_windows(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    doc_stride: int,
    for_evaluation: bool,
) -> dict[str, list]:
    """Windows of a batch of questions (a batched ``datasets.map`` function).

    Args:
        batch: columns ``question``, ``context``, ``answers``.
        indices: dataset rows of the batch's questions.
        tokenizer: a fast tokenizer (offsets are needed).
        max_length: tokens per window.
        doc_stride: tokens shared by consecutive windows of one context.
        for_evaluation: also keep ``example_index``, ``offset_mapping`` (``-1`` outside the
            context) and ``cls_index``.

    Returns:
        One row per window: tokenizer outputs and ``start_positions``/``end_positions``.
    """
    # Leading spaces of some questions would only waste window room.
    questions = [q.lstrip() for q in batch["question"]]
    encoded = tokenizer(
        questions,
        batch["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample_map = encoded.pop("overflow_to_sample_mapping")
    all_offsets = encoded.pop("offset_mapping")
    starts, ends, example_index, offset_mapping, cls_indices = [], [], [], [], []
    for i, sample in enumerate(sample_map):
        sequence_ids = encoded.sequence_ids(i)
        offsets = [
            tuple(o) if sequence_ids[k] == 1 else NO_OFFSET for k, o in enumerate(all_offsets[i])
        ]
        cls_index = encoded["input_ids"][i].index(tokenizer.cls_token_id)
        answers = batch["answers"][sample]
        span = None
        if answers["text"]:
            first = answers["answer_start"][0]
            span = answer_tokens(offsets, first, first + len(answers["text"][0]))
        start, end = span if span is not None else (cls_index, cls_index)
        starts.append(start)
        ends.append(end)
        if for_evaluation:
            example_index.append(indices[sample])
            offset_mapping.append(offsets)
            cls_indices.append(cls_index)
    out = {**encoded, "start_positions": starts, "end_positions": ends}
    if for_evaluation:
        out.update(
            example_index=example_index, offset_mapping=offset_mapping, cls_index=cls_indices
        )
    return out


def answer_tokens(
    offsets: list[tuple[int, int]], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """The token span covering characters ``[start_char, end_char)`` of the context, or
    ``None`` when the window's context does not contain all of them.

    Args:
        offsets: character span of each token; ``NO_OFFSET`` outside the context.
        start_char: first character of the answer.
        end_char: one past its last character.
    """
    context = [k for k, o in enumerate(offsets) if o != NO_OFFSET]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    # The last token starting at or before the answer, the first ending at or after it.
    start = max(k for k in context if offsets[k][0] <= start_char)
    end = min(k for k in context if offsets[k][1] >= end_char)
    return start, end


class SquadHub(TypedDict):
    """A SQuAD dataset on the hub (``task.hub``)."""

    path: str
    splits: dict[str, str]  # kdlab split -> hub split


class SquadOptions(TaskOptions):
    """Keys of ``task=squad`` and ``task=squad_v2`` (``conf/_task_squad.yaml``)."""

    train_file: str | None  # official JSON; else the hub
    validation_file: str | None
    hub: SquadHub
    version_2_with_negative: bool  # unanswerable questions, no-answer odds, v2.0 metrics
    realign_answers: bool  # move misaligned answer spans instead of refusing the file
    doc_stride: NonNegativeInt  # tokens shared by consecutive windows of a long context
    n_best_size: PositiveInt
    max_answer_length: PositiveInt
    null_score_diff_threshold: float
    train_fraction: Annotated[float, Range(gt=0, le=1)] | None
    group_by_length: bool  # training steps of similar lengths (EpochSeededSampler)
    transfer: NotRequired[TransferOptions | None]  # set by transfer=...: unlabelled training


class SquadDataModule(TokenizedDataModule):
    """Windows of SQuAD questions for training and evaluation, and their SQuAD metrics.

    Teacher and student share the (fast) tokenizer, so both receive the same batch. Batch
    sizes count windows.
    """

    head = "question_answering"

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **task: Unpack[SquadOptions],
    ) -> None:
        if not tokenizer.is_fast:
            raise ConfigError(
                f"task={task['name']} needs a fast tokenizer (character offsets); the model's "
                f"{type(tokenizer).__name__} is not one. Use a model whose tokenizer.json exists."
            )
        super().__init__(
            tokenizer=tokenizer, seed=seed, teacher_tokenizer=teacher_tokenizer, **task
        )
        self.collator = DataCollatorWithPadding(tokenizer)
        self.examples: datasets.DatasetDict | None = None
        self.features: dict[str, datasets.Dataset] = {}

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """``task.doc_stride`` must leave room for new tokens in each window."""
        task = cfg.task
        transfer = task.get("transfer")
        if transfer and (transfer.get("files") or transfer.get("corpus")):
            raise ConfigError(
                f"task={task.name}: a SQuAD transfer set is the task's own training questions "
                "(task.transfer.task_inputs=true); task.transfer.files and task.transfer.corpus "
                "take single texts or pairs, not question-context windows."
            )
        if task.doc_stride >= task.max_seq_length:
            raise ConfigError(
                f"task.doc_stride={task.doc_stride} must be less than task.max_seq_length="
                f"{task.max_seq_length}."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        raw = load_squad(self.task)
        raw["train"] = train_subset(raw["train"], self.task)
        transfer = self.task.get("transfer")
        if transfer:
            raw["train"] = sized(raw["train"], transfer)
        self.examples = raw
        self.features = {
            "train": self._windows("train", raw["train"], for_evaluation=False),
            "validation": self._windows("validation", raw["validation"], for_evaluation=True),
        }
        if transfer:  # a transfer set: the windows of the questions, not their answers
            self.features["train"] = self.features["train"].remove_columns(
                ["start_positions", "end_positions"]
            )
        log.info(
            "Task %s: %s",
            self.task.name,
            ", ".join(
                f"{name} {len(raw[name])} questions / {len(f)} windows"
                for name, f in self.features.items()
            ),
        )

    def _windows(
        self, name: str, split: datasets.Dataset, for_evaluation: bool
    ) -> datasets.Dataset:
        max_length = int(self.task.max_seq_length)
        doc_stride = int(self.task.doc_stride)
        windows = split.map(
            encode_windows,
            batched=True,
            with_indices=True,
            remove_columns=split.column_names,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": max_length,
                "doc_stride": doc_stride,
                "for_evaluation": for_evaluation,
            },
            cache_file_name=self.cache_file(name, split, max_length, doc_stride, for_evaluation),
            desc=f"Windows of {self.task.name}/{name}",
        )
        if for_evaluation:
            windows = windows.add_column("feature_index", list(range(len(windows))))
        return windows

    def split_metrics(self) -> dict[str, SquadMetrics]:
        """Fresh SQuAD metrics of the validation split (``val``)."""
        self.setup()
        return {
            "val": SquadMetrics(
                self.features["validation"],
                self.examples["validation"],
                with_negative=bool(self.task.version_2_with_negative),
                n_best_size=int(self.task.n_best_size),
                max_answer_length=int(self.task.max_answer_length),
                null_score_diff_threshold=float(self.task.null_score_diff_threshold),
            )
        }

    def train_split(self) -> datasets.Dataset:
        return self._batches("train")

    def val_dataloader(self, by_length: bool = True) -> list[DataLoader]:
        """The validation windows, longest first unless ``by_length`` is False. A window
        sorts by its example's longest window, so that an example's windows stay together
        and :class:`~kdlab.qa.metrics.SquadMetrics` holds few of them at a time."""
        lengths = None
        if by_length:
            windows = self.features["validation"]
            examples = windows.with_format("arrow")["example_index"].to_numpy()
            longest = np.zeros(examples.max(initial=-1) + 1, dtype=np.int64)
            np.maximum.at(longest, examples, token_lengths(windows))
            lengths = longest[examples]
        batches = self._batches("validation")
        share = self.process_share()
        return [self.eval_loader(batches, **share, by_length=by_length, lengths=lengths)]

    def _batches(self, split: str) -> datasets.Dataset:
        """The split's windows with only the columns a batch carries."""
        features = self.features[split]
        columns = [c for c in [*BATCH_COLUMNS, "feature_index"] if c in features.column_names]
        return features.select_columns(columns)
