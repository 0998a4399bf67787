"""DeBERTa-v2/v3: the variants its family module describes (raw or normalised relative
embeddings, shared or separate position projections, the v2-xlarge convolution, both
masked-LM heads) pruned exactly, those it does not refused, and HomoDistil's attention term
refused before anything loads (the attention returns post-dropout probabilities)."""

import csv
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, DebertaV2Config, DebertaV2ForMaskedLM

import kdlab.train
from kdlab.errors import ConfigError
from kdlab.families import family_of
from kdlab.pruning import compacted_copy
from tests import test_families
from tests.conftest import QUIET_CPU_RUN, compose
from tests.families import TINY, check_pre_dropout_attention, tiny_config
from tests.fixtures import write_corpus, write_tokenizer

FAMILY = "deberta-v2"
VARIANTS = {
    # No LayerNorm on the relative embeddings: their raw pruned dims reach the projections.
    # At the default init (std 0.02) the raw embeddings move the logits by ~1e-7, below
    # the tolerance; std 0.5 makes an unmasked read differ by whole units.
    "raw relative embeddings": {"norm_rel_ebd": "none", "initializer_range": 0.5},
    "separate position projections": {
        "share_att_key": False,
        "norm_rel_ebd": "none",
        "initializer_range": 0.5,
    },
    # DeBERTa-v2-xlarge's layout: convolution, absolute positions, token types, head size
    # set in the config, content-to-position only.
    "v2 xlarge layout": {
        "conv_kernel_size": 3,
        "position_biased_input": True,
        "type_vocab_size": 2,
        "attention_head_size": 8,
        "pos_att_type": ["c2p"],
    },
    # The masked-LM head DeBERTa-v3 checkpoints were trained with.
    "lm_predictions head": {"legacy": False},
}


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    """The family's tiny config replaced by a variant, for the checks of test_families."""
    monkeypatch.setitem(TINY, FAMILY, tiny_config(FAMILY, **VARIANTS[request.param]))


@pytest.mark.parametrize("head", sorted(test_families.AUTO))
def test_variants_masked_equal_compacted_and_export_to_stock(variant, head, tmp_path):
    test_families.test_masked_and_compacted_models_agree_through_a_cubic_schedule(FAMILY, head)
    test_families.test_compacted_export_loads_with_stock_auto_classes(FAMILY, head, tmp_path)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"embedding_size": 16}, "embedding_size=16"),
        ({"pooler_hidden_size": 16}, "pooler_hidden_size=16"),
        ({"conv_kernel_size": 3, "conv_groups": 2}, "conv_groups=2"),
        ({"attention_head_size": 16}, "4 heads of 16"),
    ],
)
def test_variants_the_rules_do_not_describe_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        family_of(tiny_config(FAMILY, **overrides))


def test_compaction_keeps_the_head_size_and_narrows_the_pooler():
    model = test_families.build(FAMILY, "sequence_classification", attention_head_size=8)
    pruner, _ = list(test_families.schedule(model))[-1]
    config = compacted_copy(model, pruner.masks).config
    assert type(config) is DebertaV2Config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (16, 2, 32)
    assert (config.attention_head_size, config.pooler_hidden_size) == (8, 16)
    assert (config.position_buckets, config.max_relative_positions) == (4, 16)


@pytest.mark.parametrize("legacy", [True, False])
def test_mlm_head_gives_the_models_logits(legacy):
    model = test_families.build(FAMILY, "masked_lm", legacy=legacy)
    batch = test_families.inputs()
    head = family_of(model.config).mlm_head(model)
    hidden = model.base_model(**batch).last_hidden_state
    assert torch.equal(head(hidden), model(**batch).logits)


def test_returned_attentions_are_after_dropout():
    """Why DeBERTa needs hooks to give HomoDistil its attention before dropout: in train
    mode the stock model returns the dropped probabilities (rows no longer sum to 1), in
    eval mode the softmax."""
    model = test_families.build(
        FAMILY, "masked_lm", attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0
    )
    batch = test_families.inputs()
    rows = model(**batch, output_attentions=True).attentions[0].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    torch.manual_seed(0)
    rows = model.train()(**batch, output_attentions=True).attentions[0].sum(-1)
    assert (rows - 1).abs().max() > 0.1


def test_homodistil_student_attention_is_read_before_dropout():
    check_pre_dropout_attention(TINY[FAMILY])


@pytest.fixture(scope="module")
def deberta_teacher(tmp_path_factory):
    """A tiny random DeBERTa-v3 masked-LM over the fixture tokenizer, and a corpus."""
    root = tmp_path_factory.mktemp("deberta")
    tokenizer = write_tokenizer(root / "teacher")
    torch.manual_seed(0)
    config = tiny_config(FAMILY, vocab_size=len(tokenizer), num_hidden_layers=2)
    DebertaV2ForMaskedLM(config).save_pretrained(root / "teacher")
    return {"teacher": root / "teacher", "corpus": write_corpus(root / "corpus")}


def homodistil_overrides(data, tmp_path) -> list[str]:
    return [
        *QUIET_CPU_RUN,
        "method=homodistil",
        "model=pruned",
        "model.target.hidden_size=16",
        "model.target.num_attention_heads=2",
        "model.target.intermediate_size=32",
        "teacher=local",
        f"teacher.path={data['teacher']}",
        "task=corpus/local",
        f"task.files=[{data['corpus']}/*.txt]",
        "task.max_seq_length=16",
        "task.batch_size=8",
        "task.max_train_samples=32",
        "task.cache_dir=null",
        f"run_dir={tmp_path / 'run'}",
    ]


def test_homodistil_with_every_term_prunes_and_exports_a_stock_deberta(deberta_teacher, tmp_path):
    overrides = homodistil_overrides(deberta_teacher, tmp_path)
    cfg = compose([*overrides, "trainer.max_epochs=1"])
    metrics = kdlab.train.run(cfg)
    assert math.isfinite(metrics["student"]["val/loss"])
    with open(next((tmp_path / "run").glob("csv/**/metrics.csv"))) as f:
        columns = set(next(csv.reader(f)))
    assert {f"train/{term}" for term in ("mlm", "kl", "hidden", "emb", "attn")} <= columns
    c = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student").config
    assert type(c) is DebertaV2Config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)
    assert c.pooler_hidden_size == 16
