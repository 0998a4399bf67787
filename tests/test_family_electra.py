"""The ELECTRA family: the factorised embedding (E-dim embeddings, ``embeddings_project``
writing the hidden space) and the unfactorised one (embeddings in the hidden space), the
generator masked-LM head, the classification head, HomoDistil's undropped attention, and
layer truncation."""

import pytest
import torch

from kdlab.errors import ConfigError
from kdlab.families import FAMILIES, PrunedAxis, family_of
from kdlab.pruning import StructuredMasks, compacted_copy
from kdlab.pruning.masks import check_target
from tests import test_families
from tests.families import TARGET, TINY, check_mlm_head, check_pre_dropout_attention, tiny_config
from tests.test_families import AUTO, build, inputs, schedule

# TINY["electra"] is factorised (embedding 12, hidden 32); this one is not.
UNFACTORISED = "electra-unfactorised"


@pytest.fixture
def unfactorised(monkeypatch):
    monkeypatch.setitem(TINY, UNFACTORISED, tiny_config("electra", embedding_size=32))


def pruned(model):
    """``model`` pruned to the test target (its masks installed), and the masks."""
    pruner, _ = list(schedule(model))[-1]
    return pruner.masks


@pytest.mark.parametrize("head", sorted(AUTO))
def test_unfactorised_electra_prunes_and_exports(unfactorised, head, tmp_path):
    # test_families' checks, on the unfactorised config.
    test_families.test_masked_and_compacted_models_agree_through_a_cubic_schedule(
        UNFACTORISED, head
    )
    test_families.test_compacted_export_loads_with_stock_auto_classes(UNFACTORISED, head, tmp_path)


def test_unfactorised_embeddings_and_generator_head_are_in_the_hidden_space(unfactorised):
    model = build(UNFACTORISED, "masked_lm")
    assert not hasattr(model.electra, "embeddings_project")
    masks = pruned(model)
    hidden = (PrunedAxis(0, "hidden"),)
    for name in (
        "electra.embeddings.LayerNorm.weight",
        "generator_predictions.LayerNorm.weight",
        "generator_predictions.dense.bias",
    ):
        assert masks.axes[name] == hidden, name
    assert masks.axes["electra.embeddings.word_embeddings.weight"] == (PrunedAxis(1, "hidden"),)
    assert masks.axes["generator_lm_head.weight"] == (PrunedAxis(1, "hidden"),)
    small = compacted_copy(model, masks)
    assert (small.config.embedding_size, small.config.hidden_size) == (16, 16)
    assert not hasattr(small.electra, "embeddings_project")
    assert small.generator_predictions.LayerNorm.normalized_shape == (16,)
    assert small.generator_lm_head.weight is small.electra.embeddings.word_embeddings.weight


def test_factorised_embedding_space_is_not_pruned_and_its_projection_is():
    model = build("electra", "masked_lm")
    masks = pruned(model)
    unpruned = [
        "electra.embeddings.word_embeddings.weight",
        "electra.embeddings.position_embeddings.weight",
        "electra.embeddings.token_type_embeddings.weight",
        "electra.embeddings.LayerNorm.weight",
        "generator_predictions.dense.bias",
        "generator_predictions.LayerNorm.weight",
        "generator_lm_head.weight",
    ]
    assert not set(unpruned) & set(masks.axes)
    assert masks.axes["electra.embeddings_project.weight"] == (PrunedAxis(0, "hidden"),)
    assert masks.axes["generator_predictions.dense.weight"] == (PrunedAxis(1, "hidden"),)
    small = compacted_copy(model, masks).eval()
    assert (small.config.embedding_size, small.config.hidden_size) == (12, 16)
    state, compact = model.state_dict(), small.state_dict()
    for name in unpruned:
        assert torch.equal(compact[name], state[name]), name
    keep = masks.kept_indices("hidden")
    weight = state["electra.embeddings_project.weight"]
    assert torch.equal(compact["electra.embeddings_project.weight"], weight[keep])
    # hidden_states[0] is the projected embedding: zero on pruned dims, the compacted
    # model's projection on kept ones.
    batch = inputs()
    first = model(**batch, output_hidden_states=True).hidden_states[0]
    assert first[..., masks.hidden == 0].abs().max() == 0
    torch.testing.assert_close(
        first[..., keep], small(**batch, output_hidden_states=True).hidden_states[0]
    )


def test_factorised_electra_is_not_pruned_to_its_embedding_size():
    config = tiny_config("electra", embedding_size=16)
    with pytest.raises(ConfigError, match="embedding_size 16 projected to hidden_size 32"):
        check_target(config, TARGET)
    # A checkpoint whose masks reached that shape on the way to another one.
    model = AUTO["masked_lm"].from_config(config)
    masks = StructuredMasks.for_model(model)
    masks.hidden[16:] = 0
    masks.heads[:, 2:] = 0
    masks.refresh()
    with pytest.raises(ConfigError, match="cannot be compacted to hidden size 16"):
        compacted_copy(model, masks)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # ELECTRA's attention takes heads of int(30 / 4) = 7 dims, 28 in all, and builds.
        ({"hidden_size": 30}, "hidden size 30 and 4 heads of 7 cannot be pruned"),
        ({"is_decoder": True, "add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_variants_the_rules_do_not_describe_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        family_of(tiny_config("electra", **overrides))


def test_classification_head_reads_zeros_on_pruned_dims():
    model = build("electra", "sequence_classification")
    masks = pruned(model)
    seen = {}
    model.classifier.out_proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model(**inputs())
    x = seen["x"]  # [B, H]: gelu(dense(first token))
    assert x[:, masks.hidden == 0].abs().max() == 0
    assert x[:, masks.hidden == 1].abs().max() > 0


@pytest.mark.parametrize("variant", ["electra", UNFACTORISED])
def test_mlm_head_is_the_generator_head(unfactorised, variant):
    model = build(variant, "masked_lm")
    pruned(model)  # the masks apply in both paths
    check_mlm_head(model)
    assert FAMILIES["electra"].mlm_head(build("electra", "sequence_classification")) is None


def test_homodistil_student_attention_is_read_before_dropout():
    check_pre_dropout_attention(TINY["electra"])
