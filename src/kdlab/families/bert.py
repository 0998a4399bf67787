"""BERT (``bert``): post-LayerNorm encoder layers, a pooler, ``cls`` masked-LM head.

Every residual-stream tensor passes a LayerNorm before anything reads it, so pruned hidden
dimensions need a mask only where no LayerNorm follows: the pooler's output.
"""

from collections.abc import Callable, Iterator

from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.families import LAYER, Axis, Family, MaskSite

HIDDEN_IN = (Axis(1, "hidden"),)
HIDDEN_BOTH = (Axis(0, "hidden"), Axis(1, "hidden"))
HIDDEN_OUT = (Axis(0, "hidden"),)


def encoder_rules(prefix: str = "") -> list[tuple[str, tuple[Axis, ...]]]:
    """The rules of a BERT-layout encoder (also RoBERTa's and ELECTRA's): query, key and
    value rows per head, the attention output and FFN projections."""
    layer = prefix + r"encoder\.layer\." + LAYER + r"\."
    return [
        (layer + r"attention\.self\.(query|key|value)\.weight$", (Axis(0, "heads"), *HIDDEN_IN)),
        (layer + r"attention\.self\.(query|key|value)\.bias$", (Axis(0, "heads"),)),
        (layer + r"attention\.output\.dense\.weight$", (*HIDDEN_OUT, Axis(1, "heads"))),
        (layer + r"intermediate\.dense\.weight$", (Axis(0, "ffn"), *HIDDEN_IN)),
        (layer + r"intermediate\.dense\.bias$", (Axis(0, "ffn"),)),
        (layer + r"output\.dense\.weight$", (*HIDDEN_OUT, Axis(1, "ffn"))),
        (layer + r"(attention\.)?output\.dense\.bias$", HIDDEN_OUT),
    ]


def check_self_attention_only(config: PretrainedConfig) -> None:
    """Refuse a BERT-layout decoder with cross-attention layers (ConfigError): the encoder
    rules describe self-attention only, so its ``crossattention`` projections would keep
    their full width."""
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(
            f"A {config.model_type} with cross-attention (add_cross_attention=True) cannot be "
            "pruned: kdlab prunes encoders with self-attention only."
        )


def encoder_sites(encoder_layers) -> Iterator[MaskSite]:
    """Pruned heads are zeroed where the attention output projection reads them, pruned
    FFN neurons where the FFN output projection reads them."""
    for i, layer in enumerate(encoder_layers):
        yield MaskSite(layer.attention.output.dense, "heads", i, "input")
        yield MaskSite(layer.output.dense, "ffn", i, "input")


class Bert(Family):
    model_types = ("bert",)

    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        return [
            (r"embeddings\.(word|position|token_type)_embeddings\.weight$", HIDDEN_IN),
            *encoder_rules(),
            (r"(pooler|predictions\.transform)\.dense\.weight$", HIDDEN_BOTH),
            (r"(pooler|predictions\.transform)\.dense\.bias$", HIDDEN_OUT),
            (r"(predictions\.decoder|classifier|qa_outputs)\.weight$", HIDDEN_IN),
        ]

    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        bert = model.base_model
        yield from encoder_sites(bert.encoder.layer)
        if getattr(bert, "pooler", None) is not None:
            yield MaskSite(bert.pooler, "hidden")

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        return getattr(model, "cls", None)


FAMILY = Bert()
