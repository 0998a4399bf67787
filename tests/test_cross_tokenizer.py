"""Distillation across tokenizers: a byte-level BPE RoBERTa teacher, a WordPiece BERT student.

The teacher and its tokenizer are built here (the ``tokenizers`` library, trained on the
fixture words; no hub). Sequence-level methods (kd, pd, mixkd on classification) tokenise
each example by both tokenizers and the teacher reads its own ids; token-level methods and
heads refuse the pair before anything loads.
"""

import functools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from datasets.fingerprint import Hasher

import kdlab.methods.mixkd
import kdlab.models
import kdlab.train
from kdlab.components import build, target_of, validate
from kdlab.data.base import ROW_INDEX, token_lengths
from kdlab.data.sources import load_glue
from kdlab.errors import ConfigError
from kdlab.methods.teacher_cache import teacher_cache
from kdlab.methods.traits import teacher_tokenizer_for
from kdlab.models.build import load_tokenizer, tokenizer_difference
from kdlab.models.heads import forward, teacher_inputs
from kdlab.rundir import RunDir
from tests.conftest import compose
from tests.fixtures import write_bpe_tokenizer, write_tiny_roberta, write_tokenizer

TEACHER_KEYS = {"teacher_input_ids", "teacher_attention_mask"}


@pytest.fixture(scope="module")
def roberta_dirs(tmp_path_factory) -> dict[int, Path]:
    """Tiny RoBERTa teachers by number of labels, and the student's WordPiece tokenizer."""
    return {
        2: write_tiny_roberta(tmp_path_factory.mktemp("roberta2")),
        1: write_tiny_roberta(tmp_path_factory.mktemp("roberta1"), num_labels=1),
    }


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wordpiece")
    write_tokenizer(directory)
    return directory


@pytest.fixture
def cross_cfg(make_cfg, roberta_dirs, wordpiece_dir):
    """``make_cfg`` with the RoBERTa teacher and a BERT student on the WordPiece tokenizer."""

    def make(task: str = "sst2", method: str = "kd", extra=(), run_dir=None):
        teacher = roberta_dirs[1 if task == "stsb" else 2]
        return make_cfg(
            task=task,
            method=method,
            run_dir=run_dir,
            extra=[f"teacher.path={teacher}", f"model.tokenizer={wordpiece_dir}", *extra],
        )

    return make


def datamodule_of(cfg):
    """The run's datamodule and both tokenizers, as ``kdlab.train.assemble`` builds them."""
    method = target_of(cfg, "method")
    student_tokenizer = load_tokenizer(cfg.model.tokenizer, "model.tokenizer")
    teacher_tokenizer = teacher_tokenizer_for(cfg, method, student_tokenizer)
    datamodule = build(
        cfg, "task", tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, seed=0
    )
    datamodule.setup("fit")
    return datamodule, student_tokenizer, teacher_tokenizer


def texts(ids: torch.Tensor, mask: torch.Tensor, tokenizer) -> list[str]:
    """Each row's real tokens decoded without special tokens, spaces normalised."""
    return [
        " ".join(tokenizer.decode(row[m.bool()], skip_special_tokens=True).split())
        for row, m in zip(ids, mask, strict=True)
    ]


def test_tokenizer_difference_names_vocabulary_and_special_tokens(
    teacher_dir, roberta_dirs, tmp_path
):
    bert = load_tokenizer(str(teacher_dir), "teacher.path")
    roberta = load_tokenizer(str(roberta_dirs[2]), "teacher.path")
    assert tokenizer_difference(bert, load_tokenizer(str(teacher_dir), "model.tokenizer")) is None
    assert tokenizer_difference(roberta, bert) == (
        f"their vocabularies differ ({len(roberta)} vs 42 tokens)"
    )
    other_pad = write_tokenizer(tmp_path / "b")
    other_pad.add_special_tokens({"pad_token": "[MASK]"})
    assert tokenizer_difference(bert, other_pad) == "they disagree on pad_token_id (0 vs 4)"


