"""Datamodules shared by every method. A datamodule knows nothing about methods."""

from kdlab.data.base import TokenizedDataModule
from kdlab.data.classification import (
    GlueDataModule,
    RottenTomatoesDataModule,
    TextClassificationDataModule,
)
from kdlab.data.corpus import CorpusDataModule
from kdlab.data.squad import SquadDataModule

__all__ = [
    "CorpusDataModule",
    "GlueDataModule",
    "RottenTomatoesDataModule",
    "SquadDataModule",
    "TextClassificationDataModule",
    "TokenizedDataModule",
]
