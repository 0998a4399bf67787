"""Building teachers and students (the ``model`` and ``teacher`` groups' builders)."""

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
