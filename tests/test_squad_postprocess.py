"""Post-processing of start/end logits and the per-batch SQuAD metrics (``SquadMetrics``)."""

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from kdlab.qa.postprocess import Window, predict_answer
from tests.conftest import build_task
from tests.fixtures import write_squad, write_tokenizer
from tests.test_squad_features import squad_task

CONTEXT = "alpha beta gamma delta"
# [CLS] q [SEP] alpha beta gamma delta [SEP]
OFFSETS = torch.tensor(
    [[-1, -1], [-1, -1], [-1, -1], [0, 5], [6, 10], [11, 16], [17, 22], [-1, -1]]
)


def window(start: dict[int, float], end: dict[int, float], offsets=OFFSETS) -> Window:
    """Logits -10 except where given."""
    s = torch.full((len(offsets),), -10.0)
    e = torch.full((len(offsets),), -10.0)
    for i, v in start.items():
        s[i] = v
    for i, v in end.items():
        e[i] = v
    return Window(start_logits=s, end_logits=e, offsets=offsets, cls_index=0)


def test_best_valid_span_wins():
    # The question token (1) has the highest start logit but is outside the context;
    # 4 -> 3 scores highest but ends before it starts; the best valid pair is 4 -> 5.
    w = window({1: 9.0, 4: 4.0, 5: 1.0}, {3: 9.0, 5: 4.0, 4: 1.0})
    assert predict_answer([w], CONTEXT) == ("beta gamma", None)


def test_max_answer_length_and_n_best():
    w = window({3: 5.0, 5: 1.0}, {6: 5.0, 5: 1.0})
    assert predict_answer([w], CONTEXT)[0] == "alpha beta gamma delta"
    assert predict_answer([w], CONTEXT, max_answer_length=2)[0] == "gamma delta"
    # With one candidate start and end per window only the top pair is tried.
    assert predict_answer([w], CONTEXT, n_best_size=1)[0] == "alpha beta gamma delta"
    no_pair = window({6: 5.0}, {3: 5.0})
    assert predict_answer([no_pair], CONTEXT, n_best_size=1)[0] == ""


def test_best_span_over_windows():
    second = torch.tensor([[-1, -1], [-1, -1], [-1, -1], [11, 16], [17, 22], [-1, -1]])
    w1 = window({3: 2.0}, {3: 2.0})
    w2 = window({4: 3.0}, {4: 3.0}, offsets=second)
    assert predict_answer([w1, w2], CONTEXT)[0] == "delta"


def test_null_score_and_threshold():
    # Null score: lowest CLS score over windows (2 + 1 = 3); best span 4 -> 4 scores 2 + 2.
    w1 = window({0: 2.0, 4: 2.0}, {0: 1.0, 4: 2.0})
    w2 = window({0: 5.0}, {0: 5.0})
    text, odds = predict_answer([w1, w2], CONTEXT, with_negative=True)
    assert odds == pytest.approx(3.0 - 4.0)
    assert text == "beta"
    text, odds = predict_answer(
        [w1, w2], CONTEXT, with_negative=True, null_score_diff_threshold=-1.5
    )
    assert text == ""
    # A CLS score above every span's predicts no answer at the default threshold.
    text, odds = predict_answer([window({0: 9.0}, {0: 9.0})], CONTEXT, with_negative=True)
    assert text == "" and odds > 0


def _oracle_outputs(batch, big=20.0):
    """Logits peaked at the labelled start and end of every window."""
    n, length = batch["input_ids"].shape
    start = torch.zeros(n, length)
    end = torch.zeros(n, length)
    rows = torch.arange(n)
    start[rows, batch["start_positions"]] = big
    end[rows, batch["end_positions"]] = big
    return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


@pytest.mark.parametrize("v2", [False, True])
def test_squad_metrics_per_batch_with_oracle_logits(tmp_path, v2):
    tokenizer = write_tokenizer(tmp_path / "tok")
    dev = write_squad(tmp_path / "dev.json", n_articles=5, unanswerable=v2, seed=4)
    task = squad_task(dev, dev, v2=v2, max_seq_length=32, doc_stride=8)
    dm = build_task(task, tokenizer, eval_batch_size=3)
    dm.setup()
    split_metrics = dm.split_metrics()["val"]
    windows = len(dm.features["validation"])
    assert windows > 1.5 * len(dm.examples["validation"])  # examples span several batches
    most_held = 0
    for batch in dm.val_dataloader()[0]:
        split_metrics.update(_oracle_outputs(batch), batch)
        most_held = max(most_held, split_metrics.pending_windows)
    # Only windows of examples cut by a batch boundary wait: never the whole split.
    assert 0 < most_held < windows / 4
    assert split_metrics.pending_windows == 0  # every example finished with its last window
    metrics = {k: float(v) for k, v in split_metrics.compute().items()}
    predictions = split_metrics.files()["predictions.json"]
    assert len(predictions) == len(dm.examples["validation"])
    # Answers whose text normalises to nothing (e.g. "the") cannot match in v1.1.
    assert metrics["exact" if v2 else "exact_match"] > 90.0
    if v2:
        assert metrics["NoAns_exact"] == 100.0 and metrics["NoAns_total"] == 5
        assert metrics["HasAns_total"] == 20
        odds = split_metrics.files()["null_odds.json"]
        assert set(odds) == set(predictions)
        unanswerable = [qid for qid in predictions if qid.endswith("-none")]
        assert all(predictions[q] == "" and odds[q] > 0 for q in unanswerable)
    # reset starts a new pass and keeps the files of the last one.
    split_metrics.reset()
    assert split_metrics.compute() == {}
    assert split_metrics.files()


@pytest.mark.parametrize("v2", [False, True])
def test_squad_metrics_merge_the_shares_of_distributed_ranks(tmp_path, monkeypatch, v2):
    # Each of 7 "ranks" sees DistributedSampler's interleaved, padded share of the windows,
    # so most examples have windows on several ranks; merged, every rank must score exactly
    # what one process scores on the whole split.
    tokenizer = write_tokenizer(tmp_path / "tok")
    dev = write_squad(tmp_path / "dev.json", n_articles=5, unanswerable=v2, seed=4)
    dm = build_task(squad_task(dev, dev, v2=v2, max_seq_length=32, doc_stride=8), tokenizer)
    dm.setup()
    features = dm._batches("validation")
    assert len(features) % 7  # the sampler pads with repeated windows
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(2, len(features), 32, generator=generator)

    def outputs(batch):
        rows, length = batch["feature_index"], batch["input_ids"].size(1)
        return QuestionAnsweringModelOutput(
            start_logits=table[0, rows, :length], end_logits=table[1, rows, :length]
        )

    def evaluate(loader, split_metrics):
        for batch in loader:
            split_metrics.update(outputs(batch), batch)
        return split_metrics

    whole = evaluate(dm.val_dataloader()[0], dm.split_metrics()["val"])
    expected = {k: float(v) for k, v in whole.compute().items()}
    ranks = [
        evaluate(
            DataLoader(
                features,
                batch_size=3,
                sampler=DistributedSampler(features, num_replicas=7, rank=r, shuffle=False),
                collate_fn=dm.collator,
            ),
            dm.split_metrics()["val"],
        )
        for r in range(7)
    ]
    assert all(r.pending_windows for r in ranks)  # examples split across ranks
    states = [r._rank_state() for r in ranks]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 7)
    monkeypatch.setattr(
        dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), states)
    )
    for rank in ranks:
        # Equal up to summation order: the merged answers are not in example order.
        assert {k: float(v) for k, v in rank.compute().items()} == pytest.approx(expected)
        assert rank.files() == whole.files()
