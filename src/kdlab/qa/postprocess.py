"""From start/end logits of an example's windows to its answer text (and no-answer odds).

As the reference implementations: the ``n_best_size`` highest start and end logits of each
window are paired, pairs that leave the context, end before they start or span more than
``max_answer_length`` tokens are dropped, and the best-scoring pair (start + end logit) over
all windows gives the answer's character span in the context. With unanswerable questions
(SQuAD v2.0) the null score is the lowest CLS score (start + end logit at CLS) over the
windows; the no-answer odds are the null score minus the best span's score, and the answer
is empty when they exceed ``null_score_diff_threshold``.
"""

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Window:
    """One feature (window) of an example, cut to its own length.

    Attributes:
        start_logits: ``[L]`` start logits.
        end_logits: ``[L]`` end logits.
        offsets: ``[L, 2]`` character span of each token in the context; ``-1`` for tokens
            outside the context (question, special tokens).
        cls_index: position of the CLS token, where "no answer" points.
    """

    start_logits: Tensor
    end_logits: Tensor
    offsets: Tensor
    cls_index: int


@dataclass(frozen=True)
class Span:
    """A candidate answer: its score and character span in the context."""

    score: float
    start_char: int
    end_char: int


def window_spans(window: Window, n_best_size: int, max_answer_length: int) -> list[Span]:
    """The valid candidate spans of one window among its top start and end tokens."""
    k = min(n_best_size, window.start_logits.numel())
    starts = window.start_logits.topk(k).indices
    ends = window.end_logits.topk(k).indices
    in_context = window.offsets[:, 0] >= 0
    s, e = starts[:, None], ends[None, :]
    valid = in_context[s] & in_context[e] & (e >= s) & (e - s + 1 <= max_answer_length)
    scores = window.start_logits[s] + window.end_logits[e]
    pairs = valid.nonzero()
    return [
        Span(
            score=float(scores[i, j]),
            start_char=int(window.offsets[starts[i], 0]),
            end_char=int(window.offsets[ends[j], 1]),
        )
        for i, j in pairs.tolist()
    ]


def predict_answer(
    windows: list[Window],
    context: str,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> tuple[str, float | None]:
    """The answer text of one example and, with ``with_negative``, its no-answer odds.

    Args:
        windows: the example's windows, in order.
        context: the example's context, which the offsets index.
        n_best_size: start and end candidates per window, and spans kept per example.
        max_answer_length: longest answer in tokens.
        with_negative: whether "no answer" is a possible prediction (SQuAD v2.0).
        null_score_diff_threshold: predict no answer when the odds exceed it.

    Returns:
        ``(text, odds)``; ``odds`` is ``None`` without ``with_negative``. Without any valid
        span the text is empty and the odds are the null score (the best span counted as 0).
    """
    spans = [s for w in windows for s in window_spans(w, n_best_size, max_answer_length)]
    spans.sort(key=lambda s: s.score, reverse=True)
    texts = [(s.score, context[s.start_char : s.end_char]) for s in spans[:n_best_size]]
    # Spans whose characters are all outside words (empty text) cannot be the answer.
    best = next(((score, text) for score, text in texts if text), None)
    if not with_negative:
        return ("" if best is None else best[1]), None
    null_score = min(
        float(w.start_logits[w.cls_index] + w.end_logits[w.cls_index]) for w in windows
    )
    best_score, best_text = best if best is not None else (0.0, "")
    odds = null_score - best_score
    return ("" if odds > null_score_diff_threshold else best_text), odds
