"""Length-grouped training steps (``task.group_by_length``) and evaluation sorted by length.

Grouping reorders an epoch's examples, never changes them: each epoch holds the examples of
the random order drawn from ``(seed, epoch)``, in steps of similar lengths, the same whatever
the processes and micro-batches a step is spread over, and resumes mid-epoch exactly.
Evaluation runs longest batches first with metrics and prediction files as in dataset order.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from kdlab.data.base import MEGA_BATCH_STEPS, EpochSeededSampler, ResumableLoader, token_lengths
from kdlab.errors import ConfigError
from kdlab.models.heads import forward
from tests.conftest import build_datamodule, compose
from tests.fixtures import write_squad, write_tiny_qa_bert
from tests.test_resume import (
    MID_EPOCH_VALIDATION,
    _assert_same_final_weights,
    _comparable,
    _interrupt_then_resume,
    _stop_at_step,
)
from tests.test_teacher_cache import WEIGHTS_ATOL, largest_difference, trained

GROUPED = ["task.group_by_length=true"]


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Sentence lengths skewed as SST-2's: mostly short, a long tail (3 to 64 tokens)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=2.5, sigma=0.6, size=n).astype(int) + 2, 3, 64)


def epoch(sampler: EpochSeededSampler, number: int) -> list[int]:
    sampler.set_epoch(number)
    return list(sampler)


def steps_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def real_fraction(steps: list[list[int]], lengths: np.ndarray) -> float:
    """Real tokens ÷ tokens of the steps padded to their longest example."""
    real = sum(int(lengths[s].sum()) for s in steps)
    return real / sum(len(s) * int(lengths[s].max()) for s in steps)


# ------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("number", [0, 3])
def test_a_grouped_epoch_is_the_random_epochs_examples_in_steps_of_similar_lengths(number):
    n, step = 4010, 32  # a last partial step of 10
    lengths = synthetic_lengths(n)
    random = epoch(EpochSeededSampler(n, seed=7), number)
    grouped = epoch(EpochSeededSampler(n, seed=7, lengths=lengths, step=step), number)
    assert sorted(grouped) == sorted(random) == list(range(n)) and grouped != random
    # Each mega-batch of the random order is the examples of MEGA_BATCH_STEPS grouped steps.
    mega = step * MEGA_BATCH_STEPS
    megas = [set(random[i : i + mega]) for i in range(0, n, mega)]
    steps = steps_of(grouped, step)
    for s in steps:
        assert sum(set(s) <= m for m in megas) == 1
        assert list(lengths[s]) == sorted(lengths[s], reverse=True)
    # The longest step first; long and short steps alternate across the epoch.
    assert lengths[steps[0][0]] == lengths.max()
    assert len(steps[-1]) == n % step and set(steps[-1]) <= megas[-1]
    assert (
        real_fraction(steps, lengths) >= 0.9 > 0.6 > real_fraction(steps_of(random, step), lengths)
    )
    firsts = [int(lengths[s[0]]) for s in steps[:MEGA_BATCH_STEPS]]
    assert firsts != sorted(firsts, reverse=True)


def test_the_grouped_order_depends_on_seed_and_epoch_alone():
    lengths = synthetic_lengths(500)

    def sampler(seed: int) -> EpochSeededSampler:
        return EpochSeededSampler(500, seed=seed, lengths=lengths, step=16)

    first, again = sampler(1), sampler(1)
    assert epoch(first, 2) == epoch(again, 2)
    assert epoch(first, 1) != epoch(first, 2) == epoch(first, 2)
    assert epoch(sampler(2), 2) != epoch(first, 2)


@pytest.mark.parametrize(
    ("replicas", "batch", "accumulate"), [(2, 8, 1), (2, 4, 2), (1, 8, 2), (4, 2, 2)]
)
def test_a_grouped_step_holds_the_one_device_steps_examples(replicas, batch, accumulate):
    # 61 examples: a last partial step, and padding under DDP. Process r's micro-batch k is
    # every replicas-th example of the k-th slice of replicas × batch of the one-device order.
    n, step = 61, replicas * batch * accumulate
    lengths = synthetic_lengths(n)
    whole = epoch(EpochSeededSampler(n, seed=3, lengths=lengths, step=step), 1)
    shares = [
        epoch(EpochSeededSampler(n, 3, replicas, r, lengths=lengths, step=step), 1)
        for r in range(replicas)
    ]
    padded = whole + whole[: len(shares[0]) * replicas - n]
    for k, micro in enumerate(steps_of(padded, replicas * batch)):
        for r in range(replicas):
            assert shares[r][k * batch : (k + 1) * batch] == micro[r::replicas]


def test_a_mid_epoch_position_loads_only_into_the_same_order():
    lengths = synthetic_lengths(64)

    def loader(step: int | None) -> ResumableLoader:
        grouping = {} if step is None else {"lengths": lengths, "step": step}
        return ResumableLoader(
            range(64), batch_size=8, sampler=EpochSeededSampler(64, 5, **grouping)
        )

    source = loader(16)
    iterator = iter(source)
    for _ in range(3):
        next(iterator)
    position = source.state_dict()
    for other, saying in [(None, "random"), (32, "grouped in steps of 32")]:
        with pytest.raises(ConfigError, match=f"grouped in steps of 16, this run's is {saying}"):
            loader(other).load_state_dict(position)
    resumed = loader(16)
    resumed.load_state_dict(position)
    whole = [batch.tolist() for batch in loader(16)]
    assert [batch.tolist() for batch in resumed] == whole[3:]


# ---------------------------------------------------------------------------- datamodule
def test_a_training_subset_is_the_same_examples_grouped(make_cfg):
    limited = ["task.max_train_samples=20", "task.batch_size=4"]
    plain = build_datamodule(make_cfg(extra=limited))
    grouped = build_datamodule(make_cfg(extra=[*limited, *GROUPED]))
    plain.setup("fit")
    grouped.setup("fit")
    assert plain.train_split()["input_ids"] == grouped.train_split()["input_ids"]
    lengths = token_lengths(grouped.train_split())
    rows = {tuple(ids) for ids in grouped.train_split()["input_ids"]}
    seen = []
    for batch in grouped.train_dataloader():
        real = batch["attention_mask"].sum(1).tolist()
        assert real == sorted(real, reverse=True)  # one step of 4, longest first
        seen += [tuple(ids[:k]) for ids, k in zip(batch["input_ids"].tolist(), real, strict=True)]
    assert len(seen) == 20 and set(seen) == rows and len(set(lengths.tolist())) > 1


def test_training_resumed_mid_epoch_with_grouping_matches_uninterrupted(make_cfg, tmp_path):
    full, resumed, interrupted_at = _interrupt_then_resume(
        make_cfg, tmp_path, [*MID_EPOCH_VALIDATION, *GROUPED], _stop_at_step(3)
    )
    assert interrupted_at == 3
    assert _comparable(resumed) == _comparable(full)
    _assert_same_final_weights(tmp_path)


def test_grouped_training_reads_the_teachers_outputs_from_the_cache(make_cfg, tmp_path):
    live, live_weights = trained(
        make_cfg, tmp_path, "live", "kd", "method.cache_teacher=false", *GROUPED
    )
    built, built_weights = trained(make_cfg, tmp_path, "built", "kd", *GROUPED)
    assert built["teacher_cache"]["status"] == "built" and built["teacher_passes"] == 1.0
    assert largest_difference(built_weights, live_weights) <= WEIGHTS_ATOL
    assert built["student"]["val/accuracy"] == live["student"]["val/accuracy"]


def test_grouping_is_not_an_option_of_corpus_tasks(tmp_path):
    with pytest.raises(Exception, match="group_by_length"):
        compose(["task=corpus/wikitext", "method=mlm", *GROUPED])


# ---------------------------------------------------------------------------- evaluation
def evaluate(datamodule, model, by_length: bool):
    """Metrics, files, each batch's real tokens per example and the first logit of each
    example (by its tokens) of one pass over the validation split."""
    metrics = datamodule.split_metrics()["val"]
    lengths, logits = [], {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader(by_length=by_length)[0]:
            outputs = forward(model.eval(), batch, datamodule.head)
            metrics.update(outputs, batch)
            real = batch["attention_mask"].sum(1).tolist()
            lengths.append(real)
            for ids, k, value in zip(batch["input_ids"].tolist(), real, outputs[0], strict=True):
                logits.setdefault(tuple(ids[:k]), []).append(value.flatten()[0].item())
    values = {k: float(v) for k, v in metrics.compute().items()}
    return values, metrics.files(), lengths, logits


def assert_sorted_equals_unsorted(datamodule, model, key=None, tolerance=None) -> dict:
    """The metrics and files of the sorted pass equal those of dataset order, and so does
    every example's output; the sorted pass's rows come longest first (by ``key`` of their
    tokens and position, if given). ``tolerance``: per metric, instead of 1e-6."""
    datamodule.setup("fit")
    unsorted, unsorted_files, _, unsorted_logits = evaluate(datamodule, model, by_length=False)
    found, files, lengths, logits = evaluate(datamodule, model, by_length=True)
    flat = [k for batch in lengths for k in batch]
    if key is not None:
        flat = [key(k, i) for i, k in enumerate(flat)]
    assert flat == sorted(flat, reverse=True) and len(lengths) > 1
    assert logits.keys() == unsorted_logits.keys()
    for ids, values in logits.items():
        assert sorted(values) == pytest.approx(sorted(unsorted_logits[ids]), abs=1e-6)
    assert found.keys() == unsorted.keys()
    for name, value in found.items():
        assert value == pytest.approx(unsorted[name], abs=(tolerance or {}).get(name, 1e-6))
    # The same questions in the same order, the same answers; no-answer odds to rounding.
    assert [list(f) for f in files.values()] == [list(f) for f in unsorted_files.values()]
    assert files.get("predictions.json") == unsorted_files.get("predictions.json")
    for name in files.keys() - {"predictions.json"}:
        assert files[name] == pytest.approx(unsorted_files[name], abs=1e-6)
    return found


def test_sorted_evaluation_gives_each_process_its_share_once(make_cfg):
    datamodule = build_datamodule(make_cfg(extra=["task.eval_batch_size=4"]))
    datamodule.setup("fit")
    split = datamodule.splits["validation"]
    split = split.select(range(len(split) // 2 * 2 - 1))  # odd: a padding sampler repeats one
    split = split.add_column("row", list(range(len(split))))
    lengths = token_lengths(split)
    shares = []
    for rank in (0, 1):
        rows = [
            r for b in datamodule.eval_loader(split, num_replicas=2, rank=rank) for r in b["row"]
        ]
        assert list(lengths[rows]) == sorted(lengths[rows], reverse=True)
        shares.append(rows)
    # Every example once over both processes, none repeated to even out the shares.
    assert sorted(shares[0] + shares[1]) == list(range(len(split)))


@pytest.mark.parametrize(
    ("task", "names"),
    [("sst2", {"accuracy"}), ("mrpc", {"f1", "accuracy"}), ("stsb", {"pearson", "spearman"})],
)
def test_sorted_evaluation_gives_the_metrics_of_dataset_order(make_cfg, tmp_path, task, names):
    cfg = make_cfg(task=task, extra=["task.eval_batch_size=4"])
    model = AutoModelForSequenceClassification.from_pretrained(cfg.teacher.path)
    # Every example's prediction is the same in either order (to padding's rounding); the
    # tiny model's regression outputs are near-constant (std 5e-5 around 0.02), on which
    # PearsonCorrCoef's float32 running sums over other batches differ by up to 7e-6.
    tolerance = {"pearson": 1e-5}
    found = assert_sorted_equals_unsorted(build_datamodule(cfg), model, tolerance=tolerance)
    assert set(found) == names


@pytest.mark.parametrize("v2", [False, True])
def test_sorted_squad_evaluation_writes_predictions_in_dataset_order(tmp_path, v2):
    model_dir = write_tiny_qa_bert(tmp_path / "qa")
    cfg = compose(
        [
            f"task={'squad_v2' if v2 else 'squad'}",
            f"task.train_file={write_squad(tmp_path / 'train.json', unanswerable=v2, seed=1)}",
            f"task.validation_file={write_squad(tmp_path / 'dev.json', unanswerable=v2, seed=2)}",
            "task.max_seq_length=48",
            "task.doc_stride=16",
            "task.eval_batch_size=4",
            f"task.cache_dir={tmp_path / 'cache'}",
            "model=pretrained",
            f"model.path={model_dir}",
        ]
    )
    datamodule = build_datamodule(cfg)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    datamodule.setup("fit")
    # Windows sort by their example's longest window, and an example's windows stay together.
    examples = list(datamodule.features["validation"]["example_index"])
    windows = [i for b in datamodule.val_dataloader()[0] for i in b["feature_index"].tolist()]
    lengths = token_lengths(datamodule.features["validation"])
    longest = {e: max(lengths[i] for i in windows if examples[i] == e) for e in set(examples)}
    order = [examples[i] for i in windows]
    assert len(order) > len(set(order)) and order != sorted(order)
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) == len(set(order)) - 1
    found = assert_sorted_equals_unsorted(
        datamodule, model, key=lambda _, position: longest[order[position]]
    )
    assert {"exact_match", "f1"} <= set(found) or {"exact", "f1"} <= set(found)
    _, files, _, _ = evaluate(datamodule, model, by_length=True)
    assert list(files["predictions.json"]) == list(datamodule.examples["validation"]["id"])
