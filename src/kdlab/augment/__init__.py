"""Training-data augmentation applied by the datamodules (config group ``augment``)."""

from kdlab.augment.backtranslation import EXAMPLE_INDEX, BackTranslationOptions, add_paraphrases

__all__ = ["EXAMPLE_INDEX", "BackTranslationOptions", "add_paraphrases"]