def test_each_model_gets_its_own_tokenisation_of_the_same_examples(cross_cfg, glue_root):
    cfg = cross_cfg(extra=["task.group_by_length=true"])
    datamodule, student_tokenizer, teacher_tokenizer = datamodule_of(cfg)
    # Each example's text as the tokenizers read it, by its words (as decoding gives them).
    raw = {
        " ".join(t.split()): t for split in load_glue(cfg.task).values() for t in split["text_a"]
    }
    seen = 0
    loaders = [datamodule.training_loader(), *datamodule.val_dataloader()]
    for batch in (b for loader in loaders for b in loader):
        assert set(batch) >= TEACHER_KEYS
        own = texts(batch["input_ids"], batch["attention_mask"], student_tokenizer)
        theirs = texts(
            batch["teacher_input_ids"], batch["teacher_attention_mask"], teacher_tokenizer
        )
        # The same example in both, row for row, each tokenised by its own model's tokenizer
        # with its own special tokens, padded with its own pad id.
        assert own == theirs and set(own) <= set(raw)
        for i, text in enumerate(own):
            for prefix, tokenizer in (("", student_tokenizer), ("teacher_", teacher_tokenizer)):
                expected = tokenizer(raw[text], truncation=True, max_length=32)["input_ids"]
                row = batch[prefix + "input_ids"][i]
                assert row[: len(expected)].tolist() == expected
                assert (row[len(expected) :] == tokenizer.pad_token_id).all()
        assert batch["teacher_input_ids"][:, 0].eq(teacher_tokenizer.cls_token_id).all()
        assert batch["input_ids"][:, 0].eq(student_tokenizer.cls_token_id).all()
        seen += len(own)
    assert seen == sum(len(s) for s in datamodule.splits.values())
    # Length grouping and evaluation order sort rows by the longer of their two sequences.
    split = datamodule.train_split()
    own, theirs = ([len(ids) for ids in split[k]] for k in ("input_ids", "teacher_input_ids"))
    assert any(t > o for o, t in zip(own, theirs, strict=True))
    assert token_lengths(split).tolist() == [max(pair) for pair in zip(own, theirs, strict=True)]


