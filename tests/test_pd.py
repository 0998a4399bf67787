"""Pre-trained Distillation: the soft cross-entropy, label-free training, transfer sets."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForQuestionAnswering

import kdlab.train
from kdlab.data.transfer import transfer_set
from kdlab.errors import ConfigError, DataFormatError
from kdlab.losses import soft_kl, soft_target_loss
from kdlab.methods import PreTrainedDistillation
from kdlab.metrics import ClassificationMetrics
from kdlab.models.heads import model_inputs
from kdlab.optim import Optim
from tests.conftest import build_datamodule, build_student, build_teacher
from tests.fixtures import write_squad, write_tiny_qa_bert

STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def soft_ce_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """``−T² · Σ_y p_t(y) · log p_s(y)`` averaged over the rows, in Python floats."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        z_t = sum(math.exp(v / t) for v in t_row)
        z_s = sum(math.exp(v / t) for v in s_row)
        total += -sum(
            math.exp(tv / t) / z_t * (sv / t - math.log(z_s))
            for sv, tv in zip(s_row, t_row, strict=True)
        )
    return total / len(student) * t**2


def test_soft_cross_entropy_by_hand():
    t = 2.0
    losses = soft_target_loss({"labels": STUDENT}, {"labels": TEACHER}, t)
    expected = soft_ce_by_hand(STUDENT, TEACHER, t)
    assert losses["soft_ce"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_on_spans_averages_start_and_end_by_hand():
    # As the start and end cross-entropies of fine-tuning (BERT's SQuAD loss) are averaged.
    t = 2.0
    student = {"start_positions": STUDENT, "end_positions": TEACHER}
    teacher = {"start_positions": TEACHER, "end_positions": STUDENT}
    losses = soft_target_loss(student, teacher, t)
    start, end = soft_ce_by_hand(STUDENT, TEACHER, t), soft_ce_by_hand(TEACHER, STUDENT, t)
    assert losses["soft_ce"].item() == pytest.approx((start + end) / 2, rel=1e-6)
    assert losses["loss"].item() == pytest.approx((start + end) / 2, rel=1e-6)
    # The soft cross-entropy of a distribution with itself is its entropy: KL 0.
    entropy = (soft_ce_by_hand(TEACHER, TEACHER, t) + soft_ce_by_hand(STUDENT, STUDENT, t)) / 2
    # (fp32: the difference of two sums ten times its size)
    assert losses["kl"].item() == pytest.approx((start + end) / 2 - entropy, rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_entropy_with_the_kl_gradient():
    t = 1.5
    student = STUDENT.clone().requires_grad_(True)
    losses = soft_target_loss({"labels": student}, {"labels": TEACHER}, t)
    p_t = F.softmax(TEACHER / t, dim=-1)
    entropy = -(p_t * p_t.log()).sum(-1).mean() * t**2
    kl = soft_kl(student, TEACHER, t)
    torch.testing.assert_close(losses["soft_ce"], kl + entropy)
    torch.testing.assert_close(losses["kl"], kl)
    (grad_ce,) = torch.autograd.grad(losses["soft_ce"], student, retain_graph=True)
    (grad_kl,) = torch.autograd.grad(kl, student)
    torch.testing.assert_close(grad_ce, grad_kl)


def test_regression_is_the_mse_to_the_teacher():
    student, teacher = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [1.0]])
    losses = soft_target_loss({"labels": student}, {"labels": teacher}, 1.0)
    assert set(losses) == {"loss", "mse"}
    assert losses["mse"].item() == pytest.approx((0.25 + 1.0) / 2)


def _pd(cfg) -> PreTrainedDistillation:
    return PreTrainedDistillation(
        name="pd",
        student=build_student(cfg),
        teacher=build_teacher(cfg),
        head="sequence_classification",
        split_metrics={"val": ClassificationMetrics(["accuracy"], 2)},
        optim=Optim(),
    )


