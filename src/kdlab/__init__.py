"""kdlab: distil and compress pre-trained transformers with Lightning and Hydra."""

__version__ = "0.1.0"
