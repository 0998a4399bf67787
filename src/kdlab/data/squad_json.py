"""Reading SQuAD files in the official JSON format (``train-v1.1.json``, ``dev-v2.0.json``)
and checking their gold answers against their contexts."""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.data.textfile import not_utf8_error
from kdlab.errors import DataFormatError

log = logging.getLogger(__name__)

# The columns of the hub's rajpurkar/squad and rajpurkar/squad_v2 datasets.
COLUMNS = ("id", "title", "context", "question", "answers")

_REALIGN = (
    "or set task.realign_answers=true to move answers to the occurrence of their text "
    "nearest to answer_start and drop those whose text is not in the context"
)
_V2 = "set task.version_2_with_negative=true (task=squad_v2) if this is a v2.0 file"


@dataclass
class AnswerCheck:
    """Checks the gold answers of one split as it is read and, with ``realign``, repairs
    them, counting the repairs.

    Every answer must lie in its context: ``context[answer_start:answer_start + len(text)]
    == text``, with non-empty text. What happens otherwise:

    ============================  ==========================  ===========================
    case                          training split              validation split
    ============================  ==========================  ===========================
    wrong span, no ``realign``    error                       error
    ``realign``, text in context  start moved to the nearest  same
                                  occurrence (fixed)
    ``realign``, text not in it   answer dropped              answer dropped
    v1.1, no answer (given or     error; ``realign``: the     error, also with ``realign``
    left)                         question is dropped
    v2.0, no answer given         kept (unanswerable)         kept (unanswerable)
    v2.0, all answers dropped     question dropped            error
    ============================  ==========================  ===========================

    Validation questions are never dropped: a missing question would silently change what
    the metrics are computed over, and a v1.1 question without answers cannot be scored.
    Their spans are checked too: a wrong span mislabels the validation windows, and an
    answer whose text is not in the context caps the question's score. A v2.0 question
    whose answers were all dropped is not turned into an unanswerable one, which would
    change its gold label.

    Attributes:
        split: ``"train"`` or ``"validation"``; only ``"train"`` questions may be dropped.
        with_negative: SQuAD v2.0: a question given without answers is unanswerable.
        realign: repair wrong spans (see above) instead of raising.
        answers_fixed: answers moved to their text's nearest occurrence.
        answers_dropped: answers dropped because their text is not in the context.
        questions_dropped: training questions dropped for having no answer left.
    """

    split: str = "train"
    with_negative: bool = False
    realign: bool = False
    answers_fixed: int = 0
    answers_dropped: int = 0
    questions_dropped: int = 0
    _ids: set[str] = field(default_factory=set, repr=False)

    @property
    def changed(self) -> bool:
        """Whether any answer or question was fixed or dropped."""
        return bool(self.answers_fixed or self.answers_dropped or self.questions_dropped)

    def question_id(self, qid: str, where: Callable[[], str]) -> None:
        """Refuse a validation question id seen before in the split: predictions are keyed
        by id, so the metrics would silently score one of the two questions only.

        Raises:
            DataFormatError: naming the source and the id.
        """
        if self.split == "train":
            return
        if qid in self._ids:
            raise DataFormatError(
                f"{where()}: the question id {qid!r} is used by an earlier question too; "
                "validation predictions are matched by id, so one of them would not be "
                "scored. Give every question its own id."
            )
        self._ids.add(qid)

    def answers(self, context: str, answers: dict, where: Callable[[], str]) -> dict | None:
        """A question's checked answers (``{"text": [...], "answer_start": [...]}``).

        Args:
            context: the question's context.
            answers: its gold answers, as read.
            where: the source, article and question id, for messages (called on error).

        Returns:
            The answers, re-aligned where needed; ``None`` when the question is dropped.

        Raises:
            DataFormatError: as the class docstring's table says.
        """
        texts, starts = [], []
        pairs = zip(answers["text"], answers["answer_start"], strict=True)
        for k, (text, start) in enumerate(pairs):
            problem = _span_problem(context, text, start)
            if problem is None:
                texts.append(text)
                starts.append(start)
                continue
            if not self.realign:
                raise DataFormatError(f"{where()}: answers[{k}] {problem}. Fix it, {_REALIGN}.")
            nearest = _nearest_occurrence(context, text, start)
            if nearest is None:
                self.answers_dropped += 1
            else:
                self.answers_fixed += 1
                texts.append(text)
                starts.append(nearest)
        if texts or (self.with_negative and not answers["text"]):
            return {"text": texts, "answer_start": starts}
        return self._unanswered(len(answers["text"]), where)

    def _unanswered(self, given: int, where: Callable[[], str]) -> None:
        if self.split != "train":
            if given:
                raise DataFormatError(
                    f"{where()}: none of its {given} answers occurs in the context, and "
                    "validation questions are never dropped. Fix its answers or remove it."
                )
            raise DataFormatError(
                f"{where()}: validation question without answers; a SQuAD v1.1 question "
                f"needs one to be scored. Add its answers or remove it, or {_V2}."
            )
        if not self.realign:
            # Wrong spans raised above, so only a question given without answers gets here.
            raise DataFormatError(
                f"{where()}: training question without answers; SQuAD v1.1 questions need "
                f"one. Add its answer or remove it, {_V2}, or set task.realign_answers=true "
                "to drop such questions."
            )
        self.questions_dropped += 1
        return None

    def log_summary(self, source: str) -> None:
        """Log how many answers and questions of ``source`` were fixed or dropped."""
        if self.changed:
            log.warning(
                "%s: task.realign_answers re-aligned %d answers to their text, dropped %d "
                "answers whose text is not in the context and %d training questions left "
                "without answers",
                source,
                self.answers_fixed,
                self.answers_dropped,
                self.questions_dropped,
            )
        elif self.realign:
            log.info("%s: every answer matches its context; nothing to re-align", source)


