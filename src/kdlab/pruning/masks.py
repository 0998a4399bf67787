"""Structured masks of a BERT encoder, applied in the forward pass.

Three kinds of structure, chosen so that the pruned model is again a stock ``BertConfig``:

- ``hidden``: dimensions of the residual stream, one mask shared by the embeddings, every
  layer's projections and LayerNorms, the pooler and the task heads;
- ``heads``: whole attention heads, ``[layers, heads]``, the same count kept in every layer;
- ``ffn``: intermediate (FFN) neurons, ``[layers, intermediate]``, same count per layer.

A pruned hidden dimension is zero everywhere in the residual stream because every LayerNorm
normalises over the kept dimensions only and writes zeros elsewhere; pruned heads and FFN
neurons are zeroed before the projection that reads them. The masked model therefore
computes exactly what its compacted copy (``kdlab.pruning.compaction``) computes.

:data:`RULES` maps each BERT parameter name to the axes that belong to a structure; the
importance sums, compaction and the parameter count all read it.
"""

import re
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.validation import PositiveInt

# The mask buffers of StructuredMasks.
_KINDS = ("hidden", "heads", "ffn")

_LAYER = r"encoder\.layer\.(\d+)\."
# (name pattern, ((axis, kind), ...)); the first match wins. Kinds "heads" and "ffn" are per
# layer: the layer index is the pattern's first group. Unmatched parameters (output biases
# over labels or the vocabulary) have no pruned axis.
RULES: list[tuple[re.Pattern, tuple[tuple[int, str], ...]]] = [
    (re.compile(p), axes)
    for p, axes in (
        (r"embeddings\.(word|position|token_type)_embeddings\.weight$", ((1, "hidden"),)),
        (r"LayerNorm\.(weight|bias)$", ((0, "hidden"),)),
        (_LAYER + r"attention\.self\.(query|key|value)\.weight$", ((0, "heads"), (1, "hidden"))),
        (_LAYER + r"attention\.self\.(query|key|value)\.bias$", ((0, "heads"),)),
        (_LAYER + r"attention\.output\.dense\.weight$", ((0, "hidden"), (1, "heads"))),
        (_LAYER + r"intermediate\.dense\.weight$", ((0, "ffn"), (1, "hidden"))),
        (_LAYER + r"intermediate\.dense\.bias$", ((0, "ffn"),)),
        (_LAYER + r"output\.dense\.weight$", ((0, "hidden"), (1, "ffn"))),
        (r"output\.dense\.bias$", ((0, "hidden"),)),
        (r"(pooler|predictions\.transform)\.dense\.weight$", ((0, "hidden"), (1, "hidden"))),
        (r"(pooler|predictions\.transform)\.dense\.bias$", ((0, "hidden"),)),
        (r"(predictions\.decoder|classifier|qa_outputs)\.weight$", ((1, "hidden"),)),
    )
]


class PruneTarget(TypedDict):
    """The shape a pruned model ends with (``model.target``, read by ``pruning.target``)."""

    hidden_size: PositiveInt
    num_attention_heads: PositiveInt
    intermediate_size: PositiveInt


NO_TARGET = (
    "Pruning needs a target shape: pick a pruned preset (model=tiny|xsmall|small|base for a "
    "BERT-base teacher, model=minilm_half for MiniLM) or model=pruned with "
    "model.target.hidden_size, model.target.num_attention_heads and "
    "model.target.intermediate_size."
)


def check_target(config: PretrainedConfig, target: PruneTarget | None) -> dict[str, int]:
    """Heads and FFN neurons per layer that ``target`` keeps of a model with ``config``.

    Raises:
        ConfigError: without a target, or with one that does not keep the model's head
            size (a stock ``BertConfig`` has hidden = heads × head size) or exceeds its shape.
    """
    if target is None:
        raise ConfigError(NO_TARGET)
    hidden, heads, ffn = (
        int(target[k]) for k in ("hidden_size", "num_attention_heads", "intermediate_size")
    )
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads of {head_dim}, "
        f"FFN {config.intermediate_size}"
    )
    if hidden != heads * head_dim:
        fits = (
            f"model.target.num_attention_heads={hidden // head_dim}"
            if hidden % head_dim == 0
            else ""
        )
        raise ConfigError(
            f"model.target.hidden_size={hidden} must equal model.target.num_attention_heads="
            f"{heads} × the model's head size {head_dim} (the model: {shape}; a stock BertConfig "
            "keeps the head size)" + (f": for this model use {fits}." if fits else ".")
        )
    if not (heads <= config.num_attention_heads and ffn <= config.intermediate_size):
        raise ConfigError(
            f"model.target (hidden {hidden}, {heads} heads, FFN {ffn}) must be at most the "
            f"model's shape ({shape})."
        )
    return {"heads": heads, "ffn": ffn}


