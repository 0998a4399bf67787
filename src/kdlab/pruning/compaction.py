"""Compaction: a masked model becomes a physically smaller model of its family's stock config.

Every parameter is sliced along its pruned axes (:attr:`StructuredMasks.axes`, from the
model's family) to the kept indices; the family writes the kept hidden size, heads per
layer (head size unchanged) and FFN size into a copy of the config, so
``AutoModelFor*.from_pretrained`` loads the result as it is.
"""

import copy
import math

import torch
from transformers import PreTrainedModel

from kdlab.pruning.masks import StructuredMasks


def _kept_sizes(masks: StructuredMasks) -> dict[str, int]:
    counts = masks.counts()
    return {
        "hidden": counts["hidden"],
        "heads": counts["heads"] * masks.head_dim,
        "ffn": counts["ffn"],
    }


def compacted_parameter_count(model: PreTrainedModel, masks: StructuredMasks) -> int:
    """Parameters :func:`compacted_copy` of ``model`` has (tied tensors counted once)."""
    sizes = _kept_sizes(masks)
    total = 0
    for name, param in model.named_parameters():
        shape = list(param.shape)
        for axis in masks.axes.get(name, ()):
            shape[axis.axis] = sizes[axis.kind] * axis.blocks
        total += math.prod(shape)
    return total


@torch.no_grad()
def compacted_copy(model: PreTrainedModel, masks: StructuredMasks) -> PreTrainedModel:
    """A new model of the same class holding only the kept structures of ``model`` (which
    is left as it is).

    Raises:
        ValueError: if the kept hidden size is not the kept heads times the head size
            (the shape every supported family's config requires).
        ConfigError: for a shape the family's stock config cannot express
            (:meth:`~kdlab.families.Family.compact_config`).
    """
    counts = masks.counts()
    if counts["hidden"] != counts["heads"] * masks.head_dim:
        raise ValueError(
            f"Cannot compact to a stock {type(model.config).__name__}: {counts['hidden']} "
            f"hidden dims but {counts['heads']} heads of {masks.head_dim} dims."
        )
    config = copy.deepcopy(model.config)
    masks.family.compact_config(config, counts["hidden"], counts["heads"], counts["ffn"])
    state = {}
    for name, tensor in model.state_dict().items():
        for axis in masks.axes.get(name, ()):
            index = masks.kept_indices(axis.kind, axis.layer, axis.blocks).to(tensor.device)
            tensor = tensor.index_select(axis.axis, index)
        state[name] = tensor.clone()
    compacted = type(model)(config)
    compacted.load_state_dict(state, strict=True)
    compacted.to(next(model.parameters()).device)
    return compacted.train(model.training)
