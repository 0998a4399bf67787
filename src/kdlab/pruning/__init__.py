"""Structured pruning of transformer encoders: PLATON importance, cubic/one-shot schedules,
masks applied in the forward pass, and compaction to a smaller model of the family's stock
config (:mod:`kdlab.families`)."""

from kdlab.pruning.compaction import compacted_copy, compacted_parameter_count
from kdlab.pruning.masks import StructuredMasks
from kdlab.pruning.pruner import Pruner

__all__ = ["Pruner", "StructuredMasks", "compacted_copy", "compacted_parameter_count"]