def pruned_axes(name: str) -> list[tuple[int, str, int | None]]:
    """``(axis, kind, layer)`` of every pruned axis of the parameter ``name``."""
    for pattern, axes in RULES:
        match = pattern.search(name)
        if match:
            layer = int(match.group(1)) if match.re.pattern.startswith(_LAYER) else None
            return [(axis, kind, layer if kind != "hidden" else None) for axis, kind in axes]
    return []


class StructuredMasks(nn.Module):
    """0/1 masks of one BERT encoder, kept as buffers so checkpoints carry them.

    The masks stay fp32 whatever the module is cast to (``bf16-true`` precision casts
    buffers): 0/1 values are exact in any dtype, but sums of them are not (2,999 ones sum
    to 2,992 in bf16), and the EMAs and scores built from them are fp32 too.

    The kept indices and counts are cached when the masks change, because ``nonzero()``
    makes the host wait for the device: the forward pass (every masked LayerNorm) reads the
    cache only. The cache is rebuilt on ``load_state_dict`` and on device moves; whoever
    writes into the mask buffers in place (:meth:`Pruner.update`, tests) calls
    :meth:`refresh` afterwards.

    Args:
        num_layers: encoder layers.
        hidden_size: width of the residual stream.
        num_heads: attention heads per layer.
        intermediate_size: FFN neurons per layer.
    """

    def __init__(
        self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int
    ) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        fp32 = {"dtype": torch.float32}
        self.register_buffer("hidden", torch.ones(hidden_size, **fp32))
        self.register_buffer("heads", torch.ones(num_layers, num_heads, **fp32))
        self.register_buffer("ffn", torch.ones(num_layers, intermediate_size, **fp32))
        self.refresh()

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> "StructuredMasks":
        """Masks sized for ``model.config`` (a BERT)."""
        c = model.config
        if c.model_type != "bert":
            raise ConfigError(
                f"Structured pruning supports BERT encoders; model.path is a '{c.model_type}'."
            )
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)

    # ------------------------------------------------------------------------- cache
    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the cached kept indices and counts from the mask buffers (and cast the
        buffers back to fp32 if something replaced them in another dtype)."""
        for kind in _KINDS:
            buffer = getattr(self, kind)
            if buffer.dtype != torch.float32:
                setattr(self, kind, buffer.float())
        if self.hidden.is_meta:  # shapes only (models built on the meta device)
            self._kept, self._counts = {}, {}
            return
        kept = self._kept_on_host()
        self._kept = {key: index.to(self.hidden.device) for key, index in kept.items()}
        # Integer counts, of the first layer: every layer keeps the same number.
        self._counts = {
            "hidden": kept["hidden", None].numel(),
            "heads": kept["heads", 0].numel() // self.head_dim,
            "ffn": kept["ffn", 0].numel(),
        }

    def _kept_on_host(self) -> dict[tuple[str, int | None], Tensor]:
        """Kept indices by ``(kind, layer)``, from one device→host copy of all masks (a
        single sync instead of one per ``nonzero`` on the device)."""
        buffers = [getattr(self, kind) for kind in _KINDS]
        flat = torch.cat([b.detach().flatten() for b in buffers]).cpu()
        parts = flat.split([b.numel() for b in buffers])
        hidden, heads, ffn = (part.view_as(b) for part, b in zip(parts, buffers, strict=True))
        kept = {("hidden", None): hidden.nonzero().squeeze(1)}
        offsets = torch.arange(self.head_dim)
        for layer in range(heads.size(0)):
            head_index = heads[layer].nonzero().squeeze(1)
            kept["heads", layer] = (head_index[:, None] * self.head_dim + offsets).flatten()
            kept["ffn", layer] = ffn[layer].nonzero().squeeze(1)
        return kept

    def counts(self) -> dict[str, int]:
        """Kept hidden dims, heads per layer and FFN neurons per layer (cached)."""
        return dict(self._counts)

    def kept_indices(self, kind: str, layer: int | None = None) -> Tensor:
        """Indices kept along an axis of that kind (head indices expanded to their dims),
        on the masks' device (cached)."""
        return self._kept[kind, None if kind == "hidden" else layer]

    def _apply(self, fn, recurse: bool = True):
        # Device moves and dtype casts both come through here: follow the device, stay
        # fp32 (refresh casts back), and rebuild the cache on the new device.
        super()._apply(fn, recurse)
        self.refresh()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()

    def install(self, model: PreTrainedModel) -> None:
        """Make ``model`` apply these masks in its forward pass.

        LayerNorms over the hidden size become :class:`MaskedLayerNorm` (same parameters,
        same state-dict keys); forward hooks zero pruned heads, FFN neurons and pooler dims.
        """
        _masks_ref(model, self)
        hidden = self.hidden.numel()
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.LayerNorm and tuple(child.normalized_shape) == (hidden,):
                    setattr(parent, child_name, MaskedLayerNorm.wrap(child, self))
        bert = model.base_model
        for i, layer in enumerate(bert.encoder.layer):
            layer.attention.self.register_forward_hook(_HeadMask(self, i))
            layer.intermediate.register_forward_hook(_FfnMask(self, i))
        if getattr(bert, "pooler", None) is not None:
            bert.pooler.register_forward_hook(_HiddenMask(self))