def _span_problem(context: str, text: str, start: int) -> str | None:
    """What is wrong with an answer's span, or ``None`` when it matches the context."""
    if not text.strip():
        return "has empty text"
    if not 0 <= start < len(context):
        return (
            f"{_clip(text)!r} starts at answer_start={start}, outside the context "
            f"({len(context)} characters){_hint(context, text, start)}"
        )
    found = context[start : start + len(text)]
    if found != text:
        return (
            f"{_clip(text)!r} does not match the context at answer_start={start}, which reads "
            f"{_clip(found)!r}{_hint(context, text, start)}"
        )
    return None


def _hint(context: str, text: str, start: int) -> str:
    nearest = _nearest_occurrence(context, text, start)
    if nearest is None:
        return "; the text does not occur in the context"
    return f"; the text's nearest occurrence starts at {nearest}"


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """The start of the occurrence of ``text`` in ``context`` nearest to ``start`` (the
    earlier of two equally near), or ``None`` when it does not occur."""
    if not text:
        return None
    best = None
    at = context.find(text)
    while at != -1:
        if best is None or abs(at - start) < abs(best - start):
            best = at
        if at >= start:
            break  # later occurrences are farther away
        at = context.find(text, at + 1)
    return best


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_squad_json(path: Path, check: AnswerCheck | None = None) -> dict[str, list]:
    """One row per question: ``id``, ``title``, ``context``, ``question`` and ``answers``
    (``{"text": [...], "answer_start": [...]}``, empty for an unanswerable v2.0 question).

    v2.0's ``plausible_answers`` of unanswerable questions are not gold answers and are
    dropped. Each question's answers go through ``check`` as they are read; its counts
    tell what ``check.realign`` fixed and dropped.

    Args:
        path: the JSON file.
        check: how answers are checked; by default spans must match and questions without
            answers are kept (the file's SQuAD version is not known here).

    Raises:
        DataFormatError: naming the file, and the article (index and title) and question id
            of a malformed entry or a wrong answer; the line of a byte that is not UTF-8.
    """
    check = check if check is not None else AnswerCheck(with_negative=True)
    try:
        articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except UnicodeDecodeError as err:
        raise not_utf8_error(path) from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataFormatError(f"{path}: not a SQuAD JSON file with a 'data' list ({err}).") from err
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for a, article in enumerate(articles):
        title = article.get("title", "")
        for paragraph in article.get("paragraphs", []):
            try:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    where = _where(path, a, title, qa["id"])
                    check.question_id(qa["id"], where)
                    answers = check.answers(context, _answers(qa, where), where)
                    if answers is None:
                        continue
                    row = (qa["id"], title, context, qa["question"], answers)
                    for name, value in zip(COLUMNS, row, strict=True):
                        columns[name].append(value)
            except (KeyError, TypeError) as err:
                raise DataFormatError(
                    f"{path}: article {a} ('{title}') lacks {err} in a paragraph or question."
                ) from err
    return columns


def _answers(qa: dict, where: Callable[[], str]) -> dict[str, list]:
    answers = [] if qa.get("is_impossible", False) else qa["answers"]
    starts = []
    for k, answer in enumerate(answers):
        start = answer["answer_start"]
        if isinstance(start, str) and start.strip().lstrip("-").isdigit():
            start = int(start)  # "12": a number written as a string, still an offset
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataFormatError(
                f"{where()}: answers[{k}] has answer_start={start!r}, which is not a "
                "character offset (a whole number >= 0). Fix it in the file."
            )
        starts.append(start)
    return {"text": [x["text"] for x in answers], "answer_start": starts}


def _where(path: Path, article: int, title: str, qid: str) -> Callable[[], str]:
    return lambda: f"{path}: article {article} ('{title}'), question {qid}"
