"""The RoBERTa family: XLM-R and CamemBERT prune and export as RoBERTa, positions past the
padding index, the classification head and pooler masked where no LayerNorm follows, the
separable masked-LM head, HomoDistil's undropped attention, and layer truncation."""

import pytest
import torch
from transformers import AutoModel, CamembertConfig, XLMRobertaConfig

from kdlab.errors import ConfigError
from kdlab.families import FAMILIES, family_of
from kdlab.pruning import compacted_copy
from tests import test_families
from tests.families import TINY, check_mlm_head, check_pre_dropout_attention, tiny_config
from tests.test_families import AUTO, build, inputs, schedule


def pruned(model):
    """``model`` pruned to the test target (its masks installed), and the masks."""
    pruner, _ = list(schedule(model))[-1]
    return pruner.masks


@pytest.mark.parametrize("head", sorted(AUTO))
@pytest.mark.parametrize("config_class", [XLMRobertaConfig, CamembertConfig])
def test_xlm_roberta_and_camembert_prune_and_export_as_roberta(
    config_class, head, monkeypatch, tmp_path
):
    model_type = config_class.model_type
    assert FAMILIES[model_type] is FAMILIES["roberta"]
    config = config_class.from_dict({**TINY["roberta"].to_dict(), "model_type": model_type})
    monkeypatch.setitem(TINY, model_type, config)
    # test_families' checks, on a config of that model type.
    test_families.test_masked_and_compacted_models_agree_through_a_cubic_schedule(model_type, head)
    test_families.test_compacted_export_loads_with_stock_auto_classes(model_type, head, tmp_path)


def test_positions_past_the_padding_index_survive_compaction():
    model = build("roberta", "sequence_classification")
    masks = pruned(model)
    small = compacted_copy(model, masks).eval()
    assert (small.config.max_position_embeddings, small.config.pad_token_id) == (66, 1)
    keep = masks.kept_indices("hidden")
    table = model.roberta.embeddings.position_embeddings.weight
    assert torch.equal(small.roberta.embeddings.position_embeddings.weight, table[:, keep])
    # 64 tokens read rows 2-65; the second example is padded with the padding id, whose
    # position is the padding index.
    input_ids = torch.randint(5, 40, (2, 64), generator=torch.Generator().manual_seed(4))
    input_ids[1, 40:] = 1
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 1).long()}
    torch.testing.assert_close(model(**batch).logits, small(**batch).logits, rtol=1e-5, atol=1e-5)


def test_classification_head_reads_zeros_on_pruned_dims():
    model = build("roberta", "sequence_classification")
    masks = pruned(model)
    seen = {}
    model.classifier.out_proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model(**inputs())
    x = seen["x"]  # [B, H]: tanh(dense(<s>))
    assert x[:, masks.hidden == 0].abs().max() == 0
    assert x[:, masks.hidden == 1].abs().min() > 0


def test_base_model_pooler_is_masked_and_compacts():
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("roberta")).eval()
    assert model.pooler is not None
    masks = pruned(model)
    small = compacted_copy(model, masks).eval()
    batch = inputs()
    pooled, expected = model(**batch).pooler_output, small(**batch).pooler_output
    assert pooled[:, masks.hidden == 0].abs().max() == 0
    keep = masks.kept_indices("hidden")
    torch.testing.assert_close(pooled[:, keep], expected, rtol=1e-5, atol=1e-5)


def test_mlm_head_is_lm_head():
    model = build("roberta", "masked_lm")
    pruned(model)  # the masks apply in both paths
    assert FAMILIES["roberta"].mlm_head(model) is model.lm_head
    check_mlm_head(model)


def test_homodistil_student_attention_is_read_before_dropout():
    check_pre_dropout_attention(TINY["roberta"])


def test_cross_attention_is_refused():
    config = tiny_config("roberta", is_decoder=True, add_cross_attention=True)
    with pytest.raises(ConfigError, match="add_cross_attention"):
        family_of(config)
