"""Model families: what kdlab must know of each ``transformers`` encoder architecture.

Pruning, the masked-LM fast path and HomoDistil's attention term are family-agnostic; each
reads the student's :class:`Family`, which says

- which axes of which parameters are hidden dimensions, attention heads and FFN neurons
  (:meth:`Family.rules`; LayerNorms over the hidden width are found by width, not name);
- where the masks meet the forward pass (:meth:`Family.mask_sites`): the input of the
  projection that reads the heads' context or the FFN neurons, and the output of a
  projection that writes into the hidden space where no LayerNorm follows;
- the family's stock config for a compacted shape (:meth:`Family.compact_config`);
- its masked-LM head, and how its attention probabilities are read before dropout.

One module per family in this package defines ``FAMILY``; every module here is found at
import, so adding a family is one file (and a tiny config in ``tests/families.py``).
"""

import importlib
import pkgutil
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlab.errors import ConfigError

Kind = Literal["hidden", "heads", "ffn"]


@dataclass(frozen=True)
class Axis:
    """A parameter axis that belongs to a structure.

    Args:
        axis: the tensor dimension.
        kind: ``hidden`` (residual-stream dimensions), ``heads`` (per-head dims, head-major)
            or ``ffn`` (intermediate neurons).
        blocks: the axis is ``blocks`` stacked copies of the structure's dimension: 3 for a
            fused query/key/value projection, 2 for a gated FFN's value and gate rows.
    """

    axis: int
    kind: Kind
    blocks: int = 1


@dataclass(frozen=True)
class PrunedAxis(Axis):
    """An :class:`Axis` of one parameter, with its layer (None for ``hidden``)."""

    layer: int | None = None


@dataclass(frozen=True)
class MaskSite:
    """Where a mask multiplies the forward pass.

    Args:
        module: the module whose input (``side="input"``) or output is masked.
        kind: which mask: ``hidden``, ``heads`` (expanded to the heads' dims) or ``ffn``.
        layer: the layer of a ``heads`` or ``ffn`` mask.
        side: ``input`` zeroes what a projection reads (pruned heads' context, pruned FFN
            neurons); ``output`` zeroes what it writes into pruned hidden dimensions.
    """

    module: nn.Module
    kind: Kind
    layer: int | None = None
    side: Literal["input", "output"] = "output"


# Per-layer rules match the layer index as the group named "layer".
LAYER = r"(?P<layer>\d+)"


class Family(ABC):
    """An encoder family. Subclasses set the class attributes and :meth:`rules`; the
    defaults fit configs with ``hidden_size``, ``num_attention_heads`` (head size
    hidden / heads), ``intermediate_size`` and ``num_hidden_layers``.

    Attributes:
        model_types: the ``config.model_type`` values this family covers.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    # ---------------------------------------------------------------- shape and config
    def check(self, config: PretrainedConfig) -> None:
        """Refuse a variant of the family that the rules do not describe (ConfigError);
        by default one whose hidden size is not its heads × their head size."""
        shape = self.shape(config)
        if shape["hidden"] != shape["heads"] * shape["head_dim"]:
            raise ConfigError(
                f"A {config.model_type} with hidden size {shape['hidden']} and "
                f"{shape['heads']} heads of {shape['head_dim']} cannot be pruned: kdlab's "
                "pruning keeps hidden = heads × head size."
            )

    def head_dim(self, config: PretrainedConfig) -> int:
        return config.hidden_size // config.num_attention_heads

    def shape(self, config: PretrainedConfig) -> dict[str, int]:
        """``layers``, ``hidden``, ``heads``, ``head_dim`` and ``ffn`` of a config."""
        return {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "head_dim": self.head_dim(config),
            "ffn": config.intermediate_size,
        }

    def compact_config(self, config: PretrainedConfig, hidden: int, heads: int, ffn: int) -> None:
        """Set the compacted shape on ``config`` (a copy), in the family's own fields.

        Raises:
            ConfigError: for a shape the family's stock config cannot express
                (:func:`kdlab.pruning.masks.check_target` asks before anything trains).
        """
        config.hidden_size = hidden
        config.num_attention_heads = heads
        config.intermediate_size = ffn

    # ------------------------------------------------------------------------ pruning
    @abstractmethod
    def rules(self, config: PretrainedConfig) -> list[tuple[str, tuple[Axis, ...]]]:
        """``(name pattern, axes)`` per parameter kind; the first match wins, unmatched
        parameters have no pruned axis. LayerNorms over the hidden width need no rule."""

    @abstractmethod
    def mask_sites(self, model: PreTrainedModel) -> Iterator[MaskSite]:
        """Where the masks meet ``model``'s forward pass (besides its LayerNorms)."""

    def parameter_axes(self, model: PreTrainedModel) -> dict[str, tuple[PrunedAxis, ...]]:
        """The pruned axes of every state-dict entry of ``model`` that has any."""
        compiled = [(re.compile(p), axes) for p, axes in self.rules(model.config)]
        hidden = model.config.hidden_size
        norms = {
            f"{name}.{p}"
            for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (hidden,)
            for p in ("weight", "bias")
        }
        found: dict[str, tuple[PrunedAxis, ...]] = {}
        for name in model.state_dict():
            if name in norms:
                found[name] = (PrunedAxis(0, "hidden"),)
                continue
            for pattern, axes in compiled:
                match = pattern.search(name)
                if match:
                    layer = match.groupdict().get("layer")
                    found[name] = tuple(
                        PrunedAxis(
                            a.axis,
                            a.kind,
                            a.blocks,
                            None if a.kind == "hidden" or layer is None else int(layer),
                        )
                        for a in axes
                    )
                    break
        return found

    # -------------------------------------------------------------------------- heads
    def attentions_before_dropout(self, model: PreTrainedModel, implementation: str) -> None:
        """Make ``model`` return its attention probabilities before attention dropout
        (``output_attentions``) while still mixing the values with the dropped ones.

        By default the family's attention runs through ``transformers``'
        ``AttentionInterface``, and ``implementation`` (registered there by HomoDistil)
        replaces it.
        """
        model.set_attn_implementation(implementation)

    def mlm_head(self, model: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
        """The masked-LM head of ``model`` as a map from final hidden states ``[N, H]`` to
        logits ``[N, V]``, or None when it cannot be run apart from the encoder."""
        return None


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        for model_type in family.model_types:
            found[model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def family_of(config: PretrainedConfig, key: str = "model.path") -> Family:
    """The family of a model config.

    Raises:
        ConfigError: for a model type no family covers, naming ``key``.
    """
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"{key} is a '{config.model_type}' model; kdlab prunes and compacts "
            f"{', '.join(sorted(FAMILIES))}. Add a family module under src/kdlab/families/."
        )
    family.check(config)
    return family