def test_poisoned_labels_change_nothing(make_cfg):
    cfg = make_cfg(method="pd")
    module = _pd(cfg)
    module.student.eval()  # no dropout: the two passes must be comparable bit for bit
    datamodule = build_datamodule(cfg)
    datamodule.task.transfer = None  # a labelled batch, to poison its labels
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    results = []
    for labels in (batch["labels"], 1 - batch["labels"], torch.full_like(batch["labels"], 7)):
        module.zero_grad()
        loss = module.compute_losses({**batch, "labels": labels})["loss"]
        loss.backward()
        grads = [p.grad.clone() for _, p in module.trainable_parameters()]
        results.append((loss.detach(), grads))
    without = {k: v for k, v in batch.items() if k != "labels"}
    module.zero_grad()
    label_free = module.compute_losses(without)["loss"]
    label_free.backward()
    results.append(
        (label_free.detach(), [p.grad.clone() for _, p in module.trainable_parameters()])
    )
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1], strict=True))
    # The value is the soft cross-entropy of the two models' outputs on the inputs alone.
    with torch.no_grad():
        student = module.student(**model_inputs(without, module.student)).logits
        teacher = module.teacher(**model_inputs(without, module.teacher)).logits
    assert label_free.item() == pytest.approx(soft_ce_by_hand(student, teacher, 1.0), rel=1e-5)


@pytest.mark.parametrize("task", ["sst2", "rte", "stsb"])
def test_pd_trains_on_inputs_without_labels(task, make_cfg, tmp_path):
    cfg = make_cfg(task=task, method="pd", extra=["trainer.limit_train_batches=2"])
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert "labels" not in datamodule.splits["train"].column_names
    assert "labels" in datamodule.splits["validation"].column_names
    metrics = kdlab.train.run(cfg)
    main = metrics["main_metric"]
    assert f"val/{main}" in metrics["student"] and metrics["method"] == "pd"
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    expected = {"stsb": "train/mse"}.get(task, "train/kl")
    assert expected in header


