"""DeBERTa-v2 and -v3 (``deberta-v2``): disentangled attention over relative positions.

The layers are BERT's (post-LayerNorm, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) with the projections named ``query_proj``, ``key_proj``, ``value_proj``.
What is special:

- Relative position embeddings ``encoder.rel_embeddings`` ``[2·buckets, H]`` live in the
  hidden space. Their weight is read directly (no forward call, so no hook fires on it),
  normalised by ``encoder.LayerNorm`` when ``norm_rel_ebd`` has ``layer_norm`` (v3), and
  projected into every layer's heads: by ``query_proj``/``key_proj`` with
  ``share_att_key`` (v3), by ``pos_query_proj``/``pos_key_proj`` without it. With the
  LayerNorm, the masked LayerNorm already writes zeros on pruned dimensions. Without it,
  the raw weight reaches the projections, so their input is multiplied by the hidden mask
  (a no-op for the residual stream, already zero there): either way a projection reads
  exactly what the compacted one does.
- The head size may be set in the config (``attention_head_size``); compaction keeps it,
  and the model is pruned only when hidden = heads × head size (:meth:`Family.check`).
- Sequence classification pools through ``pooler.dense`` (``ContextPooler``, width
  ``pooler_hidden_size``, which must be the hidden size), on the task model rather than
  the base model; its output is masked, since no LayerNorm follows it.
- Optional ``encoder.conv`` (``conv_kernel_size > 0``, DeBERTa-v2-xlarge): a 1-D
  convolution from the hidden space to the hidden space added before a LayerNorm, so its
  pruned output channels are never read; grouped convolutions are refused.
- The masked-LM head is ``cls.predictions`` (``legacy=True``, the config's default: a
  BERT-like transform and a decoder tied to the word embeddings) or ``lm_predictions``
  (``legacy=False``, the head DeBERTa-v3 checkpoints were trained with: a transform then
  the word embeddings' transpose).

Every residual-stream tensor passes a LayerNorm before anything reads it, so pruned hidden
dimensions are exactly zero there. ``hidden_states[0]`` is the embedding output:
LayerNorm(word (+ absolute position when ``position_biased_input``) (+ token type)
embeddings) times the attention mask, so padding rows are zero. DeBERTa-v3 adds no
absolute positions (``position_biased_input=False``): positions enter only through the
relative attention.

Attention: ``DisentangledSelfAttention`` is DeBERTa's own module, not ``transformers``'
``AttentionInterface``, and it returns the probabilities *after* attention dropout. Its
dropout is a module (``attention.self.dropout``) that receives the softmax ``[B, A, T, S]``:
a pre-hook keeps that input and a hook on the attention returns it in place of the dropped
probabilities (:meth:`DebertaV2.attentions_before_dropout`), so HomoDistil's attention term
reads the same probabilities as for the other families while the values are still mixed
with the dropped ones.
"""

from collections.abc import Callable, Iterator

from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.families import LAYER, Axis, Family, MaskSite
from kdlab.families.bert import HIDDEN_BOTH, HIDDEN_IN, HIDDEN_OUT, encoder_rules, encoder_sites


class DebertaV2(Family):
    model_types = ("deberta-v2",)

    def check(self, config: PretrainedConfig) -> None:
        super().check(config)
        hidden = config.hidden_size
        refused = []
        if getattr(config, "embedding_size", hidden) != hidden:
            refused.append(f"embedding_size={config.embedding_size}")
        if config.pooler_hidden_size != hidden:
            refused.append(f"pooler_hidden_size={config.pooler_hidden_size}")
        if getattr(config, "conv_kernel_size", 0) > 0 and getattr(config, "conv_groups", 1) != 1:
            refused.append(f"conv_groups={config.conv_groups}")
        if refused:
            raise ConfigError(
                f"A deberta-v2 model with {', '.join(refused)} and hidden size {hidden} cannot "
                "be pruned: kdlab's DeBERTa rules describe word embeddings and a pooler as wide "
                "as the hidden size, and an ungrouped convolution (conv_groups=1)."
            )

    def attentions_before_dropout(self, model: PreTrainedModel, implementation: str) -> None:
        for layer in model.base_model.encoder.layer:
            attention = layer.attention.self
            kept = _SoftmaxBeforeDropout()
            attention.dropout.register_forward_pre_hook(kept.keep)
            attention.register_forward_hook(kept.returned)

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(
            config, "attention_head_size", config.hidden_size // config.num_attention_heads
        )

    def compact_config(self, config: PretrainedConfig, hidden: int, heads: int, ffn: int) -> None:
        super().compact_config(config, hidden, heads, ffn)
        config.pooler_hidden_size = hidden
        if hasattr(config, "embedding_size"):  # equal to the hidden size (check)
            config.embedding_size = hidden

    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        projection = r"encoder\.layer\." + LAYER + r"\.attention\.self\.\w+_proj\."
        return [
            (r"embeddings\.(word|position|token_type)_embeddings\.weight$", HIDDEN_IN),
            (r"encoder\.rel_embeddings\.weight$", HIDDEN_IN),
            (projection + r"weight$", (Axis(0, "heads"), *HIDDEN_IN)),
            (projection + r"bias$", (Axis(0, "heads"),)),
            # BERT's query/key/value names match nothing here; the rest is BERT's layer.
            *encoder_rules(),
            (r"encoder\.conv\.conv\.weight$", HIDDEN_BOTH),  # [H, H, kernel]
            (r"encoder\.conv\.conv\.bias$", HIDDEN_OUT),
            (r"(pooler|predictions\.transform|lm_head)\.dense\.weight$", HIDDEN_BOTH),
            (r"(pooler|predictions\.transform|lm_head)\.dense\.bias$", HIDDEN_OUT),
            (r"(predictions\.decoder|classifier|qa_outputs)\.weight$", HIDDEN_IN),
        ]

    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        encoder = model.base_model.encoder
        yield from encoder_sites(encoder.layer)
        if encoder.relative_attention and "layer_norm" not in encoder.norm_rel_ebd:
            # The raw relative embeddings reach these projections (module docstring).
            for layer in encoder.layer:
                attention = layer.attention.self
                shared = ("query_proj", "key_proj")
                readers = shared if attention.share_att_key else ("pos_query_proj", "pos_key_proj")
                for name in readers:
                    if hasattr(attention, name):  # only the terms pos_att_type names
                        yield MaskSite(getattr(attention, name), "hidden", side="input")
        if getattr(model, "pooler", None) is not None:
            yield MaskSite(model.pooler, "hidden")

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        if hasattr(model, "lm_predictions"):
            embeddings = model.base_model.embeddings.word_embeddings
            return lambda hidden: model.lm_predictions(hidden, embeddings)
        return getattr(model, "cls", None)


class _SoftmaxBeforeDropout:
    """Hooks of one attention layer: keep the probabilities its dropout receives, and return
    them instead of the dropped ones."""

    def __init__(self) -> None:
        self.probabilities: Tensor | None = None

    def keep(self, module, args) -> None:
        self.probabilities = args[0]

    def returned(self, module, args, output):
        context, dropped = output
        kept, self.probabilities = self.probabilities, None
        return output if dropped is None else (context, kept)


FAMILY = DebertaV2()
