"""Datamodules shared by every method. A datamodule knows nothing about methods."""

from kdlab.data.classification import TextClassificationDataModule
from kdlab.data.corpus import CorpusDataModule

__all__ = ["CorpusDataModule", "TextClassificationDataModule"]
