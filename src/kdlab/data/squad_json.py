"""Reading SQuAD files in the official JSON format (``train-v1.1.json``, ``dev-v2.0.json``)."""

import json
from pathlib import Path

from kdlab.errors import DataFormatError

# The columns of the hub's rajpurkar/squad and rajpurkar/squad_v2 datasets.
COLUMNS = ("id", "title", "context", "question", "answers")


def read_squad_json(path: Path) -> dict[str, list]:
    """One row per question: ``id``, ``title``, ``context``, ``question`` and ``answers``
    (``{"text": [...], "answer_start": [...]}``, empty for an unanswerable v2.0 question).

    v2.0's ``plausible_answers`` of unanswerable questions are not gold answers and are
    dropped.

    Raises:
        DataFormatError: naming the file and the article or question that is malformed.
    """
    try:
        articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataFormatError(f"{path}: not a SQuAD JSON file with a 'data' list ({err}).") from err
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for a, article in enumerate(articles):
        for paragraph in article.get("paragraphs", []):
            try:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    impossible = qa.get("is_impossible", False)
                    answers = [] if impossible else qa["answers"]
                    columns["id"].append(qa["id"])
                    columns["title"].append(article.get("title", ""))
                    columns["context"].append(context)
                    columns["question"].append(qa["question"])
                    columns["answers"].append(
                        {
                            "text": [x["text"] for x in answers],
                            "answer_start": [int(x["answer_start"]) for x in answers],
                        }
                    )
            except (KeyError, TypeError) as err:
                raise DataFormatError(
                    f"{path}: article {a} ('{article.get('title', '')}') lacks {err} in a "
                    "paragraph or question."
                ) from err
    return columns
