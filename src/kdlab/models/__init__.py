"""Building teachers and students (the ``model`` and ``teacher`` groups' builders); the
task heads and how a batch meets them are in :mod:`kdlab.models.heads`."""

from kdlab.models.build import (
    count_parameters,
    load_tokenizer,
    pretrained,
    random_bert,
    teacher,
    teacher_copy,
    truncated,
)

__all__ = [
    "count_parameters",
    "load_tokenizer",
    "pretrained",
    "random_bert",
    "teacher",
    "teacher_copy",
    "truncated",
]
