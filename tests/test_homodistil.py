"""Corpus data, method=mlm, method=homodistil and pruning in full runs on tiny models."""

import csv
import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

import kdlab.train
from kdlab.compact import main as compact_main
from kdlab.errors import ConfigError
from kdlab.pruning.callback import PruningCallback
from tests.conftest import QUIET_CPU_RUN, build_student, build_task, run_cli
from tests.fixtures import (
    write_corpus,
    write_glue,
    write_squad,
    write_tiny_bert,
    write_tiny_mlm_bert,
)
from tests.helpers import Interrupted, RecordFinalWeights

COMMON = [*QUIET_CPU_RUN, "eval.speed_batches=2"]
# Hidden 32 with 4 heads of 8 → half width: hidden 16, 2 heads, FFN 32.
HALF = [
    "model=pruned",
    "model.target.hidden_size=16",
    "model.target.num_attention_heads=2",
    "model.target.intermediate_size=32",
]

# Keep the checkpoint of every epoch (e0.ckpt, e1.ckpt) besides last.ckpt.
EVERY_EPOCH = [
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='e{epoch}'",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("homodistil")
    return {
        "teacher": write_tiny_mlm_bert(root / "teacher"),
        "corpus": write_corpus(root / "corpus"),
        "glue": write_glue(root / "glue"),
        "root": root,
    }


def corpus_args(data) -> list[str]:
    return [
        "task=corpus/local",
        f"task.files=[{data['corpus']}/*.txt]",
        "task.max_seq_length=16",
        "task.batch_size=8",
        "task.validation_fraction=0.2",
        "task.max_train_samples=32",
        "task.cache_dir=null",
        f"teacher.path={data['teacher']}",
    ]


def compose(overrides: list[str]):
    with hydra.initialize_config_dir(config_dir=kdlab.train.CONF_DIR, version_base="1.3"):
        return hydra.compose("train", overrides=overrides)


def run(overrides: list[str]) -> dict:
    return kdlab.train.run(compose(COMMON + overrides))


def logged_columns(run_dir: Path) -> set[str]:
    with open(next(run_dir.glob("csv/**/metrics.csv"))) as f:
        return set(next(csv.reader(f)))


def test_corpus_chunks_and_fixed_validation_masks(data):
    tokenizer = AutoTokenizer.from_pretrained(data["teacher"])
    task = compose([*corpus_args(data), "run_dir=x"]).task
    first = build_task(task, tokenizer, batch_size=4)
    first.setup()
    ids = torch.tensor(first.splits["train"]["input_ids"])
    assert ids.shape[1] == 16
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (
        ids[:, -1] == tokenizer.sep_token_id
    ).all()
    assert (ids != tokenizer.unk_token_id).all()
    batch = next(iter(first.train_dataloader()))
    masked = batch["labels"] != -100
    assert 0 < masked.float().mean() < 0.5
    second = build_task(task, tokenizer, batch_size=4)
    second.setup()
    val_a = next(iter(first.val_dataloader()[0]))
    val_b = next(iter(second.val_dataloader()[0]))
    torch.testing.assert_close(val_a["labels"], val_b["labels"])
    torch.testing.assert_close(val_a["input_ids"], val_b["input_ids"])


def test_corpus_files_that_match_nothing_name_the_key(data):
    tokenizer = AutoTokenizer.from_pretrained(data["teacher"])
    task = compose([*corpus_args(data), "task.files=[/nonexistent/*.txt]", "run_dir=x"]).task
    with pytest.raises(ConfigError, match="task.files"):
        build_task(task, tokenizer).setup()


def test_mlm_reports_validation_loss_and_perplexity(data, tmp_path):
    metrics = run(
        [
            *corpus_args(data),
            "method=mlm",
            "model=pretrained",
            f"model.path={data['teacher']}",
            "trainer.max_epochs=1",
            f"run_dir={tmp_path}",
        ]
    )
    student = metrics["student"]
    # One validation batch: perplexity is exactly exp of the mean masked-token loss.
    assert student["val/perplexity"] == pytest.approx(math.exp(student["val/loss"]), rel=1e-4)
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "student")


def test_mlm_refuses_a_classification_task(data, tmp_path):
    with pytest.raises(ConfigError, match="method=mlm needs a masked-LM task"):
        run(
            [
                "method=mlm",
                "model=pretrained",
                f"model.path={data['teacher']}",
                f"task.data_dir={data['glue']}/SST-2",
                f"run_dir={tmp_path}",
            ]
        )


def test_homodistil_refuses_an_untrained_mlm_head_with_both_ways_out(data, tmp_path):
    classifier = write_tiny_bert(data["root"] / "classifier")  # no MLM head at all
    overrides = [
        *corpus_args(data),
        f"teacher.path={classifier}",
        "method=homodistil",
        "model=pruned",
        "model.target.hidden_size=16",
        "model.target.num_attention_heads=1",
        "model.target.intermediate_size=32",
        "trainer.max_epochs=1",
        f"run_dir={tmp_path}",
    ]
    with pytest.raises(ConfigError) as err:
        run(overrides)
    assert "method=mlm" in str(err.value)
    assert "method.alpha_mlm=0 method.alpha_kl=0" in str(err.value)
    # The second way out: representation-only distillation runs (in the same directory,
    # which holds the refused run's config.yaml).
    metrics = run([*overrides, "method.alpha_mlm=0", "method.alpha_kl=0", "overwrite=true"])
    assert metrics["student"]["params"] < metrics["teacher"]["params"]


