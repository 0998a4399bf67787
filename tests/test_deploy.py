"""``python -m kdlab.deploy``: ONNX export of every head and family, int8, vocabulary pruning,
dev metrics as kdlab computes them, latency rows, and the inputs refused before any work."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

import kdlab.deploy.deployment
import kdlab.train
from kdlab.deploy import ParityError, deploy
from kdlab.deploy.__main__ import main
from kdlab.deploy.vocabulary import kept_ids, prune_vocabulary
from kdlab.errors import ConfigError
from kdlab.methods.finetune import FineTune
from tests.conftest import build_datamodule
from tests.families import fitted_to, tiny_config
from tests.fixtures import (
    GLUE_DIRS,
    write_squad,
    write_tiny_bert,
    write_tiny_mlm_bert,
    write_tiny_qa_bert,
    write_tiny_roberta,
    write_tokenizer,
)


@pytest.fixture(autouse=True)
def _quiet_export(caplog):
    # The exporter and quantiser log at INFO on their own loggers; the assertions read ours.
    caplog.set_level(logging.WARNING)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy_models")
    return {
        "classification": write_tiny_bert(root / "cls", num_labels=2),
        "regression": write_tiny_bert(root / "reg", num_labels=1, seed=1),
        "question_answering": write_tiny_qa_bert(root / "qa", seed=2),
    }


def _session_outputs(path: Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(None, feed)


def _pytorch_outputs(model, inputs: dict[str, torch.Tensor], names: list[str]) -> list:
    with torch.no_grad():
        outputs = model(**inputs)
    return [outputs[name].numpy() for name in names]


@pytest.mark.parametrize(
    ("kind", "int8"),
    [("classification", "per tensor"), ("regression", "per channel"), ("question_answering", None)],
)
def test_bert_heads_export_with_dynamic_axes_and_parity(models, tmp_path, kind, int8):
    out = tmp_path / "out"
    record = deploy(models[kind], out, int8=bool(int8), per_channel=int8 == "per channel")
    written = json.loads((out / "deploy.json").read_text())
    assert written == json.loads(json.dumps(record))
    model_record = record["model"]
    assert model_record["head"] == (
        "question_answering" if kind == "question_answering" else "sequence_classification"
    )
    assert model_record["parity"]["max_abs_diff"]["onnx_fp32"] <= 1e-4
    assert model_record["parity"]["inputs"].startswith("fixed texts")
    assert model_record["eval"] is None and model_record["vocabulary"] is None
    assert "latency" not in record and "reference" not in record
    assert model_record["graph_optimisation"]["SkipLayerNormalization"] == 4  # 2 layers x 2
    assert set(record["versions"]) == {"torch", "transformers", "onnx", "onnxruntime"}
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    if int8:
        assert model_record["int8"] == {"per_channel": int8 == "per channel"}
        assert (out / "model_int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
        assert 0 < model_record["parity"]["max_abs_diff"]["onnx_int8"] < 0.05
    else:
        assert model_record["int8"] is None and not (out / "model_int8.onnx").exists()
    # Another batch and sequence length than the export's: the axes are dynamic.
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["the movie", "a boring plot and an awful actor, but i love the dog", "it"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    auto = (
        AutoModelForQuestionAnswering
        if kind == "question_answering"
        else (AutoModelForSequenceClassification)
    )
    model = auto.from_pretrained(models[kind]).eval()
    names = ["start_logits", "end_logits"] if kind == "question_answering" else ["logits"]
    for onnx, torch_out in zip(
        _session_outputs(out / "model.onnx", inputs),
        _pytorch_outputs(model, inputs, names),
        strict=True,
    ):
        assert onnx.shape == torch_out.shape
        np.testing.assert_allclose(onnx, torch_out, atol=1e-5)


def _family_model(family: str, directory: Path) -> Path:
    """A tiny random classifier of ``family`` (its ``tests/families.py`` config, 3 labels)
    with the fixture's WordPiece tokenizer."""
    tokenizer = write_tokenizer(directory)
    config = fitted_to(tokenizer, tiny_config(family))
    config.num_labels = 3
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["roberta", "electra", "deberta-v2", "modernbert"])
def test_other_families_export_with_parity(tmp_path, family):
    source = _family_model(family, tmp_path / "model")
    record = deploy(source, tmp_path / "out")["model"]
    assert record["family"] == family
    assert record["parity"]["max_abs_diff"]["onnx_fp32"] <= 1e-4
    # ModernBERT's bias-free LayerNorms are outside ONNX Runtime's BERT fusions.
    assert (record["graph_optimisation"] is None) == (family == "modernbert")
    # ModernBERT takes no token_type_ids, whatever the tokenizer gives.
    assert ("token_type_ids" in record["inputs"]) == (family != "modernbert")


