"""Tiny random configs of every model family kdlab supports, built from ``transformers``
configs (no hub): the tests of :mod:`kdlab.families` and of every method run over these.

A family module under ``src/kdlab/families/`` adds its config here; ``test_families``
fails for a family without one.
"""

from transformers import BertConfig, DebertaV2Config, PretrainedConfig

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