def test_homodistil_prunes_to_the_target_and_exports_a_stock_bert(data, tmp_path):
    metrics = run(
        [
            *corpus_args(data),
            "method=homodistil",
            *HALF,
            "trainer.max_epochs=2",
            "pruning.update_interval=1",
            "pruning.track_interval=2",
            f"run_dir={tmp_path}",
        ]
    )
    columns = logged_columns(tmp_path)
    for term in ("loss", "mlm", "kl", "hidden", "attn", "emb"):
        assert f"train/{term}" in columns
    assert {"prune/kl", "prune/remaining", "prune/params"} <= columns
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "student")
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)
    assert metrics["student"]["params"] == sum(p.numel() for p in student.parameters())
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "student", num_labels=2)
    history = json.loads((tmp_path / "pruning_history.json").read_text())
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the student starts as the teacher
    assert history[-1]["params"] == metrics["student"]["params"]
    assert (tmp_path / "pruning_history.png").stat().st_size > 1000
    # The compaction CLI rebuilds the same model from the last checkpoint.
    out = tmp_path / "from_ckpt"
    compact_main([str(tmp_path / "checkpoints" / "last.ckpt"), str(out)])
    again = AutoModelForMaskedLM.from_pretrained(out)
    inputs = {"input_ids": torch.randint(5, 30, (2, 10))}
    student.eval(), again.eval()
    torch.testing.assert_close(again(**inputs).logits, student(**inputs).logits)
    assert AutoTokenizer.from_pretrained(out)
    # Downstream on spans (issue item 8): the compact student fine-tunes on SQuAD as any
    # stock encoder does.
    squad = write_squad(tmp_path / "squad.json")
    qa = run(
        [
            "method=finetune",
            "model=pretrained",
            f"model.path={tmp_path / 'student'}",
            "task=squad",
            f"task.train_file={squad}",
            f"task.validation_file={squad}",
            "task.max_seq_length=64",
            "task.doc_stride=16",
            "task.cache_dir=null",
            "trainer.fast_dev_run=true",
            f"run_dir={tmp_path / 'squad'}",
        ]
    )
    assert {"val/exact_match", "val/f1"} <= qa["student"].keys()
    assert (tmp_path / "squad" / "predictions.json").is_file()


def test_kd_with_pruning_then_finetune_the_compact_student(data, tmp_path):
    glue = [f"task.data_dir={data['glue']}/SST-2", "task.max_seq_length=64", "trainer.max_epochs=2"]
    teacher = write_tiny_bert(data["root"] / "sst2_teacher")  # 2 heads of 16
    metrics = run(
        [
            *glue,
            "method=kd",
            "teacher=local",
            f"teacher.path={teacher}",
            "pruning=homotopic",
            "model=pruned",
            "model.target.hidden_size=16",
            "model.target.num_attention_heads=1",
            "model.target.intermediate_size=16",
            "pruning.update_interval=1",
            f"run_dir={tmp_path / 'kd'}",
        ]
    )
    assert "val/accuracy" in metrics["student"]
    assert "prune/kl" in logged_columns(tmp_path / "kd")
    tuned = run(
        [
            *glue,
            "method=finetune",
            "model=pretrained",
            f"model.path={tmp_path / 'kd' / 'student'}",
            f"run_dir={tmp_path / 'ft'}",
        ]
    )
    assert tuned["student"]["params"] == metrics["student"]["params"]


def _pruning_state(checkpoint: Path) -> dict:
    """What the pruning callback stored in a checkpoint: masks, importance, history."""
    return torch.load(checkpoint, weights_only=True)["callbacks"][PruningCallback.__name__]


def test_resume_mid_pruning_ends_with_the_same_masks(data, tmp_path):
    overrides = [
        *corpus_args(data),
        "method=homodistil",
        *HALF,
        "trainer.max_epochs=2",
        "pruning.update_interval=1",
        "pruning.initial_warmup=0.1",
        "pruning.final_warmup=0.2",
        *EVERY_EPOCH,
    ]
    run([*overrides, f"run_dir={tmp_path / 'full'}"])
    middle = tmp_path / "full" / "checkpoints" / "e0.ckpt"
    mid_masks = _pruning_state(middle)["masks"]["ffn"]
    assert 0 < mid_masks.mean() < 1  # saved while pruning was under way
    run([*overrides, f"ckpt_path={middle}", f"run_dir={tmp_path / 'resumed'}"])
    full = _pruning_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed = _pruning_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for kind in ("hidden", "heads", "ffn"):
        torch.testing.assert_close(resumed["masks"][kind], full["masks"][kind])
    ema_full = full["importance"]["sensitivity"]
    ema_resumed = resumed["importance"]["sensitivity"]
    for name, value in ema_full.items():
        torch.testing.assert_close(ema_resumed[name], value)
    assert resumed["history"] == full["history"]


