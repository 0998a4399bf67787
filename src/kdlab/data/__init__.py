"""Datamodules shared by every method. A datamodule knows nothing about methods."""

from kdlab.data.classification import TextClassificationDataModule
from kdlab.data.corpus import CorpusDataModule
from kdlab.data.squad import SquadDataModule

__all__ = ["CorpusDataModule", "SquadDataModule", "TextClassificationDataModule"]
