"""Compaction: a masked BERT becomes a physically smaller stock ``BertConfig`` model.

Every parameter is sliced along its pruned axes (:data:`kdlab.pruning.masks.RULES`) to the
kept indices; the new config has the kept hidden size, heads per layer (head size
unchanged) and FFN size, so ``AutoModelFor*.from_pretrained`` loads the result as it is.
"""

import copy
import math

import torch
from transformers import PreTrainedModel

from kdlab.pruning.masks import StructuredMasks, pruned_axes


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
        for axis, kind, _ in pruned_axes(name):
            shape[axis] = sizes[kind]
        total += math.prod(shape)
    return total


@torch.no_grad()
def compacted_copy(model: PreTrainedModel, masks: StructuredMasks) -> PreTrainedModel:
    """A new model of the same class holding only the kept structures of ``model`` (which
    is left as it is).

    Raises:
        ValueError: if the kept hidden size is not the kept heads times the head size
            (the shape a stock ``BertConfig`` requires).
    """
    counts = masks.counts()
    if counts["hidden"] != counts["heads"] * masks.head_dim:
        raise ValueError(
            f"Cannot compact to a stock BertConfig: {counts['hidden']} hidden dims but "
            f"{counts['heads']} heads of {masks.head_dim} dims."
        )
    config = copy.deepcopy(model.config)
    config.hidden_size = counts["hidden"]
    config.num_attention_heads = counts["heads"]
    config.intermediate_size = counts["ffn"]
    state = {}
    for name, tensor in model.state_dict().items():
        for axis, kind, layer in pruned_axes(name):
            index = masks.kept_indices(kind, layer).to(tensor.device)
            tensor = tensor.index_select(axis, index)
        state[name] = tensor.clone()
    compacted = type(model)(config)
    compacted.load_state_dict(state, strict=True)
    compacted.to(next(model.parameters()).device)
    return compacted.train(model.training)