def test_same_tokenizer_batches_have_no_teacher_keys(make_cfg):
    cfg = make_cfg()
    datamodule, _, teacher_tokenizer = datamodule_of(cfg)
    assert teacher_tokenizer is None
    assert not any(k.startswith("teacher_") for k in datamodule.train_split().column_names)
    batch = next(iter(datamodule.training_loader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


class TeacherInputs:
    """Every ``input_ids`` (or ``inputs_embeds``) the teacher's encoder is called with."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs) -> None:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = args[0]
        self.calls.append(inputs.detach().cpu())


# With pruning, the callback measures the teacher-student KL on a fixed held-out batch.
PRUNED = [
    "pruning=homotopic",
    "pruning.target={hidden_size:64,num_attention_heads:1,intermediate_size:128}",
    "pruning.track_interval=1",
    "pruning.update_interval=1",
]


@pytest.mark.parametrize(
    ("method", "task", "extra"),
    [
        ("kd", "sst2", []),
        ("kd", "stsb", []),
        ("pd", "sst2", []),
        ("mixkd", "sst2", []),
        ("kd", "sst2", PRUNED),
    ],
)
def test_sequence_level_methods_distil_across_tokenizers(
    cross_cfg, monkeypatch, roberta_dirs, method, task, extra
):
    probe = TeacherInputs()
    original = kdlab.models.teacher

    @functools.wraps(original)
    def hooked_teacher(**kwargs):
        model = original(**kwargs)
        model.base_model.register_forward_pre_hook(probe, with_kwargs=True)
        return model

    monkeypatch.setattr(kdlab.models, "teacher", hooked_teacher)
    cfg = cross_cfg(task=task, method=method, extra=["+trainer.limit_train_batches=3", *extra])
    metrics = kdlab.train.run(cfg)
    assert metrics["teacher"]["name"] == "tiny"
    assert all(isinstance(v, float) for k, v in metrics["teacher"].items() if "/" in k)
    teacher_tokenizer = load_tokenizer(str(roberta_dirs[2]), "teacher.path")
    ids = [c for c in probe.calls if c.dtype == torch.long]
    embeds = [c for c in probe.calls if c.is_floating_point()]
    # Training (or the cache's build), the teacher's evaluation and its timing all read the
    # teacher's tokenisation: its <s> first, ids of its vocabulary. MixKD's mixed inputs are
    # embeddings of the teacher's width.
    assert ids and all(c[:, 0].eq(teacher_tokenizer.cls_token_id).all() for c in ids)
    assert max(int(c.max()) for c in ids) < len(teacher_tokenizer)
    assert any(int(c.max()) >= 42 for c in ids)  # beyond the student's 42 tokens
    assert (method == "mixkd") == bool(embeds)
    assert all(e.size(-1) == 32 for e in embeds)
    if extra:
        # The callback's KL at each step, on the fixed batch, teacher on its own ids.
        history = json.loads(RunDir(cfg.run_dir).pruning_history.read_text())
        assert len(history) == 4 and all(math.isfinite(row["kl"]) for row in history)


class LiveTeacherBeside(L.Callback):
    """The cached teacher outputs of each training batch beside the live teacher's on the
    teacher's own ids."""

    def __init__(self) -> None:
        self.pairs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert ROW_INDEX in batch and set(batch) >= TEACHER_KEYS
        with torch.no_grad():
            cached = pl_module.teacher_outputs(batch).logits
            live = forward(pl_module.teacher, teacher_inputs(batch), pl_module.head).logits
        self.pairs.append((cached, live))


def test_cached_outputs_are_the_live_teachers_on_its_own_ids(cross_cfg):
    cfg = cross_cfg()
    validate(cfg)
    L.seed_everything(cfg.seed)
    parts = kdlab.train.assemble(cfg)
    probe = LiveTeacherBeside()
    parts.trainer.callbacks.append(probe)
    parts.trainer.fit(parts.method, datamodule=parts.datamodule)
    cache = parts.method.teacher_cache
    assert cache.status == "built"
    assert cache.fields["tokenizer_hash"] == Hasher.hash(parts.datamodule.teacher_tokenizer)
    assert len(probe.pairs) == 6
    for cached, live in probe.pairs:
        torch.testing.assert_close(cached, live, atol=1e-3, rtol=1e-3)
    # Another seed's run (its own load of both tokenizers) reuses it.
    again = kdlab.train.assemble(cross_cfg(extra=["seed=1"], run_dir=cfg.run_dir + "-seed1"))
    assert again.method.teacher_cache.load_or_build(again.teacher) == 0
    assert again.method.teacher_cache.directory == cache.directory


def test_cache_key_changes_with_the_teachers_tokenizer(cross_cfg, make_cfg, tmp_path):
    cfg = cross_cfg()
    datamodule, student_tokenizer, teacher_tokenizer = datamodule_of(cfg)
    model = build(
        cfg,
        "teacher",
        head="sequence_classification",
        labels=["0", "1"],
        task="sst2",
        needs_head=True,
        hint="",
    )
    fields = teacher_cache(model, datamodule).fields
    assert fields["tokenizer_hash"] == Hasher.hash(teacher_tokenizer)
    # The same teacher with another tokenizer: one more token in its vocabulary.
    other = write_bpe_tokenizer(tmp_path / "other")
    other.add_tokens(["zebra"])
    other_dm = build(cfg, "task", tokenizer=student_tokenizer, teacher_tokenizer=other, seed=0)
    other_dm.setup("fit")
    other_fields = teacher_cache(model, other_dm).fields
    assert other_fields["tokenizer_hash"] == Hasher.hash(other) != fields["tokenizer_hash"]
    assert teacher_cache(model, other_dm).key != teacher_cache(model, datamodule).key
    # One tokenizer: keyed on it, as before.
    same_dm, same_tokenizer, _ = datamodule_of(make_cfg())
    assert teacher_cache(model, same_dm).fields["tokenizer_hash"] == Hasher.hash(same_tokenizer)


def test_mixkd_mixes_both_models_with_the_same_partners_and_lambda(cross_cfg, monkeypatch):
    cfg = cross_cfg(method="mixkd")
    validate(cfg)
    parts = kdlab.train.assemble(cfg)
    calls = []
    original = kdlab.methods.mixkd.mixed_forward

    def recording(model, inputs, partners, lam):
        calls.append((model, inputs, partners, lam))
        return original(model, inputs, partners, lam)

    monkeypatch.setattr(kdlab.methods.mixkd, "mixed_forward", recording)
    method = parts.method
    method.batch_position = (0, 3)
    batch = next(iter(parts.datamodule.training_loader()))
    method.compute_losses(batch)
    perm, lam = method.sample_mixing(batch["labels"].size(0))
    (student, s_in, s_partners, s_lam), (teacher, t_in, t_partners, t_lam) = calls
    assert student is method.student and teacher is method.teacher
    assert torch.equal(s_lam, lam) and torch.equal(t_lam, lam)
    for prefix, inputs, partners in (("", s_in, s_partners), ("teacher_", t_in, t_partners)):
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(inputs[key], batch[prefix + key])
            assert torch.equal(partners[key], batch[prefix + key][perm])
    # The teacher reads only its own inputs, the student its own.
    assert "token_type_ids" not in t_in and "token_type_ids" in s_in
    tokenizers = parts.tokenizer, parts.datamodule.teacher_tokenizer
    assert texts(s_partners["input_ids"], s_partners["attention_mask"], tokenizers[0]) == texts(
        t_partners["input_ids"], t_partners["attention_mask"], tokenizers[1]
    )


def refuse_before_building(monkeypatch):
    """Makes building any component fail: a refusal must come first."""

    def built(*args, **kwargs):
        raise AssertionError("a component was built before the tokenizers were refused")

    monkeypatch.setattr(kdlab.train, "_build", built)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["method=homodistil", "task=sst2"],
            "method=homodistil matches the teacher's hidden states and attention maps token",
        ),
        (
            ["method=kd", "task=corpus/local", "task.files=[x.txt]"],
            "task=local is a masked_lm task, whose outputs score token positions",
        ),
        (
            ["method=kd", "task=squad"],
            "task=squad is a question_answering task, whose outputs score token positions",
        ),
        (
            ["method=pd", "task=squad"],
            "task=squad is a question_answering task, whose outputs score token positions",
        ),
    ],
)
def test_token_level_methods_and_heads_refuse_other_tokenizers(
    roberta_dirs, wordpiece_dir, tmp_path, monkeypatch, overrides, reason
):
    refuse_before_building(monkeypatch)
    cfg = compose(
        [
            *overrides,
            "teacher=local",
            f"teacher.path={roberta_dirs[2]}",
            "model=bert_L2_H128",
            f"model.tokenizer={wordpiece_dir}",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError) as err:
        kdlab.train.assemble(cfg)
    message = str(err.value)
    assert reason in message
    assert f"teacher.path={roberta_dirs[2]}" in message
    assert f"model.tokenizer={wordpiece_dir}" in message
    size = len(load_tokenizer(str(roberta_dirs[2]), "teacher.path"))
    assert f"their vocabularies differ ({size} vs 42 tokens)" in message
    assert "which needs one tokenisation" in message


def test_a_same_vocabulary_pair_with_other_special_ids_is_refused_for_token_level_heads(
    teacher_dir, tmp_path, monkeypatch
):
    refuse_before_building(monkeypatch)
    student = tmp_path / "student_tok"
    write_tokenizer(student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config["pad_token"] = "[MASK]"  # same vocabulary, another pad id
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = compose(
        [
            "method=kd",
            "task=squad",
            "teacher=local",
            f"teacher.path={teacher_dir}",
            "model=bert_L2_H128",
            f"model.tokenizer={student}",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match=r"they disagree on pad_token_id \(0 vs 4\)"):
        kdlab.train.assemble(cfg)


def test_mixkd_pads_each_gathered_id_set_with_its_own_models_pad_id(cross_cfg, monkeypatch):
    # Under DDP each process pads its student and teacher ids to the longest of each set on
    # any process before gathering them. Stand-in for the other process: its sequences are
    # 3 tokens longer in both sets, and it gathers this process's inputs twice.
    cfg = cross_cfg(method="mixkd")
    validate(cfg)
    parts = kdlab.train.assemble(cfg)
    method = parts.method
    batch = next(iter(parts.datamodule.training_loader()))

    def all_gather(value):
        if isinstance(value, dict):
            return {k: torch.stack([v, v]) for k, v in value.items()}
        return torch.stack([value, value + 3])

    monkeypatch.setattr(type(method), "distributed", property(lambda self: True))
    monkeypatch.setattr(method, "all_gather", all_gather)
    whole = method.whole_batch(batch)
    pads = {"": method.student.config.pad_token_id, "teacher_": method.teacher.config.pad_token_id}
    assert pads == {"": 0, "teacher_": 1}
    for prefix, pad in pads.items():
        length = batch[prefix + "input_ids"].size(1)
        ids, mask = whole[prefix + "input_ids"], whole[prefix + "attention_mask"]
        assert ids.shape == (2 * batch["labels"].size(0), length + 3)
        assert torch.equal(ids[::2, :length], batch[prefix + "input_ids"])
        assert (ids[:, length:] == pad).all() and (mask[:, length:] == 0).all()
    assert torch.equal(whole["labels"][::2], batch["labels"])
