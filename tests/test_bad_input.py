"""Bad input fails with errors that name the file, line or setting to fix."""

import shutil
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

import kdlab.train
from kdlab.data.sources import load_glue
from kdlab.data.tsv import read_labelled_tsv
from kdlab.errors import ConfigError, DataFormatError
from tests.conftest import build_student, compose, run_cli
from tests.fixtures import write_tokenizer


def _copy_task(glue_root: Path, folder: str, tmp_path: Path) -> Path:
    target = tmp_path / folder
    shutil.copytree(glue_root / folder, target)
    return target


def _append_line(path: Path, line: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(3, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 4  # 1-based line number of the inserted line


def test_short_row_names_file_and_line(glue_root, tmp_path):
    folder = _copy_task(glue_root, "RTE", tmp_path)
    line_no = _append_line(folder / "dev.tsv", "99\tonly one sentence")
    cfg = compose(["task=rte", f"task.data_dir={folder}", f"run_dir={tmp_path}"])
    with pytest.raises(DataFormatError, match=rf"{folder / 'dev.tsv'}:{line_no}:"):
        load_glue(cfg.task)


def test_short_row_stops_a_run(make_cfg, glue_root, tmp_path):
    folder = _copy_task(glue_root, "SST-2", tmp_path)
    line_no = _append_line(folder / "train.tsv", "no label column here")
    cfg = make_cfg(task="sst2", method="finetune", extra=[f"task.data_dir={folder}"])
    with pytest.raises(DataFormatError, match=rf"train\.tsv:{line_no}:.*fields"):
        kdlab.train.run(cfg)


def test_unknown_label_names_file_and_line(glue_root, tmp_path):
    folder = _copy_task(glue_root, "RTE", tmp_path)
    line_no = _append_line(folder / "train.tsv", "7\ta cat\ta dog\tmaybe")
    cfg = compose(["task=rte", f"task.data_dir={folder}", f"run_dir={tmp_path}"])
    with pytest.raises(DataFormatError, match=rf"train\.tsv:{line_no}: label 'maybe'"):
        load_glue(cfg.task)


def test_regression_label_not_a_number(glue_root, tmp_path):
    folder = _copy_task(glue_root, "STS-B", tmp_path)
    line_no = _append_line(
        folder / "dev.tsv", "\t".join(["1", "main", "x", "2012", "1", "n", "n", "a", "b", "high"])
    )
    cfg = compose(["task=stsb", f"task.data_dir={folder}", f"run_dir={tmp_path}"])
    with pytest.raises(DataFormatError, match=rf"dev\.tsv:{line_no}:.*'high'"):
        load_glue(cfg.task)


def test_missing_header_column_and_empty_file(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(DataFormatError, match=r"train\.tsv:1: header has no column 'sentence'"):
        read_labelled_tsv(
            path,
            header=True,
            text_columns=["sentence"],
            label_column="label",
            label_values=["0", "1"],
        )
    path.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        read_labelled_tsv(
            path,
            header=True,
            text_columns=["sentence"],
            label_column="label",
            label_values=["0", "1"],
        )


def test_missing_split_file_names_task_files(glue_root, tmp_path):
    folder = _copy_task(glue_root, "RTE", tmp_path)
    (folder / "dev.tsv").unlink()
    cfg = compose(["task=rte", f"task.data_dir={folder}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"dev\.tsv.*task\.files\.validation"):
        load_glue(cfg.task)


def test_unreachable_hub_names_task_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = compose(["task=rte", f"run_dir={tmp_path}"])
    assert cfg.task.data_dir is None
    with pytest.raises(ConfigError, match=r"task\.data_dir") as err:
        load_glue(cfg.task)
    assert "KDLAB_DATA_DIR" in str(err.value)


def test_data_dir_env_root_is_used(glue_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_DATA_DIR", str(glue_root))
    cfg = compose(["task=rte", f"run_dir={tmp_path}"])
    assert len(load_glue(cfg.task)["train"]) == 48


def test_tokenizer_mismatch_is_refused(teacher_dir, tmp_path):
    # A teacher with another vocabulary teaches sequence-level tasks (tests/
    # test_cross_tokenizer.py); a span task compares positions and refuses it.
    from transformers import BertTokenizerFast

    from kdlab.methods import KnowledgeDistillation
    from kdlab.methods.traits import teacher_tokenizer_for
    from kdlab.models.build import load_tokenizer

    other = tmp_path / "other_tok"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(other)
    cfg = compose(
        [
            "model=bert_tiny",
            f"model.tokenizer={other}",
            "teacher=local",
            f"teacher.path={teacher_dir}",
            "task=squad",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match="vocabularies differ"):
        teacher_tokenizer_for(
            cfg, KnowledgeDistillation, load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
        )


def test_special_token_mismatch_is_refused(teacher_dir, tmp_path):
    from kdlab.methods import KnowledgeDistillation
    from kdlab.methods.traits import teacher_tokenizer_for

    student_tok = write_tokenizer(tmp_path / "b")
    student_tok.add_special_tokens({"pad_token": "[MASK]"})  # same vocab, other pad id
    cfg = compose(
        [
            "model=bert_tiny",
            "teacher=local",
            f"teacher.path={teacher_dir}",
            "task=squad",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match="pad_token_id"):
        teacher_tokenizer_for(cfg, KnowledgeDistillation, student_tok)


def test_teacher_without_trained_head_says_finetune(make_cfg, tmp_path):
    bare = tmp_path / "bare"
    tokenizer = write_tokenizer(bare)
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(bare)
    cfg = make_cfg(method="kd", extra=[f"teacher.path={bare}"])
    with pytest.raises(ConfigError, match="method=finetune") as err:
        kdlab.train.run(cfg)
    assert "teacher.path" in str(err.value)


def test_missing_local_model_dir_names_model_path(tmp_path):
    cfg = compose(
        [
            "model=pretrained",
            f"model.path={tmp_path / 'nothing'}",
            "teacher=local",
            "teacher.path=x",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match=r"model\.path"):
        build_student(cfg)


def test_unknown_group_option_lists_valid_ones(tmp_path):
    proc = run_cli(["model=no_such_model", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "no_such_model" in message
    assert "Available options" in message and "bert_tiny" in message


# --- Issue 18: bad model inputs (i18-inputs) -------------------------------------------


def test_tokenizer_far_smaller_than_the_embeddings_is_refused(teacher_dir, tmp_path):
    # 7 tokens for the 42 rows the fixture model embeds: under the half the rule allows.
    from transformers import BertTokenizerFast

    small = tmp_path / "small_tok"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(small)
    cfg = compose(
        [
            "model=pretrained",
            f"model.path={teacher_dir}",
            f"model.tokenizer={small}",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError) as err:
        build_student(cfg)
    assert f"model.tokenizer={small} has 7 tokens, fewer than half of the 42" in str(err.value)
    assert "at least half of the model's embedding rows" in str(err.value)


def _untrained_head_warnings(teacher: Path, tmp_path: Path, caplog) -> list[str]:
    import logging

    from tests.conftest import build_teacher

    cfg = compose(["teacher=local", f"teacher.path={teacher}", f"run_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="kdlab.models.build"):
        build_teacher(cfg)
    return [r.getMessage() for r in caplog.records if "looks untrained" in r.getMessage()]


def test_teacher_with_a_freshly_initialised_head_is_named_in_a_warning(tmp_path, caplog):
    from tests.fixtures import write_tiny_bert

    fresh = write_tiny_bert(tmp_path / "fresh")  # save_pretrained of a new model: no training
    (warning,) = _untrained_head_warnings(fresh, tmp_path, caplog)
    assert f"teacher.path={fresh}" in warning
    assert "classifier.bias, classifier.weight" in warning and "initializer_range 0.02" in warning


def test_teacher_with_a_trained_looking_head_is_not_warned_about(tmp_path, caplog):
    import torch
    from transformers import BertForSequenceClassification

    from tests.fixtures import write_tiny_bert

    trained = write_tiny_bert(tmp_path / "trained")
    model = BertForSequenceClassification.from_pretrained(trained)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.013, -0.013]))  # as one step leaves it
    model.save_pretrained(trained)
    assert _untrained_head_warnings(trained, tmp_path, caplog) == []


def test_an_unreachable_hub_teacher_is_one_error_naming_teacher_path(make_cfg):
    # The test student (a random BERT) reads its tokenizer from ${teacher.path}.
    cfg = make_cfg(extra=["teacher=bert_base", "teacher.path=bert-base-uncased"])
    with pytest.raises(ConfigError) as err:
        kdlab.train.run(cfg)
    message = str(err.value)
    assert message.startswith("Could not load 'bert-base-uncased' (teacher.path): ")
    assert "model." not in message and "set teacher.path=<local directory" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chain


def _load_messages(checkpoint: Path, head: str, caplog, monkeypatch) -> list[tuple[int, str]]:
    import logging

    from kdlab.models.build import _load_model

    # transformers' loggers do not propagate to pytest's handler by default.
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.INFO):
        _load_model(str(checkpoint), head, "model.path")
    return [(r.levelno, r.getMessage()) for r in caplog.records if "Loading weights" not in r.msg]


def test_a_new_head_on_a_base_checkpoint_is_said_once_at_info(tmp_path, caplog, monkeypatch):
    import logging

    base = tmp_path / "base"  # a checkpoint without any head, as MiniLM's package ships
    config = BertConfig(
        vocab_size=len(write_tokenizer(base)),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(base)
    messages = _load_messages(base, "masked_lm", caplog, monkeypatch)
    assert [m for level, m in messages if level >= logging.WARNING] == []
    (info,) = [m for _, m in messages if "newly initialised" in m]
    assert info.startswith(f"model.path={base} has no masked_lm head: newly initialised")
    assert "cls.predictions.transform.dense.weight" in info
    assert "not used by this head: pooler.dense.bias, pooler.dense.weight" in info


def test_other_missing_or_unused_keys_keep_the_load_report(tmp_path, caplog, monkeypatch):
    import logging

    from tests.fixtures import write_tiny_bert

    classifier = write_tiny_bert(tmp_path / "classifier")  # its classifier is not MLM's
    messages = _load_messages(classifier, "masked_lm", caplog, monkeypatch)
    # (pytest's capture sees transformers' records twice, with or without kdlab.)
    reports = [m for level, m in messages if level >= logging.WARNING and "LOAD REPORT" in m]
    assert reports and all("classifier.weight" in m and "UNEXPECTED" in m for m in reports)
    assert not any("newly initialised" in m for _, m in messages)


def test_a_layer_truncated_student_names_its_left_out_layers_once_at_info(
    tmp_path, caplog, monkeypatch
):
    import logging

    from kdlab.models.build import _load_model
    from tests.fixtures import write_tiny_bert

    teacher = write_tiny_bert(tmp_path / "teacher", layers=3)
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.INFO):
        _load_model(str(teacher), "sequence_classification", "model.path", num_hidden_layers=1)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [m for level, m in messages if level >= logging.WARNING] == []
    assert (
        logging.INFO,
        f"model.path={teacher}: layers 1-2 left out (a layer-truncated model).",
    ) in messages
