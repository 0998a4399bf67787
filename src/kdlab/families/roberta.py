"""RoBERTa (``roberta``, and ``xlm-roberta`` and ``camembert``, which are RoBERTa's modules
under other class names): BERT's post-LayerNorm encoder with other heads.

- Embeddings: as BERT's, except that position ids start after the padding index (a
  sequence's first token reads row ``pad_token_id + 1``; released checkpoints have 514 rows
  for 512 tokens). The rows are positions, not hidden dims: only their columns are pruned,
  so the compacted table keeps the offset. ``hidden_states[0]`` is the embeddings'
  LayerNorm output, zero on pruned dims.
- Encoder: BERT's (:func:`kdlab.families.bert.encoder_rules`); every residual-stream tensor
  passes a LayerNorm before anything reads it.
- Classification head: ``classifier.dense`` (hidden → hidden), tanh, ``classifier.out_proj``.
  No LayerNorm follows ``dense``, and tanh of a pruned dim's pre-activation is not zero,
  so ``dense``'s output is masked: ``out_proj`` would read it where the compacted head has
  no column. The pooler of ``RobertaModel`` (the base model alone) is masked for the same
  reason.
- Masked-LM head ``lm_head``: ``dense``, gelu, ``layer_norm`` over the hidden width (masked
  like every such LayerNorm, so ``decoder`` reads zeros on pruned dims), ``decoder`` tied to
  the word embeddings, and a vocabulary bias with no pruned axis.

Attention runs through ``AttentionInterface``.
"""

from collections.abc import Callable, Iterator

from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.families import Axis, MaskSite
from kdlab.families.bert import (
    HIDDEN_BOTH,
    HIDDEN_IN,
    HIDDEN_OUT,
    Bert,
    check_self_attention_only,
    encoder_rules,
)


def classification_head_sites(model: PreTrainedModel) -> Iterator[MaskSite]:
    """The output of a ``dense`` → activation → ``out_proj`` classification head's
    ``dense`` (RoBERTa's and ELECTRA's), where no LayerNorm zeroes pruned dims."""
    dense = getattr(getattr(model, "classifier", None), "dense", None)
    if dense is not None:
        yield MaskSite(dense, "hidden")


class Roberta(Bert):
    """BERT's layers and pooler under other head names, plus the classification head's
    ``dense`` output masked."""

    model_types = ("roberta", "xlm-roberta", "camembert")

    def check(self, config: PretrainedConfig) -> None:
        super().check(config)
        check_self_attention_only(config)

    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        return [
            (r"embeddings\.(word|position|token_type)_embeddings\.weight$", HIDDEN_IN),
            *encoder_rules(),
            (r"(pooler|classifier|lm_head)\.dense\.weight$", HIDDEN_BOTH),
            (r"(pooler|classifier|lm_head)\.dense\.bias$", HIDDEN_OUT),
            (r"(lm_head\.decoder|classifier(\.out_proj)?|qa_outputs)\.weight$", HIDDEN_IN),
        ]

    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        yield from super().mask_sites(model)
        yield from classification_head_sites(model)

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        return getattr(model, "lm_head", None)


FAMILY = Roberta()