def test_resume_right_after_a_mid_epoch_checkpoint_prunes_as_if_uninterrupted(data, tmp_path):
    # 4 batches an epoch, validation (and checkpoints) after batches 2 and 4; the run is
    # killed after step 6, in its second epoch, while the masks are shrinking. The MLM
    # masks of the training batches are drawn from the global RNG, so the restored RNG
    # states matter as well as the loader position.
    overrides = [
        *corpus_args(data),
        "method=homodistil",
        *HALF,
        "trainer.max_epochs=2",
        "trainer.val_check_interval=0.5",
        "pruning.update_interval=1",
        "pruning.initial_warmup=0.1",
        "pruning.final_warmup=0.2",
        "pruning.track_interval=1",
        "+callbacks.record._target_=tests.helpers.RecordFinalWeights",
    ]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_metrics = run([*overrides, f"run_dir={full_dir}"])
    interrupt = ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=6"]
    with pytest.raises(Interrupted):
        run([*overrides, *interrupt, f"run_dir={cut_dir}"])
    cut = _pruning_state(cut_dir / "checkpoints" / "last.ckpt")
    assert 0 < cut["masks"]["ffn"].mean() < 1
    resumed_metrics = run([*overrides, "ckpt_path=last", f"run_dir={cut_dir}"])

    full = _pruning_state(full_dir / "checkpoints" / "last.ckpt")
    resumed = _pruning_state(cut_dir / "checkpoints" / "last.ckpt")
    for kind in ("hidden", "heads", "ffn"):
        torch.testing.assert_close(resumed["masks"][kind], full["masks"][kind], rtol=0, atol=0)
    for name, value in full["importance"]["sensitivity"].items():
        torch.testing.assert_close(
            resumed["importance"]["sensitivity"][name], value, rtol=0, atol=0
        )
    assert [row["step"] for row in resumed["history"]] == list(range(9))
    assert resumed["history"] == full["history"]
    weights = RecordFinalWeights.weights
    for name, value in weights[str(full_dir)].items():
        torch.testing.assert_close(weights[str(cut_dir)][name], value, rtol=0, atol=0)
    assert resumed_metrics["student"]["val/perplexity"] == full_metrics["student"]["val/perplexity"]


@pytest.mark.parametrize(
    "weights",
    [[], ["method.alpha_mlm=0", "method.alpha_kl=0"]],
    ids=["all terms", "representations only"],
)
def test_two_process_ddp_ranks_hold_identical_masks(data, tmp_path, weights):
    # Every mask update all-gathers the masks and fails if any rank differs
    # (PruningCallback._check_masks_agree); the run succeeding on 2 gloo processes is the check.
    overrides = [
        *COMMON,
        *corpus_args(data),
        "method=homodistil",
        *HALF,
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "pruning.update_interval=1",
        "pruning.initial_warmup=0.0",
        "pruning.final_warmup=0.0",
        "eval.speed_batches=0",
        f"run_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
        *weights,
    ]
    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    config = OmegaConf.load(tmp_path / "config.yaml")
    assert config.trainer.devices == 2
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "student")
    assert student.config.intermediate_size == 32
    frozen = "Frozen (no loss term reaches them): student.cls.predictions"
    assert (frozen in result.stdout + result.stderr) == bool(weights)


def test_linear_hidden_projection_trains_with_the_student_and_stays_out_of_the_export(
    data, tmp_path
):
    metrics = run(
        [
            *corpus_args(data),
            "method=homodistil",
            "method.hidden_projection=linear",
            *HALF,
            "trainer.max_epochs=1",
            "pruning.update_interval=1",
            "pruning.initial_warmup=0.0",
            "pruning.final_warmup=0.0",
            f"run_dir={tmp_path}",
        ]
    )
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    projection = state["projections.1.weight"]
    assert projection.shape == (32, 32)  # the teacher's width, over the student's full width
    assert not torch.equal(projection, torch.eye(32))  # trained
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "student")
    assert student.config.hidden_size == 16
    assert metrics["student"]["params"] == sum(p.numel() for p in student.parameters())


def test_random_init_copy_keeps_the_teachers_shape_not_its_weights(data):
    cfg = compose(
        [*corpus_args(data), "method=homodistil", *HALF, "model.random_init=true"]
        + ["model.init_seed=7", "run_dir=x"]  # seed 0 would redraw the fixture teacher itself
    )
    student = build_student(cfg)
    teacher = AutoModelForMaskedLM.from_pretrained(data["teacher"])
    assert student.config.to_dict() == teacher.config.to_dict()
    weights = teacher.state_dict()
    matrices = [k for k, v in student.state_dict().items() if v.dim() == 2]
    assert matrices and not any(torch.equal(student.state_dict()[k], weights[k]) for k in matrices)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
