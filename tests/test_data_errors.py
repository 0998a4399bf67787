"""Bad data files fail as they are read, naming the file and line (SQuAD: the article and
question id) and what to do."""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest

from kdlab.data.corpus import load_text
from kdlab.data.sources import load_glue
from kdlab.data.squad import FEATURES, check_hub_answers, load_squad
from kdlab.data.squad_json import AnswerCheck, read_squad_json
from kdlab.errors import ConfigError, DataFormatError
from tests.conftest import build_task, compose
from tests.fixtures import write_corpus, write_glue, write_squad, write_tokenizer

# What a case gives the test: the reading call, the error it must raise, and the strings
# its message must contain.
Case = tuple[Callable[[], object], type[Exception], list[str]]


# --- GLUE TSV -----------------------------------------------------------------------


def _glue_task(tmp_path: Path, task: str, folder: str) -> Callable[[], object]:
    write_glue(tmp_path / "glue", tasks=(task,))
    cfg = compose([f"task={task}", f"task.data_dir={tmp_path / 'glue' / folder}", "run_dir=x"])
    return lambda: load_glue(cfg.task)


def tsv_not_utf8_past_first_buffer(tmp_path, monkeypatch) -> Case:
    # 2,000 rows: the bad byte lies well past the decoder's first 8 KiB read.
    write_glue(tmp_path / "glue", n_train=2000, tasks=("sst2",))
    path = tmp_path / "glue" / "SST-2" / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    line_no = 1500
    lines[line_no - 1] = b"caf\xe9 " + lines[line_no - 1]
    path.write_bytes(b"\n".join(lines))
    cfg = compose(["task=sst2", f"task.data_dir={path.parent}", "run_dir=x"])
    expected = f"{path}:{line_no}: not valid UTF-8 (byte 0xe9 at column 4)"
    return lambda: load_glue(cfg.task), DataFormatError, [expected, "UTF-8"]


def tsv_not_utf8_after_bom(tmp_path, monkeypatch) -> Case:
    # MRPC starts with a byte-order mark, which is not a column.
    read = _glue_task(tmp_path, "mrpc", "MRPC")
    path = tmp_path / "glue" / "MRPC" / "dev.tsv"
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfQuality")
    path.write_bytes(raw.replace(b"Quality", b"Qu\xe4lity", 1))
    return read, DataFormatError, [f"{path}:1: not valid UTF-8 (byte 0xe4 at column 3)"]


def tsv_header_only(tmp_path, monkeypatch) -> Case:
    read = _glue_task(tmp_path, "sst2", "SST-2")
    path = tmp_path / "glue" / "SST-2" / "train.tsv"
    path.write_text("sentence\tlabel\n", encoding="utf-8")
    return read, DataFormatError, [f"{path}: no data rows (only a header)", "task.files.train"]


def tsv_blank_only(tmp_path, monkeypatch) -> Case:
    read = _glue_task(tmp_path, "rte", "RTE")
    path = tmp_path / "glue" / "RTE" / "dev.tsv"
    path.write_text("\n  \n\n", encoding="utf-8")
    return read, DataFormatError, [f"{path}: no data rows", "task.files.validation"]


# --- corpus text ----------------------------------------------------------------------


def _corpus_task(files: list[Path], *overrides: str):
    listed = ",".join(str(f) for f in files)
    return compose(
        ["task=corpus/local", f"task.files=[{listed}]", "task.cache_dir=null", "run_dir=x"]
        + list(overrides)
    ).task


def corpus_directory_as_file(tmp_path, monkeypatch) -> Case:
    folder = write_corpus(tmp_path / "corpus")
    task = _corpus_task([folder])
    return lambda: load_text(task), ConfigError, [f"'{folder}' is a directory", f"{folder}/*.txt"]


def corpus_empty_file(tmp_path, monkeypatch) -> Case:
    folder = write_corpus(tmp_path / "corpus")
    (folder / "c.txt").write_text("")
    task = _corpus_task([folder / "*.txt"])
    return lambda: load_text(task), DataFormatError, [f"{folder / 'c.txt'}: the file is empty"]


def corpus_blank_file(tmp_path, monkeypatch) -> Case:
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\t\n")
    task = _corpus_task([path])
    return lambda: load_text(task), DataFormatError, [f"{path}: the file has only blank lines"]


def corpus_not_utf8(tmp_path, monkeypatch) -> Case:
    folder = write_corpus(tmp_path / "corpus")
    path = folder / "b.txt"
    lines = path.read_bytes().split(b"\n")
    line_no = 7
    lines[line_no - 1] = lines[line_no - 1] + b" na\xefve"
    column = len(lines[line_no - 1]) - len(b"ve")  # the byte before "ve", counted from 1
    path.write_bytes(b"\n".join(lines))
    task = _corpus_task([folder / "*.txt"])
    expected = f"{path}:{line_no}: not valid UTF-8 (byte 0xef at column {column})"
    return lambda: load_text(task), DataFormatError, [expected]


