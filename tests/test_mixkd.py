"""MixKD: mixing, losses against hand-computed values, teacher isolation, configs."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from kdlab import train
from kdlab.errors import ConfigError
from kdlab.losses import distillation_loss, mixup, mixup_target_loss, soft_cross_entropy
from kdlab.methods.mixkd import MixKD, mixed_forward
from kdlab.metrics import ClassificationMetrics
from kdlab.optim import Optim
from tests.fixtures import write_tiny_bert

# Four sentences of four known words each: no padding, so the pair's mask union is trivial.
SAME_LENGTH = ["the movie was good", "a film is bad", "i love the dog", "they hate this plot"]
MIXED_LENGTH = ["good", "the movie was really fun", "bad plot", "i love the dog and cat"]
PERM = torch.tensor([2, 0, 3, 1])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    """Teacher and student checkpoints (different weights) for 2 classes and regression."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        n: (write_tiny_bert(root / f"t{n}", n, seed=0), write_tiny_bert(root / f"s{n}", n, seed=1))
        for n in (1, 2)
    }


def make_module(dirs, num_labels: int = 2, **kwargs) -> MixKD:
    teacher_dir, student_dir = dirs[num_labels]
    module = MixKD(
        name="mixkd",
        student=BertForSequenceClassification.from_pretrained(student_dir),
        teacher=BertForSequenceClassification.from_pretrained(teacher_dir),
        head="sequence_classification",
        split_metrics={
            "val": ClassificationMetrics(
                ["accuracy"] if num_labels > 1 else ["pearson"], num_labels
            )
        },
        optim=Optim(),
        **kwargs,
    )
    # Random tiny heads give near-uniform outputs; larger logits make the KL terms big
    # enough to compare with hand-computed values at a tight relative tolerance.
    with torch.no_grad():
        for model in (module.student, module.teacher):
            model.classifier.weight.mul_(30.0)
    return module


def make_batch(dirs, texts, num_labels: int = 2, pair: bool = False) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dirs[num_labels][0])
    second = [*texts[1:], texts[0]] if pair else None
    batch = dict(tokenizer(texts, second, padding=True, return_tensors="pt"))
    if num_labels == 1:
        batch["labels"] = torch.tensor([0.5, 4.0, 2.25, 1.0])
    else:
        batch["labels"] = torch.tensor([1, 0, 1, 0])
    return batch


def fix_mixing(module: MixKD, perm: torch.Tensor, lam: torch.Tensor) -> None:
    module.sample_mixing = lambda n: (perm, lam)


def partners(inputs: dict, perm: torch.Tensor) -> dict:
    """The partners' rows of every input: row ``i`` is ``perm[i]``'s."""
    return {k: v[perm] for k, v in inputs.items()}


# --------------------------------------------------------------------------- pure losses
def test_mixup_is_exact_at_lambda_one_and_for_self_pairs():
    x = torch.randn(4, 5, 3)
    assert torch.equal(mixup(x, x[PERM], torch.ones(4)), x)
    assert torch.equal(mixup(x, x.clone(), torch.tensor([0.3, 0.7, 0.1, 0.9])), x)
    lam = torch.tensor([0.25, 0.5, 0.0, 1.0])
    expected = torch.stack([0.25 * x[0] + 0.75 * x[2], 0.5 * x[1] + 0.5 * x[0], x[3], x[3]])
    torch.testing.assert_close(mixup(x, x[PERM], lam), expected)


def test_mixup_target_loss_hand_computed_classification():
    # Example 0 mixes y=0 with y=1 at λ=0.75 → target (0.75, 0.25); p = (0.5, 0.5).
    # Example 1 mixes y=1 with y=0 at λ=0.25 → target (0.75, 0.25); p = (0.75, 0.25).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss = mixup_target_loss(
        logits, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.75, 0.25])
    )
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss.item() == pytest.approx((math.log(2.0) + entropy) / 2, rel=1e-6)


