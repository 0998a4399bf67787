"""End-to-end runs on SQuAD fixtures, span losses, and methods refusing span tasks."""

import csv
import json

import pytest
import torch
from transformers import BertForQuestionAnswering

import kdlab.train
from kdlab.errors import ConfigError
from kdlab.losses import matching_loss, soft_kl, task_loss
from kdlab.methods import KnowledgeDistillation
from kdlab.methods.traits import MethodTraits
from tests.conftest import compose, run_cli
from tests.fixtures import write_squad, write_tiny_qa_bert

COMMON = ["logger=csv", "callbacks=quiet", "trainer=debug", "eval.speed_batches=2"]


def run(tmp_path, overrides):
    return kdlab.train.run(compose([*COMMON, *overrides, f"run_dir={tmp_path / 'run'}"]))


def squad_overrides(tmp_path, v2: bool) -> list[str]:
    model = write_tiny_qa_bert(tmp_path / "qa_model")
    train = write_squad(tmp_path / "train.json", unanswerable=v2, seed=1)
    dev = write_squad(tmp_path / "dev.json", unanswerable=v2, seed=2)
    return [
        f"task={'squad_v2' if v2 else 'squad'}",
        f"task.train_file={train}",
        f"task.validation_file={dev}",
        "task.max_seq_length=64",
        "task.doc_stride=16",
        "task.batch_size=4",
        "task.eval_batch_size=64",  # one batch holds every dev window (fast_dev_run)
        f"task.cache_dir={tmp_path / 'cache'}",
        "model=pretrained",
        f"model.path={model}",
        "teacher=local",
        f"teacher.path={model}",
    ]


@pytest.mark.parametrize("method", ["finetune", "kd"])
@pytest.mark.parametrize("v2", [False, True])
def test_fast_dev_run_on_squad(tmp_path, method, v2):
    metrics = run(tmp_path, [*squad_overrides(tmp_path, v2), f"method={method}"])
    run_dir = tmp_path / "run"
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert len(predictions) == (20 if v2 else 16)
    student = metrics["student"]
    assert metrics["main_metric"] == "f1" and 0.0 <= student["val/f1"] <= 100.0
    if v2:
        odds = json.loads((run_dir / "null_odds.json").read_text())
        assert set(odds) == set(predictions)
        assert student["val/HasAns_total"] == 16 and student["val/NoAns_total"] == 4
        assert {"val/best_f1", "val/best_f1_thresh", "val/exact"} <= set(student)
    else:
        assert not (run_dir / "null_odds.json").exists()
        assert "val/exact_match" in student
    assert (run_dir / "student" / "config.json").is_file()
    if method == "kd":
        assert 0.0 <= metrics["teacher"]["val/f1"] <= 100.0
        assert metrics["inference"]["student_ms_per_batch"] > 0


def test_kd_on_spans_averages_start_and_end_kl_as_bert_squad_loss_averages_ce(tmp_path):
    model = BertForQuestionAnswering.from_pretrained(write_tiny_qa_bert(tmp_path / "m"))
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(5, 30, (3, 12))}
    targets = {"start_positions": torch.tensor([1, 4, 0]), "end_positions": torch.tensor([2, 6, 0])}
    out = model(**inputs, **targets)
    logits = {"start_positions": out.start_logits, "end_positions": out.end_logits}
    # transformers' own QA loss is the mean of the start and end cross-entropies.
    assert torch.allclose(task_loss(logits, targets), out.loss)
    teacher = {k: v + torch.randn_like(v) for k, v in logits.items()}
    expected = (
        soft_kl(out.start_logits, teacher["start_positions"], 2.0)
        + soft_kl(out.end_logits, teacher["end_positions"], 2.0)
    ) / 2
    assert torch.allclose(matching_loss(logits, teacher, 2.0), expected)


class SequenceOnly(KnowledgeDistillation):
    traits = MethodTraits(supported_heads=frozenset({"sequence_classification"}))


def test_a_method_can_refuse_span_tasks(tmp_path):
    overrides = squad_overrides(tmp_path, v2=False)
    cfg = compose([*COMMON, *overrides, f"run_dir={tmp_path / 'run'}", "method=kd"])
    cfg.method._target_ = f"{__name__}.SequenceOnly"
    with pytest.raises(ConfigError, match="task=squad .a question_answering task"):
        kdlab.train.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_under_two_process_ddp_scores_the_whole_split(tmp_path):
    # The DistributedSampler gives each rank every other window, splitting most examples'
    # windows across the ranks. The F1 logged at the epoch's validation (2 gloo processes)
    # must equal the single-process evaluation of the same weights in metrics.json.
    run_dir = tmp_path / "run"
    overrides = [
        *squad_overrides(tmp_path, v2=True),
        "task.eval_batch_size=4",
        "method=finetune",
        "logger=csv",
        "callbacks=quiet",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "eval.speed_batches=0",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        logged = [float(r["val/f1"]) for r in csv.DictReader(f) if r.get("val/f1")]
    final = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert len(logged) == 1
    assert logged[0] == pytest.approx(final["val/f1"], abs=1e-4)
    assert final["val/HasAns_total"] == 16 and final["val/NoAns_total"] == 4