def _chunking(tmp_path: Path, text: str, *overrides: str) -> Case:
    path = tmp_path / "short.txt"
    path.write_text(text)
    tokenizer = write_tokenizer(tmp_path / "tok")
    module = build_task(_corpus_task([path], *overrides), tokenizer)
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return module.setup, ConfigError, [f"task.files=['{path}']", f"has {tokens} tokens"]


def corpus_shorter_than_one_chunk(tmp_path, monkeypatch) -> Case:
    read, error, names = _chunking(
        tmp_path, "the movie was good\nthe plot was bad\n", "task.max_seq_length=64"
    )
    return read, error, [*names, "too few for one chunk of task.max_seq_length=64"]


def corpus_too_few_chunks_to_hold_out(tmp_path, monkeypatch) -> Case:
    # 12 one-token words make 3 chunks of 4 (+ [CLS], [SEP]); holding out 0.75 takes
    # ceil(2.25) = 3 of them. 4 chunks would leave one: 4 - ceil(3.0) = 1.
    text = "the movie was good and the plot was bad but i love\n"
    read, error, names = _chunking(
        tmp_path, text, "task.max_seq_length=6", "task.validation_fraction=0.75"
    )
    return read, error, [*names, "make 3 chunks", "holds out 3", "At least 4 chunks"]


# --- SQuAD ------------------------------------------------------------------------------


def _squad_files(tmp_path: Path, edit: Callable[[list], None], in_validation: bool = False):
    """A fixture train and dev file; ``edit`` changes the articles of one of them."""
    train = write_squad(tmp_path / "train.json", seed=1)
    dev = write_squad(tmp_path / "dev.json", seed=2)
    path = dev if in_validation else train
    data = json.loads(path.read_text())
    edit(data["data"])
    path.write_text(json.dumps(data))
    return train, dev, path


def _squad_task(train: Path | None, dev: Path | None, *overrides: str):
    files = [f"task.train_file={train or 'null'}", f"task.validation_file={dev or 'null'}"]
    return compose(["task=squad", *files, "run_dir=x", *overrides]).task


def _qa(articles: list, a: int, q: int) -> dict:
    return articles[a]["paragraphs"][0]["qas"][q]


def squad_start_beyond_context(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        context = articles[2]["paragraphs"][0]["context"]
        _qa(articles, 2, 1)["answers"][0]["answer_start"] = len(context) + 5

    train, dev, path = _squad_files(tmp_path, edit)
    where = f"{path}: article 2 ('article 2'), question a2q1"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [where, "outside"]


def squad_span_does_not_match(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 1, 3)["answers"][0]["answer_start"] += 1

    train, dev, path = _squad_files(tmp_path, edit, in_validation=True)
    where = f"{path}: article 1 ('article 1'), question a1q3"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [where, "realign"]


def squad_v11_training_question_without_answers(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 3, 0)["answers"] = []

    train, dev, path = _squad_files(tmp_path, edit)
    where = f"{path}: article 3 ('article 3'), question a3q0: training question without"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [where]


def squad_v11_validation_question_without_answers_even_realigned(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 0, 2)["answers"] = []

    train, dev, path = _squad_files(tmp_path, edit, in_validation=True)
    task = _squad_task(train, dev, "task.realign_answers=true")
    where = f"{path}: article 0 ('article 0'), question a0q2: validation question without"
    return lambda: load_squad(task), DataFormatError, [where]


def squad_validation_answer_not_in_context_even_realigned(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 2, 2)["answers"][0]["text"] = "zebra"

    train, dev, path = _squad_files(tmp_path, edit, in_validation=True)
    task = _squad_task(train, dev, "task.realign_answers=true")
    where = f"{path}: article 2 ('article 2'), question a2q2: none of its 1 answers"
    return lambda: load_squad(task), DataFormatError, [where, "never dropped"]


def squad_not_utf8(tmp_path, monkeypatch) -> Case:
    train = write_squad(tmp_path / "train.json", seed=1)
    text = json.dumps(json.loads(train.read_text()), indent=1)
    line_no = text[: text.index('"article 3"')].count("\n") + 1
    column = len(text.splitlines()[line_no - 1].split('"article 3"')[0]) + len('"artic') + 1
    train.write_bytes(text.encode().replace(b'"article 3"', b'"artic\xe9le 3"'))
    expected = f"{train}:{line_no}: not valid UTF-8 (byte 0xe9 at column {column})"
    return lambda: load_squad(_squad_task(train, train)), DataFormatError, [expected]


def squad_hub_span_does_not_match(tmp_path, monkeypatch) -> Case:
    columns = read_squad_json(write_squad(tmp_path / "hub.json", seed=3))
    row = columns["id"].index("a1q2")
    columns["answers"][row]["answer_start"][0] += 2
    hub = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(columns, features=FEATURES) for s in ("train", "validation")}
    )
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: hub)
    where = "hub dataset rajpurkar/squad (split train): article 'article 1', question a1q2"
    return lambda: load_squad(_squad_task(None, None)), DataFormatError, [where]


