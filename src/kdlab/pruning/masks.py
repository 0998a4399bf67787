"""Structured masks of a transformer encoder, applied in the forward pass.

Three kinds of structure, chosen so that the pruned model is again its family's stock
config (:mod:`kdlab.families`):

- ``hidden``: dimensions of the residual stream, one mask shared by the embeddings, every
  layer's projections and LayerNorms, the pooler and the task heads;
- ``heads``: whole attention heads, ``[layers, heads]``, the same count kept in every layer;
- ``ffn``: intermediate (FFN) neurons, ``[layers, intermediate]``, same count per layer.

Every LayerNorm over the hidden width normalises over the kept dimensions only and writes
zeros elsewhere; pruned heads and FFN neurons are zeroed where a projection reads them, and
a projection's pruned hidden outputs where no LayerNorm follows (the family's mask sites).
The masked model therefore computes exactly what its compacted copy
(``kdlab.pruning.compaction``) computes.

Which axes of which parameters belong to a structure is the family's
(:meth:`kdlab.families.Family.parameter_axes`); the importance sums, compaction and the
parameter count all read it from :attr:`StructuredMasks.axes`.
"""

import copy
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.families import Family, MaskSite, PrunedAxis, family_of
from kdlab.validation import PositiveInt

# The mask buffers of StructuredMasks.
_KINDS = ("hidden", "heads", "ffn")


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
            size (a compacted model has hidden = heads × head size), exceeds its shape,
            or is a shape its family's stock config cannot express
            (:meth:`~kdlab.families.Family.compact_config` refuses it).
    """
    if target is None:
        raise ConfigError(NO_TARGET)
    hidden, heads, ffn = (
        int(target[k]) for k in ("hidden_size", "num_attention_heads", "intermediate_size")
    )
    family = family_of(config)
    full = family.shape(config)
    head_dim = full["head_dim"]
    shape = f"hidden {full['hidden']}, {full['heads']} heads of {head_dim}, FFN {full['ffn']}"
    if hidden != heads * head_dim:
        fits = (
            f"model.target.num_attention_heads={hidden // head_dim}"
            if hidden % head_dim == 0
            else ""
        )
        raise ConfigError(
            f"model.target.hidden_size={hidden} must equal model.target.num_attention_heads="
            f"{heads} × the model's head size {head_dim} (the model: {shape}; a compacted "
            "model keeps the head size)" + (f": for this model use {fits}." if fits else ".")
        )
    if not (heads <= full["heads"] and ffn <= full["ffn"]):
        raise ConfigError(
            f"model.target (hidden {hidden}, {heads} heads, FFN {ffn}) must be at most the "
            f"model's shape ({shape})."
        )
    # The family's stock config may not express every such shape (its compact_config says).
    family.compact_config(copy.deepcopy(config), hidden, heads, ffn)
    return {"heads": heads, "ffn": ffn}


class StructuredMasks(nn.Module):
    """0/1 masks of one encoder, kept as buffers so checkpoints carry them.

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
        head_dim: size of each head (default hidden / heads).

    Attributes:
        family: the model's family (None for masks built from sizes alone).
        axes: the pruned axes of every parameter of the model (empty without one).
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim or hidden_size // num_heads
        self.family: Family | None = None
        self.axes: dict[str, tuple[PrunedAxis, ...]] = {}
        fp32 = {"dtype": torch.float32}
        self.register_buffer("hidden", torch.ones(hidden_size, **fp32))
        self.register_buffer("heads", torch.ones(num_layers, num_heads, **fp32))
        self.register_buffer("ffn", torch.ones(num_layers, intermediate_size, **fp32))
        self.refresh()

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> "StructuredMasks":
        """Masks sized for ``model.config``, with its family's parameter axes.

        Raises:
            ConfigError: for a model of a family kdlab cannot prune.
        """
        family = family_of(model.config)
        shape = family.shape(model.config)
        masks = cls(
            shape["layers"], shape["hidden"], shape["heads"], shape["ffn"], shape["head_dim"]
        )
        masks.family = family
        masks.axes = family.parameter_axes(model)
        return masks

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

    def kept_indices(self, kind: str, layer: int | None = None, blocks: int = 1) -> Tensor:
        """Indices kept along an axis of that kind (head indices expanded to their dims),
        on the masks' device (cached); an axis of ``blocks`` stacked copies keeps them in
        every copy."""
        kept = self._kept[kind, None if kind == "hidden" else layer]
        if blocks == 1:
            return kept
        size = self.vector(kind, layer).numel()
        return torch.cat([kept + b * size for b in range(blocks)])

    def vector(self, kind: str, layer: int | None = None) -> Tensor:
        """The 0/1 mask over one axis of that kind: ``[H]``, ``[A·d]`` or ``[I]``."""
        if kind == "hidden":
            return self.hidden
        if kind == "heads":
            return self.heads[layer].repeat_interleave(self.head_dim)
        return self.ffn[layer]

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
        same state-dict keys); hooks at the family's mask sites zero pruned heads, FFN
        neurons and hidden outputs.
        """
        _masks_ref(model, self)
        hidden = self.hidden.numel()
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.LayerNorm and tuple(child.normalized_shape) == (hidden,):
                    setattr(parent, child_name, MaskedLayerNorm.wrap(child, self))
        for site in (self.family or family_of(model.config)).mask_sites(model):
            hook = _MaskHook(self, site)
            if site.side == "input":
                site.module.register_forward_pre_hook(hook)
            else:
                site.module.register_forward_hook(hook)


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
        masked = cls(norm.normalized_shape, eps=norm.eps, bias=norm.bias is not None, device="meta")
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
            None if self.bias is None else self.bias.index_select(0, keep),
            self.eps,
        )
        # The output dtype is layer_norm's, as for nn.LayerNorm: under CUDA autocast that is
        # fp32 for a bf16/fp16 input, so the zeros must be allocated after it, not from x.
        return kept.new_zeros(x.shape).index_copy(-1, keep, kept)


class _MaskHook:
    """A forward (pre-)hook multiplying a module's output (or first input) by one mask."""

    def __init__(self, masks: StructuredMasks, site: MaskSite) -> None:
        self.masks, self.kind, self.layer = masks, site.kind, site.layer

    def _masked(self, x: Tensor) -> Tensor:
        return x * self.masks.vector(self.kind, self.layer).to(x.dtype)

    def __call__(self, module, args, output=None):
        if output is None:  # a pre-hook: args are the inputs
            return (self._masked(args[0]), *args[1:])
        if isinstance(output, tuple):
            return (self._masked(output[0]), *output[1:])
        return self._masked(output)
