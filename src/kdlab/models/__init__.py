"""Building teachers and students, loading from the hub or local directories, export."""

from kdlab.models.build import build_student, build_teacher, count_parameters, load_tokenizer

__all__ = ["build_student", "build_teacher", "count_parameters", "load_tokenizer"]