def test_pruned_vocabulary_keeps_outputs_and_maps_unseen_words_to_unk(models, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was good\n\nthe plot was boring\n")
    out = tmp_path / "out"
    record = deploy(models["classification"], out, prune_vocab=[str(texts)])["model"]
    original = AutoTokenizer.from_pretrained(models["classification"])
    words = {"the", "movie", "was", "good", "plot", "boring"}
    assert record["vocabulary"]["kept_tokens"] == len(words) + len(original.all_special_ids)
    assert record["vocabulary"]["tokens_before"] == len(original)
    saved = record["vocabulary"]["parameters_before"] - record["parameters"]
    assert saved == (len(original) - record["vocabulary"]["kept_tokens"]) * 32  # hidden 32
    size = (
        record["vocabulary"]["weights_bytes_before"] - record["vocabulary"]["weights_bytes_after"]
    )
    assert saved * 4 <= size < saved * 4 + 1000  # fp32 rows, and the header's shorter numbers
    # Stock transformers classes load the pruned model and tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(out)
    pruned = AutoModelForSequenceClassification.from_pretrained(out).eval()
    model = AutoModelForSequenceClassification.from_pretrained(models["classification"]).eval()
    assert len(tokenizer) == pruned.config.vocab_size == record["vocabulary"]["kept_tokens"]
    kept_texts = ["the movie was good", "the plot was boring boring"]
    with torch.no_grad():
        before = model(**original(kept_texts, padding=True, return_tensors="pt")).logits
        after = pruned(**tokenizer(kept_texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    unseen = tokenizer("the awful dog")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(unseen) == ["[CLS]", "the", "[UNK]", "[UNK]", "[SEP]"]
    # The ONNX file is the pruned model's.
    inputs = dict(tokenizer(kept_texts, padding=True, return_tensors="pt"))
    (onnx_logits,) = _session_outputs(out / "model.onnx", inputs)
    np.testing.assert_allclose(onnx_logits, after.numpy(), atol=1e-5)


def test_masked_lm_decoder_and_its_bias_keep_the_kept_rows(tmp_path):
    """The vocabulary projection of a masked-LM head, tied to the embeddings, and its bias (a
    parameter of its own in BERT's head) keep the same rows: logits of the kept tokens as
    before, in memory and once saved and loaded."""
    source = write_tiny_mlm_bert(tmp_path / "mlm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForMaskedLM.from_pretrained(source).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # not the zeros it starts with
    texts = ["the movie was good", "the plot"]
    before_inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**before_inputs).logits
    keep = kept_ids(tokenizer, before_inputs["input_ids"].flatten().tolist())
    pruned_tokenizer = prune_vocabulary(model, tokenizer, keep)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    inputs = pruned_tokenizer(texts, padding=True, return_tensors="pt")
    for pruned in (model, reloaded):
        with torch.no_grad():
            after = pruned(**inputs).logits
        torch.testing.assert_close(after, before[..., keep], atol=1e-6, rtol=0)


def test_pruned_byte_level_bpe_keeps_outputs_and_spells_unseen_words_with_kept_pieces(tmp_path):
    source = write_tiny_roberta(tmp_path / "roberta")  # byte-level BPE
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was good\nthe plot was boring\n")
    out = tmp_path / "out"
    record = deploy(source, out, prune_vocab=[str(texts)])["model"]
    original = AutoTokenizer.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The 256 bytes, the 5 special tokens, and the pieces of the kept words.
    assert 261 < record["vocabulary"]["kept_tokens"] == len(tokenizer) < len(original)
    kept_texts = ["the movie was good", "the plot was boring"]
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    pruned = AutoModelForSequenceClassification.from_pretrained(out).eval()
    before, after = (
        dict(t(kept_texts, padding=True, return_tensors="pt")) for t in (original, tokenizer)
    )
    assert original.batch_decode(before["input_ids"]) == tokenizer.batch_decode(after["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(**after).logits, model(**before).logits, atol=1e-6, rtol=0
        )
    unseen = "awful dog, cat!"
    ids = tokenizer(unseen, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == unseen  # no unknown token: kept pieces, down to bytes
    assert len(ids) > len(original(unseen, add_special_tokens=False)["input_ids"])
    (onnx_logits,) = _session_outputs(out / "model.onnx", after)
    np.testing.assert_allclose(onnx_logits, pruned(**after).logits.detach().numpy(), atol=1e-5)


def _task_overrides(glue_root: Path, tmp: Path) -> list[str]:
    return [
        "task=sst2",
        f"task.data_dir={glue_root / GLUE_DIRS['sst2']}",
        f"task.cache_dir={tmp / 'cache'}",
        "task.max_seq_length=32",
        "task.eval_batch_size=16",
    ]


def test_eval_figures_equal_kdlab_evaluation_and_onnx_fp32_equals_pytorch(
    make_cfg, glue_root, tmp_path
):
    cfg = make_cfg(method="finetune", extra=["task.eval_batch_size=16"])
    metrics = kdlab.train.run(cfg)
    student = Path(metrics["student"]["path"])
    overrides = _task_overrides(glue_root, tmp_path)
    record = deploy(
        student, tmp_path / "out", int8=True, eval_overrides=overrides, prune_vocab=overrides
    )["model"]
    evaluation = record["eval"]
    assert evaluation["task"] == "sst2"
    val = {k: v for k, v in metrics["student"].items() if k.startswith("val/")}
    assert {k: evaluation["pytorch"][k] for k in val} == val  # metrics.json, exactly
    assert evaluation["onnx_fp32"]["val/accuracy"] == evaluation["pytorch"]["val/accuracy"]
    assert evaluation["onnx_fp32"]["val/loss"] == pytest.approx(val["val/loss"], abs=1e-6)
    assert set(evaluation["onnx_int8"]) == set(val)
    assert record["parity"]["inputs"] == "first dev batch"
    assert record["parity"]["shape"][0] == 16
    # The task's vocabulary: every token its training and dev inputs produce.
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    seen = {i for row in datamodule.train_split()["input_ids"] for i in row}
    for loader in datamodule.val_dataloader(by_length=False):
        for batch in loader:
            seen |= set(batch["input_ids"].flatten().tolist())
    tokenizer = AutoTokenizer.from_pretrained(student)
    assert record["vocabulary"]["kept_tokens"] == len(seen | set(tokenizer.all_special_ids))


def test_kdlab_evaluation_of_the_same_model_gives_the_pytorch_figures(
    make_cfg, glue_root, tmp_path, teacher_dir
):
    """Without a training run: kdlab's evaluation of the model, built as train.py builds it.
    Dev batches of one example: exported from a one-row example, the file still takes any batch."""
    cfg = make_cfg(extra=["task.eval_batch_size=1"])
    overrides = [*_task_overrides(glue_root, tmp_path), "task.eval_batch_size=1"]
    record = deploy(teacher_dir, tmp_path / "out", eval_overrides=overrides)
    assert record["model"]["parity"]["shape"][0] == 1
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = dict(
        tokenizer(["the movie", "it was a boring plot", "fun"], padding=True, return_tensors="pt")
    )
    (logits,) = _session_outputs(tmp_path / "out" / "model.onnx", rows)
    with torch.no_grad():
        expected_logits = AutoModelForSequenceClassification.from_pretrained(teacher_dir)(**rows)
    np.testing.assert_allclose(logits, expected_logits.logits.numpy(), atol=1e-5)
    evaluation = record["model"]["eval"]
    assert evaluation["onnx_fp32"]["val/accuracy"] == evaluation["pytorch"]["val/accuracy"]
    datamodule = build_datamodule(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    module = FineTune(
        name="t",
        student=model,
        head=datamodule.head,
        split_metrics=datamodule.split_metrics(),
        optim=kdlab.train.build(cfg, "optim"),
    )
    trainer_cfg = cfg.trainer
    expected = kdlab.train.evaluate(
        kdlab.train.evaluation_trainer(trainer_cfg, torch.device("cpu")), module, datamodule
    )
    assert record["model"]["eval"]["pytorch"] == expected


def test_span_qa_model_is_evaluated_on_squad_alike_in_pytorch_and_onnx(models, tmp_path):
    dev = write_squad(tmp_path / "dev.json", seed=2)
    overrides = [
        "task=squad",
        f"task.train_file={write_squad(tmp_path / 'train.json', seed=1)}",
        f"task.validation_file={dev}",
        "task.max_seq_length=64",
        "task.doc_stride=16",
        f"task.cache_dir={tmp_path / 'cache'}",
    ]
    record = deploy(models["question_answering"], tmp_path / "out", eval_overrides=overrides)
    evaluation = record["model"]["eval"]
    assert {"val/exact_match", "val/f1", "val/loss"} <= set(evaluation["pytorch"])
    for key in ("val/exact_match", "val/f1"):
        assert evaluation["onnx_fp32"][key] == evaluation["pytorch"][key]
    assert record["model"]["parity"]["max_abs_diff"]["onnx_fp32"] <= 1e-4


def test_reference_is_deployed_and_timed_beside_the_model(models, tmp_path, teacher_dirs):
    out = tmp_path / "out"
    record = deploy(
        models["classification"],
        out,
        int8=True,
        reference=teacher_dirs[3],
        seq_len=8,
        runs=2,
        warmup=1,
    )
    assert (out / "reference" / "model_int8.onnx").is_file()
    assert record["reference"]["source"] == str(teacher_dirs[3])
    latency = record["latency"]
    assert (latency["seq_len"], latency["runs"], latency["warmup"]) == (8, 2, 1)
    keys = {(r["model"], r["runtime"], r["batch"], r["threads"]) for r in latency["rows"]}
    assert keys == {
        (m, r, b, t)
        for m in ("model", "reference")
        for r in ("pytorch", "onnx_fp32", "onnx_int8")
        for b in (1, 32)
        for t in ("1", "all")
    }
    assert len(latency["rows"]) == len(keys)
    assert all(r["ms"] > 0 for r in latency["rows"])


# ---------------------------------------------------------------- refused before any work
def _snapshot(directory: Path) -> dict:
    return {
        p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _unigram_model(directory: Path) -> Path:
    write_tiny_bert(directory)
    pieces = [("[UNK]", 0.0), ("[PAD]", 0.0), ("a", -1.0), ("b", -1.0)]
    backend = Tokenizer(tokenizer_models.Unigram(pieces, unk_id=0))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (directory / name).unlink()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "case",
    [
        "model dir missing",
        "model dir is a file",
        "no config.json",
        "run directory",
        "masked-LM head",
        "reference without tokenizer",
        "out dir holds files",
        "out dir is the model dir",
        "out dir is a file",
        "vocabulary file without words",
        "vocabulary file missing",
        "Unigram tokenizer pruned",
        "eval without task",
        "eval of an unknown task",
        "eval of a task of another head",
        "eval of a task with other labels",
    ],
)
def test_bad_input_is_refused_before_any_work_and_nothing_is_touched(
    models, tmp_path, case, monkeypatch
):
    model = models["classification"]
    out = tmp_path / "out"
    out.mkdir()
    options: dict = {}
    if case == "model dir missing":
        model, expected = tmp_path / "nowhere", "does not exist"
    elif case == "model dir is a file":
        model = tmp_path / "file"
        model.write_text("x")
        expected = "is a file"
    elif case == "no config.json":
        model = tmp_path / "empty_model"
        model.mkdir()
        expected = "no config.json"
    elif case == "run directory":
        model = tmp_path / "run"
        write_tiny_bert(model / "student")
        expected = f"its exported model is {model / 'student'}"
    elif case == "masked-LM head":
        model = write_tiny_mlm_bert(tmp_path / "mlm")
        expected = "BertForMaskedLM (config.json's architectures); deploy exports the heads "
        expected += "sequence_classification (*ForSequenceClassification), question_answering"
    elif case == "reference without tokenizer":
        reference = tmp_path / "ref"
        reference.mkdir()
        (reference / "config.json").write_text((model / "config.json").read_text())
        options["reference"] = reference
        expected = "reference directory"
    elif case == "out dir holds files":
        (out / "model.onnx").write_text("an earlier model")
        expected = "is not empty (model.onnx): pass --overwrite"
    elif case == "out dir is the model dir":
        out, expected = model, "holds the model"
        options["overwrite"] = True
    elif case == "out dir is a file":
        out = tmp_path / "model.onnx"
        out.write_text("not a directory")
        expected = "is a file, not an output directory"
    elif case == "vocabulary file without words":
        texts = tmp_path / "texts.txt"
        texts.write_text("\n[CLS] [SEP]\n  \n")
        options["prune_vocab"] = [str(texts)]
        expected = "yields no tokens but special ones"
    elif case == "vocabulary file missing":
        options["prune_vocab"] = [str(tmp_path / "missing.txt")]
        expected = "missing.txt is not a file"
    elif case == "Unigram tokenizer pruned":
        model = _unigram_model(tmp_path / "unigram")
        options["prune_vocab"] = [str(tmp_path / "texts.txt")]
        (tmp_path / "texts.txt").write_text("a b\n")
        expected = "is a Unigram tokenizer; vocabulary pruning supports WordPiece, BPE"
    elif case == "eval without task":
        options["eval_overrides"] = ["sst2"]
        expected = "--eval takes task=<name>"
    elif case == "eval of a task of another head":
        model = models["question_answering"]
        options["eval_overrides"] = ["task=sst2"]
        expected = "--eval task=sst2 has a sequence_classification head with 2 outputs; the model"
        expected += f" in {model} has a question_answering head."
    elif case == "eval of a task with other labels":
        options["eval_overrides"] = ["task=stsb"]
        expected = "sequence_classification head with 1 outputs; the model"
    else:
        options["eval_overrides"] = ["task=nosuch"]
        expected = "task=nosuch: "
    before = _snapshot(tmp_path)
    # Nothing may be exported: a refused input fails before the model is loaded or exported.
    monkeypatch.setattr(kdlab.deploy.deployment, "export_onnx", _no_export)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        deploy(model, out, **options)
    assert _snapshot(tmp_path) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _no_export(*args, **kwargs):
    raise AssertionError("export started before the input was checked")


def test_overwrite_replaces_the_output_only_when_the_deploy_succeeds(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier deploy")
    monkeypatch.setattr(kdlab.deploy.deployment, "PARITY_TOLERANCE", 0.0)
    with pytest.raises(ParityError, match="differ from PyTorch's by up to"):
        deploy(models["classification"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial sibling left
    monkeypatch.undo()
    deploy(models["classification"], out, overwrite=True)
    assert not (out / "old.txt").exists()
    assert (out / "model.onnx").is_file()


def test_cli_exits_non_zero_with_the_error(models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([str(models["classification"]), str(tmp_path / "out")])
    assert "is not empty (x): pass --overwrite" in str(exit_info.value.code)
    assert (tmp_path / "out" / "x").read_text() == "x"
