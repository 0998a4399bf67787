"""Tiny random configs of every model family kdlab supports, built from ``transformers``
configs (no hub): the tests of :mod:`kdlab.families` and of every method run over these;
and checks the family tests share.

A family module under ``src/kdlab/families/`` adds its config here; ``test_families``
fails for a family without one.
"""

import copy

import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    DebertaV2Config,
    ElectraConfig,
    ModernBertConfig,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
)

from kdlab.families import FAMILIES
from kdlab.losses import IGNORE_INDEX
from kdlab.methods.homodistil import HomoDistil
from kdlab.models.heads import forward
from kdlab.optim import Optim
from kdlab.pruning import Pruner

# hidden 32 = 4 heads of 8, FFN 64, 3 layers, 64 positions, 40 tokens (ids 0-4 special).
SHAPE = dict(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)

TINY: dict[str, PretrainedConfig] = {
    "bert": BertConfig(**SHAPE),
    # Bias-free (the stock defaults, but the decoder's), special ids inside the vocabulary,
    # layers global, local (8-token window, shorter than the tests' 12), global.
    "modernbert": ModernBertConfig(
        **SHAPE,
        bos_token_id=1,
        cls_token_id=1,
        eos_token_id=2,
        sep_token_id=2,
        local_attention=8,
        global_attn_every_n_layers=2,
    ),
    # RoBERTa's special ids and one token type; position ids start after the padding
    # index, so 66 rows hold 64 positions.
    "roberta": RobertaConfig(
        **{**SHAPE, "max_position_embeddings": 66, "pad_token_id": 1},
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    ),
    # Factorised: 12-dim embeddings projected to hidden 32. Not a multiple of the head size,
    # so no point of the schedule compacts to hidden = embedding size (which is refused).
    "electra": ElectraConfig(**SHAPE, embedding_size=12),
    # DeBERTa-v3's layout: relative positions only (4 log buckets each way over 16), both
    # disentangled terms through the shared query/key projections, normalised relative
    # embeddings, no token types.
    "deberta-v2": DebertaV2Config(
        **SHAPE,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=4,
        max_relative_positions=16,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        type_vocab_size=0,
    ),
}

# The shape every family is pruned to in the tests: half of each structure.
TARGET = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A fresh copy of the family's tiny config, with ``overrides`` set."""
    config = TINY[family].__class__.from_dict({**TINY[family].to_dict(), **overrides})
    return config


def fitted_to(tokenizer, config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with the tokenizer's vocabulary size and special-token ids (those the
    config has: BERT's cls/sep/mask, RoBERTa's bos/eos, ModernBERT's all of them)."""
    ids = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "bos": tokenizer.cls_token_id,
        "eos": tokenizer.sep_token_id,
    }
    overrides = {f"{k}_token_id": v for k, v in ids.items() if hasattr(config, f"{k}_token_id")}
    fitted = config.__class__.from_dict({**config.to_dict(), **overrides})
    fitted.vocab_size = len(tokenizer)
    return fitted


def check_pre_dropout_attention(config: PretrainedConfig) -> None:
    """HomoDistil's student of a family returns its attention probabilities before dropout.

    A masked-LM of ``config`` with attention dropout only (0.5; hidden dropout 0) is the
    teacher, its copy the pruned student. In train mode the student's maps are
    distributions (rows sum to 1), the first layer's (whose input no dropout touches) equal
    eval mode's exactly, and dropout still mixes the values; the teacher's stock eager
    attention returns the dropped maps, whose rows do not sum to 1.
    """
    config = config.__class__.from_dict(
        {
            **config.to_dict(),
            "attention_probs_dropout_prob": 0.5,
            "hidden_dropout_prob": 0.0,
            "attn_implementation": "eager",
        }
    )
    torch.manual_seed(0)
    teacher = AutoModelForMaskedLM.from_config(config)
    student = copy.deepcopy(teacher)
    Pruner(student, target=TARGET)  # HomoDistil needs a pruned student
    HomoDistil(
        name="homodistil",
        student=student,
        teacher=teacher,
        head="masked_lm",
        split_metrics={},
        optim=Optim(),
    )
    batch = {
        "input_ids": torch.randint(5, config.vocab_size, (2, 10)),
        "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4]),
    }
    student.train(), teacher.train()
    trained = student(**batch, output_attentions=True)
    dropped = teacher(**batch, output_attentions=True).attentions[0]
    student.eval()
    evaluated = student(**batch, output_attentions=True)
    for attention in trained.attentions:  # [B, A, T, S]
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        assert attention[1, :, :6, 6:].abs().max() == 0  # real queries never attend padding
    torch.testing.assert_close(trained.attentions[0], evaluated.attentions[0], rtol=0, atol=0)
    assert not torch.allclose(trained.logits, evaluated.logits)
    assert not torch.allclose(dropped.sum(-1), torch.ones(dropped.shape[:-1]))


def check_mlm_head(model: PreTrainedModel) -> None:
    """The family's separable masked-LM head gives the whole model's logits at the graded
    positions (:func:`kdlab.models.heads.forward`'s fast path)."""
    assert FAMILIES[model.config.model_type].mlm_head(model) is not None
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(5, model.config.vocab_size, (2, 10), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, [1, 4]], labels[1, 7] = input_ids[0, [1, 4]], input_ids[1, 7]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    model.eval()
    fast = forward(model, {**batch, "labels": labels}, "masked_lm").logits  # [3, V]
    whole = model(**batch).logits[labels != IGNORE_INDEX]
    assert fast.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(fast, whole)  # float rounding: other matmul shapes
