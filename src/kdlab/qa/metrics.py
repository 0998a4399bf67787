"""SQuAD metrics of one split (:class:`SquadMetrics`), fed batch by batch.

Only the logits of examples whose windows are not all seen yet are held; an example is
post-processed into its answer text as soon as its last window arrives, so memory does not
grow with the number of windows in the split.

Under DDP each rank sees an interleaved share of the windows, so an example's windows may be
split across ranks: ``compute`` gathers the unfinished examples' windows and every rank's
answers, and all ranks score the whole split alike.
"""

from collections import Counter

import datasets
import torch
import torch.distributed as dist
from torch import Tensor
from transformers.utils import ModelOutput

from kdlab.metrics import SplitMetrics
from kdlab.qa.official import squad_v1, squad_v2
from kdlab.qa.postprocess import Window, predict_answer


class SquadMetrics(SplitMetrics):
    """Official SQuAD v1.1 / v2.0 metrics of the predictions on one split.

    Batches carry ``feature_index``, a row of ``features``.

    Args:
        features: the split's windows: ``example_index``, ``offset_mapping`` (``-1`` outside
            the context) and ``cls_index``, in example order.
        examples: the split's questions: ``id``, ``context``, ``answers``.
        with_negative: SQuAD v2.0 (unanswerable questions, no-answer odds).
        n_best_size: see :func:`~kdlab.qa.postprocess.predict_answer`.
        max_answer_length: see :func:`~kdlab.qa.postprocess.predict_answer`.
        null_score_diff_threshold: see :func:`~kdlab.qa.postprocess.predict_answer`.
    """

    def __init__(
        self,
        features: datasets.Dataset,
        examples: datasets.Dataset,
        *,
        with_negative: bool,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        # Arrow rows: offsets go straight to tensors, never through millions of Python ints
        # (whose freed memory fragments the heap and raised the peak with the split's size).
        self.features = features.select_columns(
            ["example_index", "offset_mapping", "cls_index"]
        ).with_format("arrow")
        self.examples = examples.select_columns(["id", "context", "answers"])
        self.with_negative = with_negative
        self.options = {
            "n_best_size": n_best_size,
            "max_answer_length": max_answer_length,
            "with_negative": with_negative,
            "null_score_diff_threshold": null_score_diff_threshold,
        }
        self.windows_per_example = Counter(self.features["example_index"].to_pylist())
        self._files: dict[str, dict] = {}
        self.reset()

    def reset(self) -> None:
        # example index -> {feature index: window}; keyed by feature so that a window seen
        # twice (a distributed sampler pads its shares with repeats) counts once.
        self._pending: dict[int, dict[int, Window]] = {}
        self._finished: set[int] = set()
        self._golds: dict[str, list[str]] = {}
        self._predictions: dict[str, str] = {}
        self._null_odds: dict[str, float] = {}

    @property
    def pending_windows(self) -> int:
        """Windows held until their example is complete (bounded by one batch or so)."""
        return sum(len(w) for w in self._pending.values())

    def update(self, outputs: ModelOutput, batch: dict[str, Tensor]) -> None:
        feature_index = batch["feature_index"].tolist()
        rows = self.features[feature_index]
        offsets = rows.column("offset_mapping").combine_chunks()
        lengths = offsets.value_lengths().to_numpy().tolist()
        flat = torch.from_numpy(offsets.flatten().flatten().to_numpy().astype("int64"))
        per_window = flat.view(-1, 2).split(lengths)
        start = outputs.start_logits.detach().float().cpu()
        end = outputs.end_logits.detach().float().cpu()
        for i, (feature, example, window_offsets, cls_index) in enumerate(
            zip(
                feature_index,
                rows.column("example_index").to_pylist(),
                per_window,
                rows.column("cls_index").to_pylist(),
                strict=True,
            )
        ):
            if example in self._finished:
                continue
            length = lengths[i]
            # Copies, so that a window held for its example does not pin the whole batch.
            window = Window(
                start_logits=start[i, :length].clone(),
                end_logits=end[i, :length].clone(),
                offsets=window_offsets.clone(),
                cls_index=cls_index,
            )
            windows = self._pending.setdefault(example, {})
            windows[feature] = window
            if len(windows) == self.windows_per_example[example]:
                self._finish(example)

    def _finish(self, example_index: int) -> None:
        by_feature = self._pending.pop(example_index)
        windows = [by_feature[feature] for feature in sorted(by_feature)]
        self._finished.add(example_index)
        example = self.examples[example_index]
        text, odds = predict_answer(windows, example["context"], **self.options)
        qid = example["id"]
        self._golds[qid] = list(example["answers"]["text"])
        self._predictions[qid] = text
        if odds is not None:
            self._null_odds[qid] = odds

    def compute(self) -> dict[str, Tensor]:
        """Metrics over the questions evaluated (the whole split unless batches were limited).

        A limited run (``limit_val_batches``, ``fast_dev_run``) may stop inside an example;
        such an example is answered from the windows seen.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._merge_ranks()
        for example in list(self._pending):
            self._finish(example)
        if not self._golds:
            return {}
        # predictions.json in dataset order, whatever order the windows came in.
        order = [qid for qid in self.examples["id"] if qid in self._predictions]
        self._predictions = {qid: self._predictions[qid] for qid in order}
        self._null_odds = {qid: self._null_odds[qid] for qid in order if qid in self._null_odds}
        if self.with_negative:
            metrics = squad_v2(self._golds, self._predictions, self._null_odds)
            self._files = {
                "predictions.json": dict(self._predictions),
                "null_odds.json": dict(self._null_odds),
            }
        else:
            metrics = squad_v1(self._golds, self._predictions)
            self._files = {"predictions.json": dict(self._predictions)}
        # float64 tensors: Lightning keeps their precision (plain floats are logged as
        # float32), so metrics.json holds the official numbers exactly.
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()}

    def files(self) -> dict[str, dict]:
        return self._files

    def _rank_state(self) -> tuple:
        """What this rank holds of the pass, in the order ``_merge_ranks`` reads it."""
        return self._pending, self._finished, self._golds, self._predictions, self._null_odds

    def _merge_ranks(self) -> None:
        """Every rank's answers, and the windows of examples no rank has finished, on all
        ranks (a collective: every rank must call it)."""
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, self._rank_state())
        self.reset()
        for _, finished, golds, predictions, null_odds in shares:
            self._finished |= finished
            self._golds.update(golds)
            self._predictions.update(predictions)
            self._null_odds.update(null_odds)
        for pending, *_ in shares:
            for example, windows in pending.items():
                if example not in self._finished:
                    self._pending.setdefault(example, {}).update(windows)
