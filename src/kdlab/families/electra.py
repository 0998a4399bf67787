"""ELECTRA (``electra``): BERT's post-LayerNorm encoder behind an embedding that may be
factorised, with a generator masked-LM head and a RoBERTa-style classification head.

- Factorised embedding (``embedding_size`` E ≠ ``hidden_size`` H, e.g. ELECTRA-small's 128
  and 256): word, position and token-type embeddings and their LayerNorm live in the
  E-dim embedding space, which is not pruned; ``embeddings_project`` (E → H) writes the
  residual stream, so its output rows are hidden dims. No LayerNorm follows it (the first
  layer reads it directly), so its output is masked: pruned dims are exactly zero and the
  first layer's projections and residual read nothing there. ``hidden_states[0]`` is that
  projected (masked) embedding.
- Unfactorised embedding (E = H, ELECTRA-base and -large): no projection; the embeddings
  and their LayerNorm are in the hidden space and pruned like BERT's, and
  ``hidden_states[0]`` is the embeddings' LayerNorm output. :meth:`Electra.compact_config`
  keeps E = H.
- Encoder: BERT's (:func:`kdlab.families.bert.encoder_rules`).
- Generator masked-LM head: ``generator_predictions.dense`` (H → E), gelu, a LayerNorm over
  E, then ``generator_lm_head`` (E → vocabulary) tied to the word embeddings. It reads the
  hidden space (``dense``'s columns are pruned) and writes the embedding space: factorised,
  nothing after ``dense`` is pruned; unfactorised, E is the hidden space, so ``dense``'s
  rows, the LayerNorm (masked) and ``generator_lm_head``'s columns (those of the tied word
  embeddings) are pruned too.
- Classification head: ``classifier.dense``, gelu, ``classifier.out_proj``, masked at
  ``dense``'s output as RoBERTa's (:func:`kdlab.families.roberta.classification_head_sites`).
  ELECTRA's base model has no pooler.

A factorised model cannot be compacted to H = E: a stock ``ElectraConfig`` with
``embedding_size == hidden_size`` has no ``embeddings_project``, so the stock class would
drop the projection (which the LayerNorm before it prevents from being folded anywhere).

Attention runs through ``AttentionInterface``.
"""

from collections.abc import Callable, Iterator

from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.families import Axis, Family, MaskSite
from kdlab.families.bert import (
    HIDDEN_BOTH,
    HIDDEN_IN,
    HIDDEN_OUT,
    check_self_attention_only,
    encoder_rules,
    encoder_sites,
)
from kdlab.families.roberta import classification_head_sites


def factorised(config: PretrainedConfig) -> bool:
    """Whether the embeddings are E-dim and projected to the hidden size."""
    return config.embedding_size != config.hidden_size


class Electra(Family):
    model_types = ("electra",)

    def check(self, config: PretrainedConfig) -> None:
        super().check(config)
        check_self_attention_only(config)

    def compact_config(self, config: PretrainedConfig, hidden: int, heads: int, ffn: int) -> None:
        """Also keep ``embedding_size`` equal to the hidden size of an unfactorised model.

        Raises:
            ConfigError: for a factorised model compacted to its embedding size.
        """
        if not factorised(config):
            config.embedding_size = hidden
        elif hidden == config.embedding_size:
            raise ConfigError(
                f"An electra with embedding_size {config.embedding_size} projected to "
                f"hidden_size {config.hidden_size} cannot be compacted to hidden size "
                f"{hidden}: a stock ElectraConfig with embedding_size == hidden_size has no "
                "embeddings_project. Prune to another hidden size (model.target.hidden_size "
                "and model.target.num_attention_heads)."
            )
        super().compact_config(config, hidden, heads, ffn)

    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        if factorised(config):
            embeddings = [
                (r"embeddings_project\.(weight|bias)$", HIDDEN_OUT),
                (r"generator_predictions\.dense\.weight$", HIDDEN_IN),
            ]
        else:
            embeddings = [
                (r"embeddings\.(word|position|token_type)_embeddings\.weight$", HIDDEN_IN),
                (r"generator_predictions\.dense\.weight$", HIDDEN_BOTH),
                (r"generator_predictions\.dense\.bias$", HIDDEN_OUT),
                (r"generator_lm_head\.weight$", HIDDEN_IN),
            ]
        return [
            *embeddings,
            *encoder_rules(),
            (r"classifier\.dense\.weight$", HIDDEN_BOTH),
            (r"classifier\.dense\.bias$", HIDDEN_OUT),
            (r"(classifier(\.out_proj)?|qa_outputs)\.weight$", HIDDEN_IN),
        ]

    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        electra = model.base_model
        if factorised(model.config):
            yield MaskSite(electra.embeddings_project, "hidden")
        yield from encoder_sites(electra.encoder.layer)
        yield from classification_head_sites(model)

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        if not hasattr(model, "generator_predictions"):
            return None
        return lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))


FAMILY = Electra()
