"""ModernBERT (``modernbert``): pre-LayerNorm layers, fused QKV, gated FFN, rotary positions.

What differs from BERT, and where the masks go:

- **Pre-LayerNorm residual stream.** Each layer reads ``attn_norm(x)`` and ``mlp_norm(x)``
  and adds ``attn.Wo``'s and ``mlp.Wo``'s outputs to ``x`` unnormalised, so nothing would
  clear the pruned hidden dimensions those projections write into: both get a ``hidden``
  mask on their output. Layer 0's ``attn_norm`` is an ``Identity``: its attention reads the
  embeddings' output directly, which ``embeddings.norm`` (a :class:`MaskedLayerNorm`) has
  already zeroed on the pruned dimensions, so the pruned columns of ``Wqkv`` multiply zeros.
  Every other reader of the stream is a LayerNorm over the kept dimensions (``attn_norm``,
  ``mlp_norm``, ``final_norm``); the task heads read ``head.norm``'s output. Hence the
  residual stream is exactly zero on pruned dimensions at every layer, and the kept ones
  carry what the compacted model computes.
- **Fused attention.** ``attn.Wqkv``'s rows are query, key and value stacked, each
  head-major (``view(3, heads, head_dim)``): three blocks of the heads axis. Pruned heads'
  context is zeroed where ``attn.Wo`` reads it.
- **Gated FFN.** ``mlp.Wi``'s rows are ``chunk(2)``: the first half the value (``act`` is
  applied to it), the second half the gate, neuron ``i`` at row ``i`` of each; a neuron's
  two rows are pruned together (two blocks of the FFN axis), and ``act(value) * gate`` of a
  pruned neuron is zeroed where ``mlp.Wo`` reads it.
- **Rotary positions.** No position embedding: rotary frequencies follow the head size,
  which compaction keeps (only whole heads are removed), so they are unchanged.
- **Local/global attention.** ``layer_types`` (from ``global_attn_every_n_layers``), the
  window ``local_attention`` and the per-type ``rope_parameters`` do not depend on the
  pruned shape and are copied as they are.
- **Optional biases.** ``attention_bias``, ``mlp_bias``, ``norm_bias`` (every LayerNorm,
  :class:`MaskedLayerNorm` keeps ``bias=None``), ``classifier_bias`` (``head.dense``) and
  ``decoder_bias``: a rule covers each bias that exists; ``classifier`` always has one
  (over labels, not pruned).
- **Heads.** Every task model has ``head`` (dense, act, LayerNorm) before its
  ``classifier`` or ``decoder`` (tied to ``tok_embeddings``); there is no pooler. In
  ``transformers`` 5.25 there is no unpadding path (``reference_compile`` is dropped from
  the config): padding is handled by attention masks in every attention implementation.
  ``sparse_prediction`` only selects the labelled rows when ``labels`` are passed, which
  kdlab never does; :meth:`ModernBert.mlm_head` gives the same rows' logits.

HomoDistil: attention runs through ``AttentionInterface``, so the pre-dropout attention
applies (sliding layers get their window through the registered eager mask).
``hidden_states[0]`` is ``embeddings.norm(tok_embeddings(ids))`` (after embedding dropout;
no positions: rotary acts inside attention); ``hidden_states[1..L-1]`` are the
unnormalised residual stream after each layer, and ``hidden_states[L]`` is
``final_norm``'s output (``transformers`` ties the last one to ``last_hidden_state``).
"""

from collections.abc import Callable, Iterator

from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.families import LAYER, Axis, Family, MaskSite
from kdlab.families.bert import HIDDEN_BOTH, HIDDEN_IN, HIDDEN_OUT

QKV = Axis(0, "heads", blocks=3)
GATED = Axis(0, "ffn", blocks=2)


class ModernBert(Family):
    model_types = ("modernbert",)

    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        layer = r"layers\." + LAYER + r"\."
        return [
            (r"embeddings\.tok_embeddings\.weight$", HIDDEN_IN),
            (layer + r"attn\.Wqkv\.weight$", (QKV, *HIDDEN_IN)),
            (layer + r"attn\.Wqkv\.bias$", (QKV,)),
            (layer + r"attn\.Wo\.weight$", (*HIDDEN_OUT, Axis(1, "heads"))),
            (layer + r"mlp\.Wi\.weight$", (GATED, *HIDDEN_IN)),
            (layer + r"mlp\.Wi\.bias$", (GATED,)),
            (layer + r"mlp\.Wo\.weight$", (*HIDDEN_OUT, Axis(1, "ffn"))),
            (layer + r"(attn|mlp)\.Wo\.bias$", HIDDEN_OUT),
            (r"(^|\.)head\.dense\.weight$", HIDDEN_BOTH),
            (r"(^|\.)head\.dense\.bias$", HIDDEN_OUT),
            (r"(^|\.)(decoder|classifier)\.weight$", HIDDEN_IN),
        ]

    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        for i, layer in enumerate(model.base_model.layers):
            yield MaskSite(layer.attn.Wo, "heads", i, "input")
            yield MaskSite(layer.attn.Wo, "hidden")
            yield MaskSite(layer.mlp.Wo, "ffn", i, "input")
            yield MaskSite(layer.mlp.Wo, "hidden")

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        # Only ModernBertForMaskedLM has a decoder; its head is ``decoder(head(states))``.
        if getattr(model, "decoder", None) is None:
            return None
        return lambda states: model.decoder(model.head(states))


FAMILY = ModernBert()
