"""Tiny random configs of every model family kdlab supports, built from ``transformers``
configs (no hub): the tests of :mod:`kdlab.families` and of every method run over these.

A family module under ``src/kdlab/families/`` adds its config here; ``test_families``
fails for a family without one.
"""

from transformers import BertConfig, ElectraConfig, PretrainedConfig, RobertaConfig

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
}

# The shape every family is pruned to in the tests: half of each structure.
TARGET = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A fresh copy of the family's tiny config, with ``overrides`` set."""
    config = TINY[family].__class__.from_dict({**TINY[family].to_dict(), **overrides})
    return config