def test_mixup_target_loss_hand_computed_regression():
    # Targets: 0.75·0 + 0.25·4 = 1 and 0.25·4 + 0.75·0 = 1; errors 0 and 1.
    logits = torch.tensor([[1.0], [2.0]])
    loss = mixup_target_loss(
        logits, torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0]), torch.tensor([0.75, 0.25])
    )
    assert loss.item() == pytest.approx(0.5)


# ------------------------------------------------------------------- the method on models
@pytest.mark.parametrize("num_labels", [2, 1])
def test_lambda_one_reduces_to_unmixed_losses_exactly(tiny_dirs, num_labels):
    module = make_module(tiny_dirs, num_labels).eval()
    batch = make_batch(tiny_dirs, SAME_LENGTH, num_labels)
    assert bool(batch["attention_mask"].all())
    fix_mixing(module, PERM, torch.ones(4))
    assert_reduces_to_unmixed(module, batch)


@pytest.mark.parametrize("num_labels", [2, 1])
def test_self_pairs_reduce_to_unmixed_losses_exactly(tiny_dirs, num_labels):
    module = make_module(tiny_dirs, num_labels).eval()
    batch = make_batch(tiny_dirs, MIXED_LENGTH, num_labels, pair=True)
    assert not bool(batch["attention_mask"].all())
    fix_mixing(module, torch.arange(4), torch.tensor([0.3, 0.7, 0.1, 0.9]))
    assert_reduces_to_unmixed(module, batch)


def assert_reduces_to_unmixed(module: MixKD, batch: dict) -> None:
    perm, lam = module.sample_mixing(4)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    pairs = partners(inputs, perm)
    with torch.no_grad():
        student = module.student(**inputs).logits
        teacher = module.teacher(**inputs).logits
        # Both models' mixed outputs are bit for bit their un-mixed outputs.
        assert torch.equal(mixed_forward(module.student, inputs, pairs, lam).logits, student)
        assert torch.equal(mixed_forward(module.teacher, inputs, pairs, lam).logits, teacher)
    losses = module.compute_losses(batch)
    labels = batch["labels"]
    assert torch.equal(losses["tmkd"], distillation_loss(student, teacher, module.temperature))
    if student.size(-1) == 1:
        assert torch.equal(losses["sm"], losses["ce"])
    else:
        one_hot = F.one_hot(labels, student.size(-1)).float()
        assert torch.equal(losses["sm"], soft_cross_entropy(student, one_hot))
        # F.cross_entropy sums the batch in another order: equal up to that rounding.
        torch.testing.assert_close(losses["sm"], losses["ce"], rtol=1e-6, atol=0)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _manual_logits(model, batch, perm, lam) -> torch.Tensor:
    """Mixed logits with embeddings mixed by plain arithmetic (word + token type)."""
    emb = model.bert.embeddings
    words, types = emb.word_embeddings.weight, emb.token_type_embeddings.weight
    ids, tt, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    own = words[ids] + types[tt]
    lam3 = lam.view(-1, 1, 1)
    mixed = lam3 * own + (1 - lam3) * own[perm]
    with torch.no_grad():
        # BERT adds T[token_type_ids]; with ids of zeros, subtract T[0] beforehand.
        return model(
            inputs_embeds=mixed - types[0],
            token_type_ids=torch.zeros_like(tt),
            attention_mask=torch.maximum(mask, mask[perm]),
        ).logits