def installed_masks(model: nn.Module) -> StructuredMasks | None:
    """The masks :meth:`StructuredMasks.install` put into ``model``'s forward pass, if any."""
    return getattr(model, "_kdlab_masks", None)


def _masks_ref(module: nn.Module, masks: StructuredMasks) -> None:
    # A plain attribute, not a submodule: the masks belong to the training module (and its
    # checkpoints), not to the student's state dict that save_pretrained writes.
    object.__setattr__(module, "_kdlab_masks", masks)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the kept hidden dimensions only, zeros on the pruned ones.

    Statistics over all dimensions would differ from those of the compacted model, which
    only has the kept ones; normalising the kept slice keeps the two identical.
    """

    @classmethod
    def wrap(cls, norm: nn.LayerNorm, masks: StructuredMasks) -> "MaskedLayerNorm":
        masked = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=True)
        masked.weight, masked.bias = norm.weight, norm.bias
        _masks_ref(masked, masks)
        return masked

    def forward(self, x: Tensor) -> Tensor:
        masks = self._kdlab_masks
        count = masks.counts()["hidden"]
        if count == x.size(-1):
            return super().forward(x)
        keep = masks.kept_indices("hidden")
        kept = F.layer_norm(
            x.index_select(-1, keep),
            (count,),
            self.weight.index_select(0, keep),
            self.bias.index_select(0, keep),
            self.eps,
        )
        # The output dtype is layer_norm's, as for nn.LayerNorm: under CUDA autocast that is
        # fp32 for a bf16/fp16 input, so the zeros must be allocated after it, not from x.
        return kept.new_zeros(x.shape).index_copy(-1, keep, kept)


class _HeadMask:
    """Forward hook of a self-attention module: zero the context of pruned heads."""

    def __init__(self, masks: StructuredMasks, layer: int) -> None:
        self.masks, self.layer = masks, layer

    def __call__(self, module, args, output):
        context, *rest = output
        scale = self.masks.heads[self.layer].repeat_interleave(self.masks.head_dim)
        return (context * scale.to(context.dtype), *rest)


class _FfnMask:
    """Forward hook of an intermediate (FFN up-projection) module: zero pruned neurons."""

    def __init__(self, masks: StructuredMasks, layer: int) -> None:
        self.masks, self.layer = masks, layer

    def __call__(self, module, args, output):
        return output * self.masks.ffn[self.layer].to(output.dtype)


class _HiddenMask:
    """Forward hook of the pooler: its output lives in the (pruned) hidden space too."""

    def __init__(self, masks: StructuredMasks) -> None:
        self.masks = masks

    def __call__(self, module, args, output):
        return output * self.masks.hidden.to(output.dtype)
