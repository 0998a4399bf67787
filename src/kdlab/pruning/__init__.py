"""Structured pruning of BERT encoders: PLATON importance, cubic/one-shot schedules, masks
applied in the forward pass, and compaction to a smaller stock ``BertConfig`` model."""

from kdlab.pruning.compaction import compacted_copy, compacted_parameter_count
from kdlab.pruning.masks import StructuredMasks
from kdlab.pruning.pruner import Pruner

__all__ = ["Pruner", "StructuredMasks", "compacted_copy", "compacted_parameter_count"]
