"""End-to-end runs on TSV fixtures: fast_dev_run of each method on a single-sentence task,
a pair task and STS-B; the exported student; the real command line."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdlab.train
from kdlab.models.heads import model_inputs
from tests.conftest import build_datamodule, fast_overrides, run_cli
from tests.fixtures import write_tokenizer


@pytest.mark.parametrize("task", ["sst2", "rte", "stsb"])
@pytest.mark.parametrize("method", ["finetune", "kd"])
def test_fast_dev_run(method, task, make_cfg, tmp_path):
    cfg = make_cfg(task=task, method=method, extra=["trainer=debug", "logger=csv"])
    assert cfg.trainer.fast_dev_run
    metrics = kdlab.train.run(cfg)
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == metrics
    assert (run_dir / "config.yaml").is_file()
    assert {"task", "method", "main_metric", "student", "teacher", "wall_time_s"} <= set(metrics)
    assert metrics["task"] == task and metrics["method"] == method
    main = {"stsb": "pearson"}.get(task, "accuracy")
    assert metrics["main_metric"] == main
    student = metrics["student"]
    assert student["params"] > 0 and student["path"] == str(run_dir / "student")
    expected = {"stsb": {"val/pearson", "val/spearman"}}.get(task, {"val/accuracy"})
    assert expected | {"val/loss"} <= set(student)
    if method == "kd":
        teacher = metrics["teacher"]
        assert expected <= set(teacher) and teacher["params"] > 0
        assert {"teacher_ms_per_batch", "student_ms_per_batch", "speedup"} <= set(
            metrics["inference"]
        )
    else:
        assert metrics["teacher"] is None
    assert (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert (run_dir / "student" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_export_loads_with_stock_transformers(task, make_cfg, captured, tmp_path):
    cfg = make_cfg(task=task, method="kd", extra=["trainer.max_epochs=1"])
    metrics = kdlab.train.run(cfg)
    module = captured["module"]
    student_dir = tmp_path / "run" / "student"
    exported = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert tokenizer.get_vocab() == write_tokenizer(tmp_path / "tok").get_vocab()
    if task == "stsb":
        assert exported.config.problem_type == "regression" and exported.config.num_labels == 1
    else:
        assert exported.config.problem_type == "single_label_classification"
        assert exported.config.id2label == {0: "entailment", 1: "not_entailment"}

    batch = tokenizer(
        ["the movie was good", "a cat and a dog"],
        ["it is fun", "rain"],
        padding=True,
        return_tensors="pt",
    )
    module.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, module.student(**batch).logits)

    # The export holds the best checkpoint's student weights.
    best = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    state = {
        k.removeprefix("student."): v
        for k, v in best["state_dict"].items()
        if k.startswith("student.")
    }
    for key, value in exported.state_dict().items():
        if key in state:
            torch.testing.assert_close(value, state[key], msg=key)

    # and gives the same logits as the module on a real batch of the task
    cfg.task.eval_batch_size = 8
    dm = build_datamodule(cfg, tokenizer)
    dm.setup()
    real = model_inputs(next(iter(dm.val_dataloader()[0])), exported)
    with torch.no_grad():
        torch.testing.assert_close(exported(**real).logits, module.student(**real).logits)


def test_cli_run_writes_run_dir(tmp_path, glue_root, teacher_dir):
    run_dir = tmp_path / "cli_run"
    overrides = [
        o
        for o in fast_overrides(tmp_path, glue_root, teacher_dir, "sst2", "kd")
        if not o.startswith("run_dir=")
    ]
    proc = run_cli([*overrides, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["student"]["path"] == str(run_dir / "student")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert "val/accuracy" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("task", ["mnli", "cola", "mrpc"])
def test_one_epoch_other_task_families(task, make_cfg, tmp_path):
    """MNLI validates on matched and mismatched sets; CoLA and MRPC pick the best checkpoint
    by Matthews and F1."""
    metrics = kdlab.train.run(
        make_cfg(
            task=task, method="kd", extra=["trainer.max_epochs=1", "trainer.limit_train_batches=2"]
        )
    )
    student, teacher = metrics["student"], metrics["teacher"]
    expected = {
        "mnli": {"val/accuracy", "val_mm/accuracy"},
        "cola": {"val/matthews", "val/accuracy"},
        "mrpc": {"val/f1", "val/accuracy"},
    }[task]
    assert expected <= set(student) and expected <= set(teacher)
    assert metrics["best_checkpoint"].endswith("best.ckpt")
    best = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    callback = next(v for k, v in best["callbacks"].items() if "ModelCheckpoint" in k)
    assert callback["monitor"] == f"val/{metrics['main_metric']}"