# --- Issue 18 (bad inputs): SQuAD values, ids and empty files --------------------------


def squad_answer_start_not_a_number(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 1, 2)["answers"][0]["answer_start"] = "abc"

    train, dev, path = _squad_files(tmp_path, edit)
    where = f"{path}: article 1 ('article 1'), question a1q2: answers[0] has answer_start='abc'"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [where]


def squad_duplicate_id_in_validation(tmp_path, monkeypatch) -> Case:
    def edit(articles):
        _qa(articles, 2, 1)["id"] = "a0q3"

    train, dev, path = _squad_files(tmp_path, edit, in_validation=True)
    where = f"{path}: article 2 ('article 2'), question a0q3: the question id 'a0q3'"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [where, "own id"]


def squad_hub_duplicate_id_in_validation(tmp_path, monkeypatch) -> Case:
    columns = read_squad_json(write_squad(tmp_path / "hub.json", seed=3))
    columns["id"][5] = columns["id"][1]
    hub = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(columns, features=FEATURES) for s in ("train", "validation")}
    )
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: hub)
    where = "hub dataset rajpurkar/squad (split validation): article 'article 1', question a0q1"
    return lambda: load_squad(_squad_task(None, None)), DataFormatError, [where, "own id"]


def _squad_without_questions(tmp_path: Path, in_validation: bool) -> Case:
    def edit(articles):
        articles.clear()

    train, dev, path = _squad_files(tmp_path, edit, in_validation)
    key, split = ("validation_file", "validation") if in_validation else ("train_file", "train")
    expected = f"{path} (task.{key}) has no {split} questions"
    return lambda: load_squad(_squad_task(train, dev)), DataFormatError, [expected]


def squad_training_file_without_questions(tmp_path, monkeypatch) -> Case:
    return _squad_without_questions(tmp_path, in_validation=False)


def squad_validation_file_without_questions(tmp_path, monkeypatch) -> Case:
    return _squad_without_questions(tmp_path, in_validation=True)