def test_sm_and_tmkd_hand_computed_classification(tiny_dirs):
    module = make_module(tiny_dirs, 2, temperature=2.0).eval()
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 2, pair=True)
    lam = torch.tensor([0.25, 0.6, 1.0, 0.0])
    fix_mixing(module, PERM, lam)
    losses = module.compute_losses(batch)

    z_s = _manual_logits(module.student, batch, PERM, lam).tolist()
    z_t = _manual_logits(module.teacher, batch, PERM, lam).tolist()
    labels = batch["labels"].tolist()
    sm, tmkd, t = 0.0, 0.0, 2.0
    for i, j in enumerate(PERM.tolist()):
        q = [0.0, 0.0]
        q[labels[i]] += lam[i].item()
        q[labels[j]] += 1 - lam[i].item()
        p = _softmax(z_s[i])
        sm -= sum(qc * math.log(pc) for qc, pc in zip(q, p, strict=True))
        p_t, p_s = _softmax(z_t[i], t), _softmax(z_s[i], t)
        tmkd += t**2 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
    assert losses["sm"].item() == pytest.approx(sm / 4, rel=1e-4)
    assert losses["tmkd"].item() == pytest.approx(tmkd / 4, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + sm / 4 + tmkd / 4, rel=1e-4)


def test_sm_and_tmkd_hand_computed_regression(tiny_dirs):
    module = make_module(tiny_dirs, 1, alpha_sm=0.5, alpha_tmkd=2.0).eval()
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 1, pair=True)
    lam = torch.tensor([0.25, 0.6, 1.0, 0.0])
    fix_mixing(module, PERM, lam)
    losses = module.compute_losses(batch)

    z_s = _manual_logits(module.student, batch, PERM, lam).squeeze(-1).tolist()
    z_t = _manual_logits(module.teacher, batch, PERM, lam).squeeze(-1).tolist()
    y = batch["labels"].tolist()
    targets = [lam[i].item() * y[i] + (1 - lam[i].item()) * y[j] for i, j in enumerate(PERM)]
    sm = sum((s - g) ** 2 for s, g in zip(z_s, targets, strict=True)) / 4
    tmkd = sum((s - t) ** 2 for s, t in zip(z_s, z_t, strict=True)) / 4
    assert losses["sm"].item() == pytest.approx(sm, rel=1e-4)
    assert losses["tmkd"].item() == pytest.approx(tmkd, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(
        losses["ce"].item() + 0.5 * sm + 2.0 * tmkd, rel=1e-4
    )


def test_mixed_targets_stay_fp32_under_bf16_autocast(tiny_dirs):
    # The student's outputs come out in bf16 there; the STS-B scores (4.9 reads 4.90625 in
    # bf16) and λ (0.3 reads 0.30078125) must not be rounded to it.
    module = make_module(tiny_dirs, 1).eval()
    batch = make_batch(tiny_dirs, SAME_LENGTH, 1)
    batch["labels"] = torch.tensor([4.9, 0.3, 2.7, 1.1])
    lam = torch.tensor([0.3, 0.7, 0.1, 0.9])
    fix_mixing(module, PERM, lam)
    outputs = []
    module.student.register_forward_hook(lambda model, args, out: outputs.append(out.logits))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = module.compute_losses(batch)
    plain, mixed = (o.squeeze(-1).tolist() for o in outputs)  # un-mixed, then mixed pass
    assert outputs[1].dtype == torch.bfloat16
    y, w = batch["labels"].tolist(), lam.tolist()
    targets = [w[i] * y[i] + (1 - w[i]) * y[j] for i, j in enumerate(PERM.tolist())]
    sm = sum((s - t) ** 2 for s, t in zip(mixed, targets, strict=True)) / 4
    ce = sum((s - t) ** 2 for s, t in zip(plain, y, strict=True)) / 4
    assert losses["sm"].item() == pytest.approx(sm, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_token_types_of_pairs_are_mixed(tiny_dirs):
    module = make_module(tiny_dirs, 2).eval()
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 2, pair=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lam = torch.tensor([0.25, 0.6, 0.5, 0.1])
    with torch.no_grad():
        mixed = mixed_forward(module.student, inputs, partners(inputs, PERM), lam).logits
        # Keeping each example's own token types instead gives different outputs.
        words = module.student.get_input_embeddings()(inputs["input_ids"])
        unmixed_types = module.student(
            inputs_embeds=mixup(words, words[PERM], lam),
            token_type_ids=inputs["token_type_ids"],
            attention_mask=torch.maximum(inputs["attention_mask"], inputs["attention_mask"][PERM]),
        ).logits
    torch.testing.assert_close(mixed, _manual_logits(module.student, batch, PERM, lam))
    assert not torch.allclose(mixed, unmixed_types)


def test_teacher_gets_no_gradients(tiny_dirs):
    module = make_module(tiny_dirs, 2, kd_alpha=0.5).train()
    module.on_train_start()  # as Lightning does: student trains, teacher stays in eval
    losses = module.compute_losses(make_batch(tiny_dirs, MIXED_LENGTH, 2))
    losses["loss"].backward()
    assert not module.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    student_grad = module.student.get_input_embeddings().weight.grad
    assert student_grad is not None and student_grad.abs().sum() > 0
    assert {n for n, _ in module.trainable_parameters()} == {
        "student." + n for n, _ in module.student.named_parameters()
    }


def test_each_model_mixes_its_own_embedding_table(tiny_dirs):
    module = make_module(tiny_dirs, 2).eval()
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 2)
    lam = torch.tensor([0.25, 0.6, 0.5, 0.1])
    fix_mixing(module, PERM, lam)
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(model, args, kwargs):
            if kwargs.get("inputs_embeds") is not None:
                seen[name] = kwargs["inputs_embeds"].detach()

        return hook

    module.student.register_forward_pre_hook(record("student"), with_kwargs=True)
    module.teacher.register_forward_pre_hook(record("teacher"), with_kwargs=True)
    module.compute_losses(batch)
    ids = batch["input_ids"]
    for name in ("student", "teacher"):
        table = getattr(module, name).get_input_embeddings().weight.detach()
        torch.testing.assert_close(seen[name], mixup(table[ids], table[ids[PERM]], lam))
    assert not torch.allclose(seen["student"], seen["teacher"])


def test_ablations_and_original_kd_term(tiny_dirs):
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 2)
    calls = []
    module = make_module(tiny_dirs, 2, alpha_tmkd=0.0).eval()
    module.teacher.register_forward_hook(lambda *a: calls.append(1))
    assert set(module.compute_losses(batch)) == {"loss", "ce", "sm", "lambda"}
    assert calls == []  # the SM-only ablation never runs the teacher

    module = make_module(tiny_dirs, 2, alpha_sm=0.0).eval()
    assert set(module.compute_losses(batch)) == {"loss", "ce", "tmkd", "lambda"}

    module = make_module(tiny_dirs, 2, kd_alpha=0.5).eval()
    losses = module.compute_losses(batch)
    expected = 0.5 * losses["ce"] + 0.5 * losses["kd"] + losses["sm"] + losses["tmkd"]
    torch.testing.assert_close(losses["loss"], expected)


