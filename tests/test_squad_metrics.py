"""Official SQuAD scoring: hand-computed cases and agreement with an independent
re-computation (tests/squad_reference.py) on many predictions."""

import json
import random
from pathlib import Path

import pytest

from kdlab.qa.official import exact_match, normalize_answer, squad_v1, squad_v2, token_f1
from tests.fixtures import write_squad
from tests.squad_reference import reference_v1, reference_v2

DEV_V11 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad" / "dev-v1.1.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  an   apple, a pear  ", "apple pear"),
        ("Theatre and another", "theatre and another"),  # articles only as whole words
        ("A.B.C.", "abc"),  # punctuation goes before articles are looked for
        ("the", ""),
        ("Denver   Broncos\n", "denver broncos"),
    ],
)
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Beatles.", "beatles") == 1
    assert exact_match("Beatles", "the rolling stones") == 0
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3.
    assert token_f1("the cat sat", "cat sat down", empty_matches_empty=False) == pytest.approx(0.8)
    # Repeated tokens count once per occurrence: P = 1/2, R = 1.
    assert token_f1("a cat cat", "cat", empty_matches_empty=False) == pytest.approx(2 / 3)
    assert token_f1("dog", "cat", empty_matches_empty=True) == 0.0


def test_empty_answers_follow_each_version():
    # v2.0: both empty is a match, one empty is not; v1.1: no shared token scores 0.
    assert token_f1("", "", empty_matches_empty=True) == 1.0
    assert token_f1("the", "a", empty_matches_empty=True) == 1.0
    assert token_f1("", "cat", empty_matches_empty=True) == 0.0
    assert token_f1("", "", empty_matches_empty=False) == 0.0
    assert exact_match("", "") == 1


def test_v1_takes_the_best_gold_and_counts_missing_predictions_as_zero():
    golds = {
        "q1": ["Denver Broncos", "The Denver Broncos", "Broncos"],
        "q2": ["in 1990", "1990"],
        "q3": ["blue sky"],
    }
    scores = squad_v1(golds, {"q1": "broncos", "q2": "around 1990"})
    # q1 exact; q2 best F1 against "1990" (P 1/2, R 1); q3 unanswered.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_v2_subsets_threshold_and_best_threshold_by_hand():
    golds = {"h1": ["Paris"], "h2": ["red car"], "n1": [], "n2": []}
    predictions = {"h1": "paris", "h2": "red", "n1": "", "n2": "blue"}
    odds = {"h1": -2.0, "h2": 0.5, "n1": 3.0, "n2": 2.0}
    scores = squad_v2(golds, predictions, odds)
    # n2's odds exceed the default na_prob_thresh 1.0, so it counts as "no answer": right.
    assert scores["exact"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 1) / 4)
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(100.0)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (4, 2, 2)
    # Walk by odds from "all no answer" (2 points): h1 +1 -> 3 at -2.0; h2 +0 (exact) or
    # +2/3 (f1) at 0.5; n2 answers "blue" -> -1; n1 stays empty.
    assert scores["best_exact"] == pytest.approx(75.0)
    assert scores["best_exact_thresh"] == -2.0
    assert scores["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert scores["best_f1_thresh"] == 0.5


def test_v2_without_odds_has_no_threshold_search_and_needs_every_prediction():
    scores = squad_v2({"h1": ["Paris"]}, {"h1": "Paris"})
    assert "best_f1" not in scores and "NoAns_total" not in scores
    assert scores["exact"] == 100.0
    with pytest.raises(ValueError, match="no prediction"):
        squad_v2({"h1": ["Paris"], "n1": []}, {"h1": "Paris"})


def _perturbed_predictions(dataset, seed):
    """Predictions of every kind: exact gold, gold with noise, partial spans, other context
    words, punctuation/article variants, empty strings, and missing questions."""
    rng = random.Random(seed)
    predictions = {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            words = paragraph["context"].split()
            for qa in paragraph["qas"]:
                golds = [a["text"] for a in qa["answers"]] or [""]
                gold = rng.choice(golds)
                kind = rng.randrange(7)
                if kind == 0:
                    pred = gold
                elif kind == 1:
                    pred = f"The {gold.upper()}, {rng.choice(words)}."
                elif kind == 2:
                    toks = gold.split()
                    pred = " ".join(toks[: rng.randint(0, len(toks))])
                elif kind == 3:
                    i = rng.randrange(len(words))
                    pred = " ".join(words[i : i + rng.randint(1, 5)])
                elif kind == 4:
                    pred = ""
                elif kind == 5:
                    pred = f"a {gold} {gold}!"
                else:
                    continue
                predictions[qa["id"]] = pred
    return predictions


def _golds(dataset):
    return {
        qa["id"]: [a["text"] for a in qa["answers"]]
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }


def _answerable(dataset):
    """The dataset without unanswerable questions (the v1.1 script cannot score them)."""
    return [
        {
            "paragraphs": [
                {"qas": [qa for qa in paragraph["qas"] if qa["answers"]]}
                for paragraph in article["paragraphs"]
            ]
        }
        for article in dataset
    ]


def _check_agreement(dataset, seed):
    predictions = _perturbed_predictions(dataset, seed)
    golds = _golds(dataset)
    v1_data = _answerable(dataset)
    assert squad_v1(_golds(v1_data), predictions) == reference_v1(v1_data, predictions)
    full = {qid: predictions.get(qid, "") for qid in golds}
    rng = random.Random(seed)
    odds = {qid: rng.choice([rng.uniform(-5, 5), 0.0, 1.0, 2.5]) for qid in golds}
    assert squad_v2(golds, full, odds) == reference_v2(dataset, full, odds)
    assert squad_v2(golds, full, odds, na_prob_thresh=0.0) == reference_v2(
        dataset, full, odds, thresh=0.0
    )


def test_agrees_with_reference_on_fixture_data(tmp_path):
    path = write_squad(tmp_path / "v2.json", n_articles=8, unanswerable=True, seed=3)
    _check_agreement(json.loads(path.read_text())["data"], seed=0)


@pytest.mark.skipif(not DEV_V11.is_file(), reason=f"official SQuAD dev file absent ({DEV_V11})")
def test_agrees_with_reference_on_official_dev_v11():
    dataset = json.loads(DEV_V11.read_text())["data"]
    # The dev file has no unanswerable questions; blank some answers to exercise NoAns.
    for a, article in enumerate(dataset):
        if a % 4 == 0:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"][::3]:
                    qa["answers"] = []
    _check_agreement(dataset, seed=1)