def test_transfer_files_corpus_and_size(make_cfg, glue_root, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a cat\tthe dog\n\nthe film was good\tit is fun\n")
    cfg = make_cfg(task="rte", method="pd", extra=[f"task.transfer.files=[{pairs}]"])
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert len(datamodule.splits["train"]) == 48 + 2
    text = tmp_path / "corpus.txt"
    text.write_text(
        "The movie was good. Bad!\nIt is a really fun story, and the actor was great.\n"
    )
    cfg = make_cfg(
        method="pd",
        extra=[
            "task.transfer.task_inputs=false",
            f"task.transfer.corpus=[{text}]",
        ],
    )
    train = transfer_set(None, cfg.task.transfer, ["text_a"])
    assert train["text_a"] == [
        "The movie was good.",
        "It is a really fun story, and the actor was great.",
    ]
    cfg = make_cfg(method="pd", extra=["task.transfer.size=10", "task.transfer.seed=3"])
    first = build_datamodule(cfg)
    first.setup()
    again = build_datamodule(
        make_cfg(method="pd", extra=["task.transfer.size=10", "task.transfer.seed=3", "seed=9"])
    )
    again.setup()
    assert len(first.splits["train"]) == 10
    assert first.splits["train"]["input_ids"] == again.splits["train"]["input_ids"]


# Hard-wrapped like Project Gutenberg's books: a sentence runs over lines, paragraphs end at a
# blank line, two spaces after a full stop.
WRAPPED = """CHAPTER I


It was a bright cold morning, and Mr. Weston walked
down to the village before breakfast.  He said, "We shall
walk to the church."  Nobody answered him; the road was wet,
and the hedges were
full of birds

Mrs. Goddard kept a school.  Was she a plain,
motherly kind of woman?
"""
# One paragraph per line, as WikiText's: headings between blank lines, consecutive paragraphs.
PER_LINE = """ = Lobsters =

 The lobster is a large crustacean . It lives on rocky ground !
 It is blue above and yellow below .
"""


def test_corpus_transfer_set_is_whole_sentences(tmp_path):
    wrapped, per_line = tmp_path / "emma.txt", tmp_path / "wiki.raw"
    wrapped.write_text(WRAPPED)
    per_line.write_text(PER_LINE)
    options = {"task_inputs": False, "corpus": [str(wrapped), str(per_line)], "seed": 0}
    assert transfer_set(None, options, ["text_a"])["text_a"] == [
        # Headings (fewer than four words) are left out; titles end no sentence.
        "It was a bright cold morning, and Mr. Weston walked down to the village before breakfast.",
        'He said, "We shall walk to the church."',
        "Nobody answered him; the road was wet, and the hedges were full of birds",
        "Mrs. Goddard kept a school.",
        "Was she a plain, motherly kind of woman?",
        "The lobster is a large crustacean .",
        "It lives on rocky ground !",
        "It is blue above and yellow below .",
    ]


def test_transfer_errors(make_cfg, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("one text only\n")
    cfg = make_cfg(task="rte", method="pd", extra=[f"task.transfer.files=[{bad}]"])
    with pytest.raises(DataFormatError, match=rf"{bad}:1: expected 2 tab-separated texts"):
        build_datamodule(cfg).setup()
    cfg = make_cfg(task="rte", method="pd", extra=[f"task.transfer.corpus=[{bad}]"])
    with pytest.raises(ConfigError, match="single sentences"):
        build_datamodule(cfg).setup()
    cfg = make_cfg(method="kd", extra=["transfer=task_inputs"])
    with pytest.raises(ConfigError, match="method=kd trains on labels.*method=pd"):
        kdlab.train.run(cfg)


def test_pd_on_squad_windows(make_cfg, tmp_path):
    train = write_squad(tmp_path / "train.json", n_articles=3)
    dev = write_squad(tmp_path / "dev.json", n_articles=2, seed=1)
    qa = write_tiny_qa_bert(tmp_path / "qa")
    cfg = make_cfg(
        task="squad",
        method="pd",
        extra=[
            f"task.train_file={train}",
            f"task.validation_file={dev}",
            "task.max_seq_length=64",
            "task.doc_stride=16",
            f"teacher.path={qa}",
            "trainer=debug",
        ],
    )
    metrics = kdlab.train.run(cfg)
    assert "val/f1" in metrics["student"]
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert "start_positions" not in datamodule.features["train"].column_names


def test_pd_on_spans_matches_start_and_end_distributions(tmp_path):
    student, teacher = (
        BertForQuestionAnswering.from_pretrained(write_tiny_qa_bert(tmp_path / name, seed))
        for name, seed in (("student", 1), ("teacher", 0))
    )
    # Random heads give near-uniform position distributions: sharpen them, so that the
    # start and end terms differ clearly.
    with torch.no_grad():
        for model in (student, teacher):
            model.qa_outputs.weight.mul_(30.0)
    module = PreTrainedDistillation(
        name="pd",
        student=student.eval(),
        teacher=teacher,
        head="question_answering",
        split_metrics={},
        optim=Optim(),
        temperature=2.0,
    )
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 30, (3, 12)), "attention_mask": torch.ones(3, 12)}
    losses = module.compute_losses(batch)
    with torch.no_grad():
        s, t = student(**batch), teacher(**batch)
    start = soft_ce_by_hand(s.start_logits, t.start_logits, 2.0)
    end = soft_ce_by_hand(s.end_logits, t.end_logits, 2.0)
    assert abs(start - end) > 1e-3 * start  # a loss reading one output twice would fail
    assert losses["soft_ce"].item() == pytest.approx((start + end) / 2, rel=1e-5)
    assert losses["loss"].item() == pytest.approx((start + end) / 2, rel=1e-5)


def test_released_miniature_offline_names_model_path(make_cfg):
    cfg = make_cfg(method="finetune", model="bert_mini", extra=["model.pretrained=true"])
    with pytest.raises(ConfigError, match="(?s)google/bert_uncased_L-4_H-256_A-4.*model.path"):
        build_student(cfg)
