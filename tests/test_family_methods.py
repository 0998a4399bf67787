"""Every method × model family runs a few optimizer steps, on tiny random models of each
family written to disk here (``transformers`` configs, no hub) with the fixture tokenizer.

Every cell runs over ``tests/families.py``'s :data:`~tests.families.TINY`, one tiny config
per family module under ``src/kdlab/families/``. Each run is in-process, 4 optimizer steps,
with the models shared by the module.
"""

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import kdlab.train
from kdlab.compact import load_student
from kdlab.components import validate
from kdlab.errors import ConfigError
from kdlab.models.heads import model_inputs
from kdlab.rundir import RunDir
from tests.conftest import QUIET_CPU_RUN, build_student, build_teacher, compose
from tests.families import TARGET, TINY, fitted_to, tiny_config
from tests.fixtures import write_corpus, write_glue, write_tokenizer

# tests/families.py's tiny config of every family, with the fixture tokenizer's vocabulary
# and special-token ids ([PAD] 0, [CLS] 2, [SEP] 3, [MASK] 4), set by `fitted_to`.
FAMILIES = list(TINY)
STEPS = 4
CLASSIFICATION = ["finetune", "kd", "pd", "mixkd"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_data")
    return {"glue": write_glue(root / "glue"), "corpus": write_corpus(root / "corpus")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family, head)``: the directory of a tiny random model of ``family`` (its TINY
    config) with ``head`` ("cls": 2 labels; "mlm"), written once per module."""
    root = tmp_path_factory.mktemp("family_models")
    written: dict[tuple, Path] = {}
    classes = {"cls": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM}

    def get(family: str, head: str) -> Path:
        key = (family, head)
        if key not in written:
            directory = root / "-".join(key)
            tokenizer = write_tokenizer(directory)
            config = fitted_to(tokenizer, tiny_config(family))
            if head == "cls":
                config.num_labels = 2
            torch.manual_seed(0)
            classes[head].from_config(config).save_pretrained(directory)
            written[key] = directory
        return written[key]

    return get


def _run(tmp_path: Path, data, teacher: Path, method: str, *extra: str) -> dict:
    if method in ("mlm", "homodistil"):
        task = [
            "task=corpus/local",
            f"task.files=[{data['corpus']}/*.txt]",
            "task.max_seq_length=16",
            "task.max_train_samples=32",
            "task.validation_fraction=0.2",
        ]
    else:  # RTE: sentence pairs, so the second segment's token types are 1
        task = ["task=rte", f"task.data_dir={data['glue'] / 'RTE'}", "task.max_seq_length=32"]
    overrides = [
        *QUIET_CPU_RUN,
        f"method={method}",
        "teacher=local",
        f"teacher.path={teacher}",
        *task,
        "task.batch_size=8",
        f"task.cache_dir={tmp_path / 'cache'}",
        f"trainer.max_steps={STEPS}",
        "eval.speed_batches=0",
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]
    return kdlab.train.run(compose(overrides))


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]


def _assert_trained(run_dir: Path, source: Path, auto_class: type, family: str) -> None:
    """Every step logged a finite loss, the exported student (of the family) has moved
    away from the weights it started from (its word embeddings, which every student shares
    with ``source``), and ``kdlab.compact`` rebuilds it from the last checkpoint."""
    losses = _losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    student = auto_class.from_pretrained(RunDir(run_dir).student)
    start = auto_class.from_pretrained(source)
    assert student.config.model_type == family
    moved = student.get_input_embeddings().weight
    assert moved.shape == start.get_input_embeddings().weight.shape
    assert not torch.equal(moved, start.get_input_embeddings().weight)
    _assert_compact_rebuilds(run_dir, student)


def _assert_compact_rebuilds(run_dir: Path, exported) -> None:
    rebuilt = load_student(RunDir(run_dir).last_checkpoint)
    assert type(rebuilt) is type(exported)
    assert rebuilt.state_dict().keys() == exported.state_dict().keys()
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, msg=key)


# -------------------------------------------------------------------- unpruned methods
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CLASSIFICATION)
def test_classification_methods_train_every_family(method, family, saved, data, tmp_path):
    teacher = saved(family, "cls")
    if method == "finetune":
        student = ["model=pretrained", f"model.path={teacher}"]
    else:  # the teacher's first 2 of 3 layers
        student = ["model=truncated", "model.num_layers=2"]
    _run(tmp_path, data, teacher, method, *student)
    _assert_trained(tmp_path / "run", teacher, AutoModelForSequenceClassification, family)
    exported = AutoConfig.from_pretrained(RunDir(tmp_path / "run").student)
    assert exported.num_hidden_layers == (3 if method == "finetune" else 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlm_trains_every_family(family, saved, data, tmp_path):
    model = saved(family, "mlm")
    _run(tmp_path, data, model, "mlm", "model=pretrained", f"model.path={model}")
    _assert_trained(tmp_path / "run", model, AutoModelForMaskedLM, family)


# ---------------------------------------------------------------------- pruned methods
def _assert_pruned_to_target(run_dir: Path, auto_class: type, family: str) -> None:
    """The masks reached the target in every layer, and the compacted export loads with
    stock ``transformers`` at the target shape with no missing or unexpected keys."""
    state = torch.load(RunDir(run_dir).last_checkpoint, weights_only=True)
    masks = state["callbacks"]["PruningCallback"]["masks"]
    assert int(masks["hidden"].sum()) == TARGET["hidden_size"]
    assert (masks["heads"].sum(1) == TARGET["num_attention_heads"]).all()
    assert (masks["ffn"].sum(1) == TARGET["intermediate_size"]).all()
    student, info = auto_class.from_pretrained(RunDir(run_dir).student, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.model_type == family
    assert {k: getattr(student.config, k) for k in TARGET} == TARGET
    _assert_compact_rebuilds(run_dir, student)


HALF = [f"model.target.{k}={v}" for k, v in TARGET.items()]
PRUNED = ["model=pruned", *HALF, "pruning.update_interval=1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_homodistil_prunes_every_family(family, saved, data, tmp_path):
    _run(tmp_path, data, saved(family, "mlm"), "homodistil", *PRUNED)
    assert all(math.isfinite(x) for x in _losses(tmp_path / "run"))
    _assert_pruned_to_target(tmp_path / "run", AutoModelForMaskedLM, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_kd_with_pruning_prunes_every_family(family, saved, data, tmp_path):
    _run(tmp_path, data, saved(family, "cls"), "kd", *PRUNED, "pruning=homotopic")
    assert all(math.isfinite(x) for x in _losses(tmp_path / "run"))
    _assert_pruned_to_target(tmp_path / "run", AutoModelForSequenceClassification, family)


# ------------------------------------------------------------------- models of a family
@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_students_keep_the_teachers_first_layers(family, saved, tmp_path, caplog):
    teacher_dir = saved(family, "cls")
    cfg = compose(
        [
            "model=truncated",
            "model.num_layers=2",
            "teacher=local",
            f"teacher.path={teacher_dir}",
            f"run_dir={tmp_path}",
        ]
    )
    with caplog.at_level(logging.INFO):
        student = build_student(cfg)
    teacher = build_teacher(cfg)
    assert student.config.num_hidden_layers == 2
    if getattr(teacher.config, "layer_types", None) is not None:  # ModernBERT's local/global
        assert student.config.layer_types == teacher.config.layer_types[:2]
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key], msg=key)
    assert {k for k in teacher_state if k not in student.state_dict()}  # layer 2 left out
    # The left-out layer is named once, at INFO, without transformers' load report.
    assert f"model.path={teacher_dir}: layers 2-2 left out" in caplog.text
    assert "UNEXPECTED" not in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_truncation_beyond_the_teachers_depth_is_refused(family, saved, tmp_path):
    teacher_dir = saved(family, "cls")
    cfg = compose(
        ["model=truncated", "model.num_layers=4", "teacher=local", f"teacher.path={teacher_dir}"]
        + [f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="model.num_layers=4 exceeds the 3 layers"):
        build_student(cfg)


def _runs_at(model, length: int) -> bool:
    ids = torch.full((1, length), 5)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (IndexError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_max_seq_length_is_refused_exactly_beyond_the_positions_a_model_embeds(
    family, saved, data, tmp_path
):
    """What the config check accepts runs; where positions are embedded rows (not
    ModernBERT's rotary ones) what runs is accepted: RoBERTa's 66 rows from padding index 0
    hold 65 positions, DeBERTa-v3 (relative positions only) takes any length."""
    path = saved(family, "cls")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    cfg = compose(
        ["method=finetune", "model=pretrained", f"model.path={path}", "task=rte"]
        + [f"task.data_dir={data['glue'] / 'RTE'}", f"run_dir={tmp_path}"]
    )
    for length in (63, 64, 65, 66, 128):
        cfg.task.max_seq_length = length
        try:
            validate(cfg)
            accepted = True
        except ConfigError as err:
            assert "task.max_seq_length" in str(err)
            accepted = False
        runs = _runs_at(model, length)
        assert runs or not accepted, length
        if family != "modernbert":
            assert accepted == runs, length


@pytest.mark.parametrize("family", FAMILIES)
def test_token_types_reach_only_a_model_that_embeds_two_segments(family, saved):
    model = AutoModelForSequenceClassification.from_pretrained(saved(family, "cls"))
    batch = {
        "input_ids": torch.tensor([[2, 5, 3, 6, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1]]),
        "labels": torch.tensor([1]),
    }
    inputs = model_inputs(batch, model)
    two_segments = getattr(model.config, "type_vocab_size", 0) >= 2
    expected = {"bert": True, "electra": True, "roberta": False, "deberta-v2": False}
    assert ("token_type_ids" in inputs) == expected.get(family, two_segments)
    assert set(inputs) <= {"input_ids", "attention_mask", "token_type_ids"}
    model(**inputs)  # a second segment is embedded, or not given
