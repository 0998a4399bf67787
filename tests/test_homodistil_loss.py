"""HomoDistil's loss pinned term by term, and the pruner behaviour the method relies on.

Every expected value is computed here in plain torch from the models' own outputs (loops
over examples where that is clearer), on a tiny masked-LM BERT with fixed, partly pruned
masks and a padded batch.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import BertConfig, BertForMaskedLM

from kdlab.components import PLAN
from kdlab.errors import ConfigError
from kdlab.losses import IGNORE_INDEX, masked_mse
from kdlab.methods import HomoDistil
from kdlab.optim import Optim
from kdlab.pruning import Pruner, compacted_copy
from kdlab.pruning.importance import PlatonImportance
from kdlab.train import CONF_DIR
from kdlab.validation import check_node
from tests.conftest import compose
from tests.fixtures import write_tiny_mlm_bert

# The fixture teacher: 2 layers, hidden 32, 4 heads of 8, FFN 64.
TARGET = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
LAYERS, HIDDEN, HEADS, HEAD_DIM, FFN = 2, 32, 4, 8, 64
# Lengths of the three examples of the batch: the last two are padded.
LENGTHS = (10, 7, 4)
WEIGHTS = {"mlm": 0.5, "kl": 2.0, "hidden": 0.25, "attn": 3.0, "emb": 1.5}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_tiny_mlm_bert(tmp_path_factory.mktemp("homodistil_loss") / "teacher")


def make_method(teacher_dir, **kwargs) -> HomoDistil:
    """HomoDistil on a copy of the fixture teacher, as ``kdlab.train`` builds it."""
    teacher = BertForMaskedLM.from_pretrained(teacher_dir)
    student = BertForMaskedLM.from_pretrained(teacher_dir)
    return homodistil(student, teacher, **kwargs)


def homodistil(student, teacher, **kwargs) -> HomoDistil:
    """HomoDistil of ``student`` (pruned towards ``TARGET``) from ``teacher``."""
    Pruner(student, target=TARGET)  # installs the masks into the student
    return HomoDistil(
        name="homodistil",
        student=student,
        teacher=teacher,
        head="masked_lm",
        split_metrics={},
        optim=Optim(),
        **kwargs,
    )


def prune_fixed(method: HomoDistil) -> None:
    """Fixed masks at the target shape: 16 of 32 hidden dims, 2 of 4 heads, 32 of 64 FFN."""
    generator = torch.Generator().manual_seed(3)
    masks = method.masks
    masks.hidden.zero_()[torch.randperm(HIDDEN, generator=generator)[:16]] = 1
    masks.heads.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))
    for layer in range(LAYERS):
        masks.ffn[layer].zero_()[torch.randperm(FFN, generator=generator)[:32]] = 1
    masks.refresh()


def padded_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Three examples of lengths ``LENGTHS`` padded to 10, two or three masked positions each."""
    generator = torch.Generator().manual_seed(0)
    batch_size, width = len(LENGTHS), max(LENGTHS)
    real = torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]
    input_ids = torch.randint(5, vocab_size, (batch_size, width), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, positions in enumerate(([1, 4, 8], [2, 5], [0, 3])):
        labels[b, positions] = input_ids[b, positions]
        input_ids[b, positions] = 4  # [MASK]
    return {
        "input_ids": input_ids.masked_fill(~real, 0),
        "attention_mask": real.long(),
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": labels,
    }


def outputs(method: HomoDistil, batch: dict) -> tuple:
    """Both models' outputs on the batch with hidden states and attention maps."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    options = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        return method.student(**inputs, **options), method.teacher(**inputs, **options)


def mean_square(parts: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the squares of all entries of ``parts``, one flat list."""
    return torch.cat([p.flatten() for p in parts]).square().mean()


def hand_hidden(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over real tokens × kept dims: example by example, its first n tokens."""
    dims = keep.nonzero().squeeze(1)
    return mean_square([(student[b, :n] - teacher[b, :n])[:, dims] for b, n in enumerate(LENGTHS)])


def hand_attention(student: torch.Tensor, teacher: torch.Tensor, heads: torch.Tensor):
    """MSE over kept heads × real query rows × real key columns."""
    kept = heads.nonzero().squeeze(1)
    return mean_square(
        [(student[b, kept, :n, :n] - teacher[b, kept, :n, :n]) for b, n in enumerate(LENGTHS)]
    )


def hand_terms(method: HomoDistil, batch: dict, temperature: float) -> dict[str, torch.Tensor]:
    student, teacher = outputs(method, batch)
    masks = method.masks
    labels = batch["labels"]
    vocab = student.logits.size(-1)
    target = labels != IGNORE_INDEX
    log_p_s = F.log_softmax(student.logits[target] / temperature, dim=-1)
    p_t = F.softmax(teacher.logits[target] / temperature, dim=-1)
    kl_rows = (p_t * (p_t.log() - log_p_s)).sum(-1)
    return {
        "mlm": F.cross_entropy(student.logits.view(-1, vocab), labels.view(-1), ignore_index=-100),
        "kl": kl_rows.mean() * temperature**2,
        "emb": hand_hidden(student.hidden_states[0], teacher.hidden_states[0], masks.hidden),
        "hidden": sum(
            hand_hidden(s, t, masks.hidden)
            for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True)
        ),
        "attn": sum(
            hand_attention(s, t, masks.heads[k])
            for k, (s, t) in enumerate(zip(student.attentions, teacher.attentions, strict=True))
        ),
    }


# ------------------------------------------------------------------------ the loss terms
def test_every_term_and_the_total_match_a_hand_computation(teacher_dir):
    weights = {f"alpha_{k}": v for k, v in WEIGHTS.items()}
    method = make_method(teacher_dir, temperature=2.0, **weights)
    prune_fixed(method)
    method.student.eval()  # no dropout: the hand computation sees the same outputs
    batch = padded_batch(method.student.config.vocab_size)
    expected = hand_terms(method, batch, temperature=2.0)
    losses = method.compute_losses(batch)
    for name, value in expected.items():
        assert value > 0, name
        torch.testing.assert_close(losses[name], value, msg=name)
    total = sum(WEIGHTS[name] * value for name, value in expected.items())
    torch.testing.assert_close(losses["loss"], total)


def test_padding_is_left_out_of_the_hidden_and_attention_terms(teacher_dir):
    method = make_method(teacher_dir)
    prune_fixed(method)
    method.student.eval()
    batch = padded_batch(method.student.config.vocab_size)
    student, teacher = outputs(method, batch)
    masks = method.masks
    # With the pads counted, the terms would differ: the test can tell them apart.
    with_pads = masked_mse(student.hidden_states[1], teacher.hidden_states[1], masks.hidden)
    real_only = hand_hidden(student.hidden_states[1], teacher.hidden_states[1], masks.hidden)
    assert not torch.isclose(with_pads, real_only, rtol=1e-3)
    losses = method.compute_losses(batch)
    hidden = sum(
        hand_hidden(s, t, masks.hidden)
        for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True)
    )
    torch.testing.assert_close(losses["hidden"], hidden)
    attn = sum(
        hand_attention(s, t, masks.heads[k])
        for k, (s, t) in enumerate(zip(student.attentions, teacher.attentions, strict=True))
    )
    torch.testing.assert_close(losses["attn"], attn)


def test_masked_mse_on_hand_numbers():
    student = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0], [4.0, 1.0, 9.0]])
    # Squared errors [[1, 0, 4], [0, 16, 9]].
    torch.testing.assert_close(masked_mse(student, teacher, torch.ones(3)), torch.tensor(5.0))
    keep_dims = torch.tensor([1.0, 0.0, 1.0])  # columns 0 and 2: (1 + 4 + 0 + 9) / 4
    torch.testing.assert_close(masked_mse(student, teacher, keep_dims), torch.tensor(3.5))
    keep = torch.tensor([[True], [False]]) & keep_dims.bool()  # row 0, columns 0, 2
    torch.testing.assert_close(masked_mse(student, teacher, keep), torch.tensor(2.5))
    # An unselected entry does not leak in, not even a non-finite one.
    student[1, 1] = float("inf")
    torch.testing.assert_close(masked_mse(student, teacher, keep), torch.tensor(2.5))


def small_masked_lm(**config) -> BertForMaskedLM:
    """A random masked LM of the module's shape (vocabulary 42); ``config`` overrides any
    other ``BertConfig`` value."""
    shape = dict(
        vocab_size=42,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    return BertForMaskedLM(BertConfig(**(shape | config)))


# --------------------------------------------------------------- attention before dropout
def dropout_teacher_copy(layers: int) -> tuple[BertForMaskedLM, BertForMaskedLM]:
    """A teacher with attention dropout only (hidden dropout 0) and its exact copy."""
    torch.manual_seed(0)
    teacher = small_masked_lm(
        num_hidden_layers=layers,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.5,
    )
    return copy.deepcopy(teacher), teacher


def test_pre_dropout_attention_equals_eager_attention_outside_training():
    # The same mask (padding left out) and arithmetic as the teacher's eager attention.
    student, teacher = dropout_teacher_copy(layers=2)
    method = homodistil(student, teacher)
    assert student.config._attn_implementation != teacher.config._attn_implementation
    method.student.eval()
    batch = padded_batch(42)
    s, t = outputs(method, batch)
    torch.testing.assert_close(s.logits, t.logits, rtol=0, atol=0)
    for a_s, a_t in zip(s.attentions, t.attentions, strict=True):
        torch.testing.assert_close(a_s, a_t, rtol=0, atol=0)
        assert a_s[2, :, :, 4:].abs().max() == 0  # padded keys of the 4-token example


def test_attention_term_of_a_teacher_copy_in_train_mode_is_zero():
    # The first layer's input is the same in both (no hidden dropout), so its attention
    # probabilities are too; deeper layers see a context mixed by dropped probabilities
    # and legitimately differ, which is why this uses one layer.
    student, teacher = dropout_teacher_copy(layers=1)
    method = homodistil(student, teacher)
    method.student.train()
    losses = method.compute_losses(padded_batch(42))
    assert losses["attn"].item() == 0.0


def test_student_attention_maps_in_train_mode_are_distributions_and_dropout_still_acts():
    student, teacher = dropout_teacher_copy(layers=2)
    method = homodistil(student, teacher)
    batch = padded_batch(42)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    method.student.train()
    trained = method.student(**inputs, output_attentions=True)
    for attention in trained.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    method.student.eval()
    evaluated = method.student(**inputs, output_attentions=True)
    assert not torch.allclose(trained.logits, evaluated.logits)  # dropout mixed the values


# ---------------------------------------------------------------------- hidden projection
def test_linear_projection_starts_as_the_identity_and_is_trained_but_not_exported(teacher_dir):
    select = make_method(teacher_dir)
    linear = make_method(teacher_dir, hidden_projection="linear")
    assert select.projections is None
    select.student.eval(), linear.student.eval()
    batch = padded_batch(select.student.config.vocab_size)
    # Unpruned, the identity projection changes nothing.
    before, after = select.compute_losses(batch), linear.compute_losses(batch)
    for term in ("hidden", "emb"):
        torch.testing.assert_close(after[term], before[term])
    # The projections are the method's, trained with the student, and not the student's.
    names = {name for name, _ in linear.trainable_parameters()}
    assert {f"projections.{k}.weight" for k in range(LAYERS + 1)} <= names
    assert not any("projection" in key for key in linear.student.state_dict())
    prune_fixed(linear)
    assert not any(
        "projection" in key for key in compacted_copy(linear.student, linear.masks).state_dict()
    )
    losses = linear.compute_losses(batch)
    losses["loss"].backward()
    assert linear.projections["1"].weight.grad.abs().sum() > 0


def test_linear_projection_compares_the_teacher_over_its_full_width(teacher_dir):
    method = make_method(teacher_dir, hidden_projection="linear")
    prune_fixed(method)
    torch.manual_seed(0)
    with torch.no_grad():
        for projection in method.projections.values():
            projection.weight.add_(0.1 * torch.randn_like(projection.weight))
    method.student.eval()
    batch = padded_batch(method.student.config.vocab_size)
    student, teacher = outputs(method, batch)
    every_dim = torch.ones(HIDDEN)

    def projected(k: int) -> torch.Tensor:
        return student.hidden_states[k] @ method.projections[str(k)].weight.detach().T

    losses = method.compute_losses(batch)
    expected_emb = hand_hidden(projected(0), teacher.hidden_states[0], every_dim)
    torch.testing.assert_close(losses["emb"], expected_emb)
    expected_hidden = sum(
        hand_hidden(projected(k), teacher.hidden_states[k], every_dim) for k in range(1, LAYERS + 1)
    )
    torch.testing.assert_close(losses["hidden"], expected_hidden)


def test_projections_exist_only_for_terms_that_are_on(teacher_dir):
    # An unused parameter would stall DDP (no gradient to all-reduce).
    method = make_method(teacher_dir, hidden_projection="linear", alpha_emb=0.0)
    assert sorted(method.projections) == [str(k) for k in range(1, LAYERS + 1)]
    cfg = compose(["method=homodistil", "method.hidden_projection=mlp", "run_dir=unused"])
    with pytest.raises(ConfigError, match="method.hidden_projection='mlp' must be one of"):
        check_node(
            cfg.method, "method", HomoDistil, next(s.runtime for s in PLAN if s.key == "method")
        )


def test_method_config_selects_the_kept_dimensions_by_default():
    conf = OmegaConf.load(f"{CONF_DIR}/method/homodistil.yaml")
    assert conf.method.hidden_projection == "select"


# ------------------------------------------------------------------- pruner: schedule
@pytest.mark.parametrize("step", [0, 5, 10, 11, 25, 40, 69, 70, 71, 90, 100])
def test_scheduled_counts_follow_the_cubic_formula(step):
    model = small_masked_lm()
    pruner = Pruner(model, target=TARGET, initial_warmup=0.1, final_warmup=0.3)
    total, t_i, t_f = 100, 10, 30

    def remaining(target_fraction: float) -> float:
        if step <= t_i:
            return 1.0
        if step > total - t_f:
            return target_fraction
        progress = (step - t_i) / (total - t_i - t_f)
        return target_fraction + (1 - target_fraction) * (1 - progress) ** 3

    expected = {
        "heads": round(HEADS * remaining(2 / HEADS)),
        "ffn": round(FFN * remaining(32 / FFN)),
    }
    assert pruner.scheduled_counts(step, total) == expected


def test_no_head_hidden_dim_or_neuron_comes_back_under_random_importance():
    model = small_masked_lm()
    pruner = Pruner(model, target=TARGET, update_interval=2, initial_warmup=0.1, final_warmup=0.2)
    generator = torch.Generator().manual_seed(0)
    changes = 0
    for step in range(1, 41):
        pruner.structure_scores = lambda: {
            "hidden": torch.rand(HIDDEN, generator=generator),
            "heads": torch.rand(LAYERS, HEADS, generator=generator),
            "ffn": torch.rand(LAYERS, FFN, generator=generator),
        }
        before = {k: getattr(pruner.masks, k).clone() for k in ("hidden", "heads", "ffn")}
        changes += pruner.update(step, 40)
        for kind, mask in before.items():
            assert (getattr(pruner.masks, kind) <= mask).all(), (step, kind)
    assert changes >= 3  # several updates, each with fresh random scores
    assert pruner.masks.counts() == {"hidden": 16, "heads": 2, "ffn": 32}


# ----------------------------------------------------------------- pruner: importance
def test_structure_importance_sums_every_parameter_that_belongs_to_it():
    torch.manual_seed(0)
    model = small_masked_lm()
    pruner = Pruner(model, target=TARGET)
    for _, p in pruner.params:
        p.grad = torch.randn_like(p)
    pruner.importance = PlatonImportance(beta1=0.0, beta2=1.0)  # score = |θ g| of this step
    pruner.importance.update(pruner.params)
    scores = pruner.structure_scores()
    s = {n: (p * p.grad).abs().detach() for n, p in pruner.params}

    # Head 1 of layer 0: rows 8..15 of Q, K, V (weights and biases), the same columns of
    # the attention output projection.
    layer = "bert.encoder.layer.0."
    rows = slice(8, 16)
    head = s[layer + "attention.output.dense.weight"][:, rows].sum() + sum(
        s[layer + f"attention.self.{m}.weight"][rows].sum()
        + s[layer + f"attention.self.{m}.bias"][rows].sum()
        for m in ("query", "key", "value")
    )
    torch.testing.assert_close(scores["heads"][0, 1], head)

    # Hidden dimension 5 of the residual stream, every parameter entry that reads or writes
    # it once: embedding columns, LayerNorm entries, the input columns and output rows
    # (and biases) of each layer's projections, both axes of the MLM head transform (its
    # [5, 5] entry once). The decoder is tied to the word embeddings: counted there.
    d = 5
    hidden = (
        sum(
            s[f"bert.embeddings.{kind}_embeddings.weight"][:, d].sum()
            for kind in ("word", "position", "token_type")
        )
        + s["bert.embeddings.LayerNorm.weight"][d]
        + s["bert.embeddings.LayerNorm.bias"][d]
    )
    for k in range(LAYERS):
        layer = f"bert.encoder.layer.{k}."
        hidden = hidden + sum(
            s[layer + f"attention.self.{m}.weight"][:, d].sum() for m in ("query", "key", "value")
        )
        hidden = hidden + s[layer + "attention.output.dense.weight"][d].sum()
        hidden = hidden + s[layer + "attention.output.dense.bias"][d]
        hidden = hidden + s[layer + "intermediate.dense.weight"][:, d].sum()
        hidden = hidden + s[layer + "output.dense.weight"][d].sum()
        hidden = hidden + s[layer + "output.dense.bias"][d]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            hidden = hidden + s[layer + norm + ".weight"][d] + s[layer + norm + ".bias"][d]
    transform = "cls.predictions.transform."
    w = s[transform + "dense.weight"]
    hidden = hidden + w[d].sum() + w[:, d].sum() - w[d, d] + s[transform + "dense.bias"][d]
    hidden = hidden + s[transform + "LayerNorm.weight"][d] + s[transform + "LayerNorm.bias"][d]
    # Every parameter with a hidden axis is in the sum above (nothing silently extra).
    assert "bert.pooler.dense.weight" not in s
    torch.testing.assert_close(scores["hidden"][d], hidden)
