"""Datamodules shared by every method. A datamodule knows nothing about methods."""

from kdlab.data.classification import TextClassificationDataModule

__all__ = ["TextClassificationDataModule"]
