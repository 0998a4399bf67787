"""ModernBERT's own structure, pruned: fused QKV and gated FFN rows compact block by block,
every parameter of every head is covered with and without biases, bias-free LayerNorms are
masked, local/global attention and rotary positions survive compaction, the masked-LM
fast path gives the full model's (and sparse prediction's) rows, and HomoDistil reads the
student's attention before dropout."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import ModernBertConfig, ModernBertModel

import tests.test_families as common
from kdlab.families import family_of
from kdlab.losses import IGNORE_INDEX
from kdlab.methods.homodistil import PRE_DROPOUT_ATTENTION
from kdlab.models.heads import forward
from kdlab.pruning import Pruner, compacted_copy
from kdlab.pruning.masks import MaskedLayerNorm
from tests.families import TARGET, TINY, tiny_config
from tests.test_homodistil_loss import homodistil

LAYERS, HIDDEN, HEADS, HEAD_DIM, FFN = 3, 32, 4, 8, 64
# Every optional bias on but the decoder's (the stock defaults are the opposite), mean
# pooling and an untied decoder: the other setting of everything the rules depend on.
VARIANT = dict(
    attention_bias=True,
    mlp_bias=True,
    norm_bias=True,
    classifier_bias=True,
    decoder_bias=False,
    classifier_pooling="mean",
    tie_word_embeddings=False,
)


def prune_fixed(model) -> Pruner:
    """Fixed masks at ``TARGET``: 16 of 32 hidden dims, 2 of 4 heads, 32 of 64 neurons."""
    pruner = Pruner(model, target=TARGET)
    generator = torch.Generator().manual_seed(3)
    masks = pruner.masks
    masks.hidden.zero_()[torch.randperm(HIDDEN, generator=generator)[:16]] = 1
    masks.heads.copy_(torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]]))
    for layer in range(LAYERS):
        masks.ffn[layer].zero_()[torch.randperm(FFN, generator=generator)[:32]] = 1
    masks.refresh()
    return pruner


def test_fused_qkv_and_gated_ffn_rows_compact_block_by_block():
    model = common.build("modernbert", "masked_lm")
    masks = prune_fixed(model).masks
    small = compacted_copy(model, masks)
    hidden = masks.kept_indices("hidden")
    for i, (big, cut) in enumerate(zip(model.model.layers, small.model.layers, strict=True)):
        heads = masks.heads[i].nonzero().squeeze(1)
        ffn = masks.ffn[i].nonzero().squeeze(1)
        # Wqkv rows are [q | k | v], each head-major: view(3, heads, head_dim, hidden).
        qkv = big.attn.Wqkv.weight.view(3, HEADS, HEAD_DIM, HIDDEN)[:, heads][..., hidden]
        torch.testing.assert_close(cut.attn.Wqkv.weight.view(3, 2, HEAD_DIM, 16), qkv)
        # Wi rows are [value | gate] (ModernBertMLP's chunk(2)): a neuron keeps both rows.
        for half_big, half_cut in zip(
            big.mlp.Wi.weight.chunk(2), cut.mlp.Wi.weight.chunk(2), strict=True
        ):
            torch.testing.assert_close(half_cut, half_big[ffn][:, hidden])
    # The first half is the one the activation reads, the second the gate.
    mlp = small.model.layers[1].mlp
    x = torch.randn(5, 16)
    value, gate = mlp.Wi.weight[:32], mlp.Wi.weight[32:]
    torch.testing.assert_close(mlp(x), mlp.Wo(mlp.act(x @ value.T) * (x @ gate.T)))


@pytest.mark.parametrize("variant", [{}, VARIANT], ids=["stock", "variant"])
@pytest.mark.parametrize("head", [*sorted(common.AUTO), "base"])
def test_every_parameter_over_a_pruned_structure_has_a_rule(head, variant):
    config = tiny_config("modernbert", **variant)
    auto = common.AUTO.get(head)
    model = auto.from_config(config) if auto else ModernBertModel(config)
    axes = family_of(config).parameter_axes(model)
    sizes = {"hidden": HIDDEN, "heads": HEADS * HEAD_DIM, "ffn": FFN}
    # Whatever is left has no pruned dimension: only the vocabulary's and labels' biases.
    assert {name for name in model.state_dict() if name not in axes} <= {
        "decoder.bias",
        "classifier.bias",
    }
    for name, tensor in model.state_dict().items():
        for axis in axes.get(name, ()):
            assert tensor.shape[axis.axis] == sizes[axis.kind] * axis.blocks, name
    if variant:
        prefix = "" if head == "base" else "model."
        assert {f"{prefix}layers.1.attn.Wqkv.bias", f"{prefix}final_norm.bias"} <= set(axes)


@pytest.mark.parametrize("head", sorted(common.AUTO))
def test_biases_mean_pooling_and_untied_decoder_prune_and_export(head, monkeypatch, tmp_path):
    monkeypatch.setitem(TINY, "modernbert", tiny_config("modernbert", **VARIANT))
    common.test_masked_and_compacted_models_agree_through_a_cubic_schedule("modernbert", head)
    common.test_compacted_export_loads_with_stock_auto_classes("modernbert", head, tmp_path)


@pytest.mark.parametrize("norm_bias", [False, True])
def test_layernorms_with_or_without_bias_normalise_the_kept_dims_only(norm_bias):
    model = common.build("modernbert", "masked_lm", norm_bias=norm_bias)
    keys = set(model.state_dict())
    masks = prune_fixed(model).masks
    assert set(model.state_dict()) == keys  # no bias appears, none is lost
    norm = model.model.embeddings.norm
    assert isinstance(norm, MaskedLayerNorm) and (norm.bias is None) == (not norm_bias)
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)
    keep = masks.kept_indices("hidden")
    x = torch.randn(2, 3, HIDDEN)
    out = norm(x)
    bias = None if norm.bias is None else norm.bias[keep]
    expected = F.layer_norm(x[..., keep], (16,), norm.weight[keep], bias, norm.eps)
    torch.testing.assert_close(out[..., keep], expected)
    assert out[..., masks.hidden == 0].abs().max() == 0


def test_compaction_keeps_layer_types_window_rotary_and_the_stock_config():
    model = common.build("modernbert", "masked_lm")
    small = compacted_copy(model, prune_fixed(model).masks)
    config = small.config
    assert type(config) is ModernBertConfig
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        16,
        2,
        32,
    )
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert config.local_attention == 8 and config.rope_parameters == model.config.rope_parameters
    for kind in ("full_attention", "sliding_attention"):
        # Rotary frequencies follow the head size, which compaction keeps.
        name = f"{kind}_inv_freq"
        cut, full = getattr(small.model.rotary_emb, name), getattr(model.model.rotary_emb, name)
        assert cut.shape == (HEAD_DIM // 2,)
        torch.testing.assert_close(cut, full, rtol=0, atol=0)
    config.validate()


def masked_batch() -> dict[str, torch.Tensor]:
    """Two examples of 12 and 7 tokens (longer than the 8-token window), five graded."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 40, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, [0, 5, 11]] = input_ids[0, [0, 5, 11]]
    labels[1, [2, 6]] = input_ids[1, [2, 6]]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_masked_lm_fast_path_gives_the_full_and_the_sparse_models_rows():
    model = common.build("modernbert", "masked_lm", sparse_prediction=True)
    prune_fixed(model)
    batch = masked_batch()
    rows = batch["labels"] != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        fast = forward(model, batch, "masked_lm")
        full = model(**inputs).logits  # no labels: sparse prediction does not apply
        sparse = model(**inputs, labels=batch["labels"]).logits  # the labelled rows
    assert fast.logits.shape == (5, 40)
    torch.testing.assert_close(fast.logits, full[rows], rtol=0, atol=0)
    torch.testing.assert_close(fast.logits, sparse, rtol=0, atol=0)