CASES = [
    tsv_not_utf8_past_first_buffer,
    tsv_not_utf8_after_bom,
    tsv_header_only,
    tsv_blank_only,
    corpus_directory_as_file,
    corpus_empty_file,
    corpus_blank_file,
    corpus_not_utf8,
    corpus_shorter_than_one_chunk,
    corpus_too_few_chunks_to_hold_out,
    squad_start_beyond_context,
    squad_span_does_not_match,
    squad_v11_training_question_without_answers,
    squad_v11_validation_question_without_answers_even_realigned,
    squad_validation_answer_not_in_context_even_realigned,
    squad_not_utf8,
    squad_hub_span_does_not_match,
    # Issue 18 (bad inputs)
    squad_answer_start_not_a_number,
    squad_duplicate_id_in_validation,
    squad_hub_duplicate_id_in_validation,
    squad_training_file_without_questions,
    squad_validation_file_without_questions,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_names_file_and_line(case, tmp_path, monkeypatch):
    read, error, expected = case(tmp_path, monkeypatch)
    with pytest.raises(error) as raised:
        read()
    message = str(raised.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# --- task.realign_answers ------------------------------------------------------------

# "cat" starts at 16 and 28, "dog" at 4 and 40, "saw" at 8 and 32.
CONTEXT = "the dog saw the cat and the cat saw the dog."


def _question(qid: str, *answers: tuple[str, int]) -> dict:
    return {
        "id": qid,
        "question": "what?",
        "answers": [{"text": text, "answer_start": start} for text, start in answers],
    }


def _write_realign_fixture(path: Path) -> Path:
    qas = [
        _question("ok", ("cat", 16)),
        _question("shifted", ("cat", 26)),  # 28 is 2 away, 16 is 10 away
        _question("beyond", ("dog", 999)),  # past the end: the last "dog", 40
        _question("tie", ("cat", 22)),  # 16 and 28 both 6 away: the earlier
        _question("gone", ("horse", 0)),  # not in the context: answer and question go
        _question("mixed", ("saw", 32), ("bird", 5)),  # the good answer stays
        _question("none"),  # v1.1 training question without answers: dropped
    ]
    article = {"title": "pets", "paragraphs": [{"context": CONTEXT, "qas": qas}]}
    path.write_text(json.dumps({"version": "1.1", "data": [article]}))
    return path


def test_realign_fixes_and_drops_training_answers(tmp_path):
    path = _write_realign_fixture(tmp_path / "train.json")
    check = AnswerCheck(split="train", realign=True)
    columns = read_squad_json(path, check)
    assert (check.answers_fixed, check.answers_dropped, check.questions_dropped) == (3, 2, 2)
    assert columns["id"] == ["ok", "shifted", "beyond", "tie", "mixed"]
    assert [a["answer_start"] for a in columns["answers"]] == [[16], [28], [40], [16], [32]]
    assert [a["text"] for a in columns["answers"]] == [["cat"], ["cat"], ["dog"], ["cat"], ["saw"]]
    for answers in columns["answers"]:
        start, text = answers["answer_start"][0], answers["text"][0]
        assert CONTEXT[start : start + len(text)] == text


def test_realign_keeps_validation_questions_and_logs_counts(tmp_path, caplog):
    data = json.loads(_write_realign_fixture(tmp_path / "x.json").read_text())
    qas = data["data"][0]["paragraphs"][0]["qas"]
    data["data"][0]["paragraphs"][0]["qas"] = [q for q in qas if q["id"] not in ("gone", "none")]
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(data))
    train = write_squad(tmp_path / "train.json")
    with caplog.at_level(logging.WARNING, logger="kdlab.data.squad_json"):
        splits = load_squad(_squad_task(train, dev, "task.realign_answers=true"))
    assert splits["validation"]["id"] == ["ok", "shifted", "beyond", "tie", "mixed"]
    assert [a["answer_start"] for a in splits["validation"]["answers"]] == [
        [16],
        [28],
        [40],
        [16],
        [32],
    ]
    assert "re-aligned 3 answers" in caplog.text and "dropped 1 answers" in caplog.text
    assert "0 training questions" in caplog.text


def test_clean_files_read_the_same_with_or_without_realign(tmp_path):
    train = write_squad(tmp_path / "train.json", seed=1)
    dev = write_squad(tmp_path / "dev.json", seed=2)
    plain = load_squad(_squad_task(train, dev))
    realigned = load_squad(_squad_task(train, dev, "task.realign_answers=true"))
    for split in ("train", "validation"):
        assert plain[split].to_dict() == realigned[split].to_dict()
        assert plain[split].to_dict() == read_squad_json(train if split == "train" else dev)
    # A clean hub split is returned as it is, keeping its cache fingerprint.
    assert check_hub_answers(plain["train"], AnswerCheck(realign=True), "hub") is plain["train"]


def test_v2_unanswerable_questions_are_kept(tmp_path):
    train = write_squad(tmp_path / "train.json", unanswerable=True, seed=1)
    task = compose(
        ["task=squad_v2", f"task.train_file={train}", f"task.validation_file={train}", "run_dir=x"]
    ).task
    train_split = load_squad(task)["train"]
    empty = [row["id"] for row in train_split if not row["answers"]["text"]]
    assert empty == [f"a{a}-none" for a in range(4)]


def test_realign_on_a_hub_split(tmp_path):
    columns = read_squad_json(write_squad(tmp_path / "hub.json", seed=3))
    row = columns["id"].index("a1q2")
    good = columns["answers"][row]["answer_start"][0]
    columns["answers"][row]["answer_start"][0] = good + 2
    questions = datasets.Dataset.from_dict(columns, features=FEATURES)
    check = AnswerCheck(realign=True)
    fixed = check_hub_answers(questions, check, "hub dataset x (split train)")
    assert (check.answers_fixed, check.answers_dropped, check.questions_dropped) == (1, 0, 0)
    assert fixed[row]["answers"]["answer_start"] == [good]
    assert fixed["id"] == questions["id"]


# --- Issue 18: a damaged tokenised-dataset cache (i18-inputs) ---------------------------


def test_a_truncated_tokenised_cache_is_deleted_and_rebuilt_with_a_warning(tmp_path, caplog):
    write_glue(tmp_path / "glue", tasks=("sst2",))
    overrides = [f"task.data_dir={tmp_path / 'glue' / 'SST-2'}", f"task.cache_dir={tmp_path}/c"]
    task = compose(["task=sst2", *overrides, "run_dir=x"]).task
    tokenizer = write_tokenizer(tmp_path / "tok")
    first = build_task(task, tokenizer)
    first.setup("fit")
    (cached,) = (tmp_path / "c" / "sst2").glob("train-*.arrow")
    cached.write_bytes(cached.read_bytes()[:-200])  # an interrupted write or copy
    again = build_task(task, tokenizer)
    with caplog.at_level(logging.WARNING, logger="kdlab.data.base"):
        again.setup("fit")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"Deleting {cached}, a damaged cache (")
    assert again.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