def test_sampled_mixing_is_a_permutation_with_lambda_in_unit_interval(tiny_dirs):
    module = make_module(tiny_dirs, 2, alpha=0.4)
    perm, lam = module.sample_mixing(64)
    assert sorted(perm.tolist()) == list(range(64))
    assert lam.shape == (64,) and lam.dtype == torch.float32
    assert bool(((lam >= 0) & (lam <= 1)).all())
    # Beta(0.4, 0.4) puts most mass near 0 and 1.
    assert ((lam < 0.2) | (lam > 0.8)).float().mean() > 0.4


def assert_same_draws(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_draws_are_a_function_of_the_seed_and_the_batch_position(tiny_dirs):
    # Not of the global random state (dropout's), nor of what the module drew before: a
    # resumed run, a new module at the position Lightning restores, draws the same.
    module = make_module(tiny_dirs, 2, seed=3)
    module.batch_position = (1, 5)
    torch.manual_seed(0)
    np.random.seed(0)
    first = module.sample_mixing(16)
    torch.manual_seed(1)
    np.random.seed(1)
    assert_same_draws(module.sample_mixing(16), first)
    fresh = make_module(tiny_dirs, 2, seed=3)
    fresh.batch_position = (1, 5)
    assert_same_draws(fresh.sample_mixing(16), first)
    # Another batch, epoch or seed draws anew.
    for seed, position in ((3, (1, 6)), (3, (2, 5)), (4, (1, 5))):
        fresh.seed, fresh.batch_position = seed, position
        perm, lam = fresh.sample_mixing(16)
        assert not torch.equal(lam, first[1])


def test_each_training_batch_draws_at_its_position(tiny_dirs):
    module = make_module(tiny_dirs, 2, seed=5)
    drawn = []
    sample = module.sample_mixing

    def record(batch_size: int):
        drawn.append((module.batch_position, sample(batch_size)))
        return drawn[-1][1]

    module.sample_mixing = record
    batch = make_batch(tiny_dirs, MIXED_LENGTH, 2)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=2))
    assert [position for position, _ in drawn] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    fresh = make_module(tiny_dirs, 2, seed=5)
    for position, draws in drawn:
        fresh.batch_position = position
        assert_same_draws(fresh.sample_mixing(2), draws)