def test_homodistil_reads_the_students_attention_before_dropout():
    # Layer 0 local, so that its train-mode probabilities (the first layer's input is the
    # same in both modes) test the sliding-window mask; deeper layers see a context mixed
    # by dropped probabilities and legitimately differ in train mode.
    torch.manual_seed(0)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = tiny_config(
        "modernbert", attention_dropout=0.5, layer_types=layer_types, attn_implementation="eager"
    )
    teacher = common.AUTO["masked_lm"].from_config(config)
    student = copy.deepcopy(teacher)
    method = homodistil(student, teacher)
    assert student.config._attn_implementation == PRE_DROPOUT_ATTENTION
    batch = masked_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    options = {"output_attentions": True}
    with torch.no_grad():
        method.student.train()
        trained = method.student(**inputs, **options)
        method.student.eval()
        evaluated = method.student(**inputs, **options)
        reference = method.teacher.eval()(**inputs, **options)
    far = (torch.arange(12)[:, None] - torch.arange(12)[None, :]).abs() > 4  # outside the window
    for k, attention in enumerate(trained.attentions):
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        if layer_types[k] == "sliding_attention":  # the 12 real tokens of the first example
            assert attention[0][:, far].abs().max() == 0
    torch.testing.assert_close(trained.attentions[0], evaluated.attentions[0], rtol=0, atol=0)
    for a_s, a_t in zip(evaluated.attentions, reference.attentions, strict=True):
        torch.testing.assert_close(a_s, a_t, rtol=0, atol=0)  # stock eager attention
    assert not torch.allclose(trained.logits, evaluated.logits)  # dropout mixed the values
