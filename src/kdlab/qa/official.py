"""SQuAD evaluation as the official v1.1 and v2.0 scripts define it.

Answers are compared after normalisation: lower case, punctuation removed, the articles
``a``/``an``/``the`` removed, whitespace collapsed. Per question, exact match and token F1
take the maximum over the gold answers; dataset scores are percentages.

The two versions differ in three documented ways, all kept here:

- v2.0 drops gold answers that normalise to the empty string, and an unanswerable question
  has the single gold answer ``""``; v1.1 uses every gold text as given.
- Token F1 when a side has no tokens: v2.0 scores 1 if both are empty and 0 otherwise;
  v1.1 scores 0 whenever no token is shared (so also when both are empty).
- v2.0 also reports the answerable (``HasAns``) and unanswerable (``NoAns``) subsets, and
  with no-answer odds the best threshold on them (``best_exact``/``best_f1`` and their
  ``_thresh``).
"""

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> int:
    """1 if the normalised strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, *, empty_matches_empty: bool) -> float:
    """Harmonic mean of token precision and recall after normalisation.

    Args:
        prediction: predicted answer text.
        gold: one gold answer text.
        empty_matches_empty: the v2.0 rule (both empty → 1, one empty → 0); ``False`` is
            the v1.1 rule (no shared token → 0).
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_matches_empty and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1(golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict:
    """Official SQuAD v1.1 ``exact_match`` and ``f1``.

    Args:
        golds: question id → gold answer texts.
        predictions: question id → predicted text; a question without a prediction
            scores 0, as in the official script.
    """
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(token_f1(pred, a, empty_matches_empty=False) for a in answers)
    total = len(golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def squad_v2(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """Official SQuAD v2.0 metrics.

    Args:
        golds: question id → gold answer texts (empty for an unanswerable question).
        predictions: question id → predicted text (``""`` predicts no answer); every
            question needs one, as in the official script.
        null_odds: question id → no-answer odds (``null_odds.json``); without them every
            question has odds 0 and no threshold search is reported.
        na_prob_thresh: questions whose odds exceed it count as predicted unanswerable
            (the official ``--na-prob-thresh``).

    Returns:
        ``exact``, ``f1``, ``total``; ``HasAns_*`` / ``NoAns_*`` for the subsets present;
        with ``null_odds`` also ``best_exact``, ``best_exact_thresh``, ``best_f1``,
        ``best_f1_thresh``.
    """
    missing = [qid for qid in golds if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[0]!r}.")
    odds = dict.fromkeys(golds, 0.0) if null_odds is None else null_odds
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}
    raw_exact, raw_f1 = {}, {}
    for qid, answers in golds.items():
        texts = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions[qid]
        raw_exact[qid] = max(exact_match(pred, a) for a in texts)
        raw_f1[qid] = max(token_f1(pred, a, empty_matches_empty=True) for a in texts)
    # Above the odds threshold a question counts as answered "no answer".
    exact = {
        q: float(not has_answer[q]) if odds[q] > na_prob_thresh else s for q, s in raw_exact.items()
    }
    f1 = {q: float(not has_answer[q]) if odds[q] > na_prob_thresh else s for q, s in raw_f1.items()}
    result = _summary("", exact, f1, list(golds))
    for name, want in (("HasAns", True), ("NoAns", False)):
        subset = [q for q in golds if has_answer[q] == want]
        if subset:
            result.update(_summary(f"{name}_", exact, f1, subset))
    if null_odds is not None:
        for name, scores in (("exact", raw_exact), ("f1", raw_f1)):
            best, thresh = best_threshold(scores, predictions, odds, has_answer)
            result[f"best_{name}"] = best
            result[f"best_{name}_thresh"] = thresh
    return result


def _summary(prefix: str, exact: dict, f1: dict, qids: list[str]) -> dict:
    n = len(qids)
    return {
        f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / n,
        f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / n,
        f"{prefix}total": n,
    }


def best_threshold(
    scores: Mapping[str, float],
    predictions: Mapping[str, str],
    odds: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """The no-answer odds threshold that maximises the total score, and that score (%).

    With threshold ``t`` a question keeps its prediction if its odds are at most ``t`` and
    is answered "no answer" otherwise. Starting from every question answered "no answer"
    (one point per unanswerable question), questions are switched to their prediction in
    order of increasing odds: an answerable one gains its score, an unanswerable one loses
    its point if the prediction is non-empty. The best threshold is the odds of the
    question at which the running total first reaches its maximum (0.0 if no switch helps).
    """
    total = best = float(sum(not a for a in has_answer.values()))
    thresh = 0.0
    # Same walk order as the official script: by odds, ties in the odds' own order.
    for qid in sorted(odds, key=lambda q: odds[q]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            total += scores[qid]
        elif predictions[qid]:
            total -= 1
        if total > best:
            best, thresh = total, odds[qid]
    return 100.0 * best / len(scores), thresh