# ------------------------------------------------------------------------ end to end
# A random miniature on the teacher's tokenizer (the tiny teacher has only 2 layers, too
# few for bert3).
MINIATURE = ("model=bert_L2_H128", "model.hidden_size=32", "model.head_dim=16")


def compose_mixkd(teacher_dir: Path, run_dir: Path, *overrides: str, model=MINIATURE):
    """mixkd on the tiny GLUE fixtures with a ``model`` override list for the student."""
    with initialize_config_dir(config_dir=train.CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "method=mixkd",
                *model,
                "teacher=local",
                f"teacher.path={teacher_dir}",
                "teacher.require_trained_head=false",
                "logger=csv",
                "trainer=debug",
                "trainer.accelerator=cpu",
                "callbacks=quiet",
                "eval.speed_batches=0",
                f"task.cache_dir={run_dir / 'cache'}",
                "task.max_seq_length=64",  # the tiny teachers' positions
                f"run_dir={run_dir}",
                *overrides,
            ],
        )


@pytest.mark.parametrize("task", ["sst2", "rte", "stsb"])
def test_fast_dev_run(tiny_dirs, glue_root, tmp_path, monkeypatch, task):
    monkeypatch.setenv("KDLAB_DATA_DIR", str(glue_root))
    teacher_dir = tiny_dirs[1 if task == "stsb" else 2][0]
    metrics = train.run(compose_mixkd(teacher_dir, tmp_path, f"task={task}"))
    assert metrics["method"] == "mixkd"
    value = metrics["student"][f"val/{metrics['main_metric']}"]
    assert math.isfinite(value)
    assert (tmp_path / "student" / "config.json").is_file()


@pytest.fixture(scope="module")
def six_layer_teacher(tmp_path_factory) -> Path:
    """A tiny 6-layer BERT classifier, deep enough for the bert3 and bert6 students."""
    return write_tiny_bert(tmp_path_factory.mktemp("six"), seed=0, layers=6)


@pytest.mark.parametrize("model", ["bert3", "bert6"])
def test_layer_truncated_students(six_layer_teacher, glue_root, tmp_path, monkeypatch, model):
    monkeypatch.setenv("KDLAB_DATA_DIR", str(glue_root))
    cfg = compose_mixkd(six_layer_teacher, tmp_path, "task=sst2", model=[f"model={model}"])
    metrics = train.run(cfg)
    student = BertForSequenceClassification.from_pretrained(metrics["student"]["path"])
    assert student.config.num_hidden_layers == int(model[-1])


def test_span_tasks_are_refused(tiny_dirs, tmp_path):
    cfg = compose_mixkd(tiny_dirs[2][0], tmp_path, "task=squad", f"task.train_file={tmp_path}")
    with pytest.raises(ConfigError, match="task=squad .a question_answering task"):
        train.run(cfg)
