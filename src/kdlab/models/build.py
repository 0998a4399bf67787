"""Teachers and students from the ``teacher`` and ``model`` config groups.

``model.kind`` picks how a student is made:

- ``pretrained``: load ``model.path`` (hub id or local directory).
- ``truncated``: the first ``model.num_layers`` layers of ``model.path`` (by default the
  teacher), as the BERT3/BERT6 students of MixKD and DistilBERT-style initialisation.
- ``random``: a BERT of the given shape (``num_layers``, ``hidden_size``, heads of 64 dims,
  FFN ``4·hidden``) initialised at random, with the vocabulary of ``model.tokenizer``.
"""

import logging

import torch
from omegaconf import DictConfig
from torch import Tensor
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
    "masked_lm": AutoModelForMaskedLM,
}

# For each task head: the batch key of every gold target (the name its transformers model
# takes it by) and the output holding the logits trained against it. Losses and
# distillation iterate over these pairs, so methods need no per-head code.
HEAD_TARGETS: dict[str, dict[str, str]] = {
    "sequence_classification": {"labels": "logits"},
    "question_answering": {"start_positions": "start_logits", "end_positions": "end_logits"},
    "masked_lm": {"labels": "logits"},
}

# Batch keys a model reads; the rest are gold targets and bookkeeping (``feature_index``).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch without its targets and bookkeeping, ready for ``model(**inputs)``."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


# Special tokens both models must map to the same ids.
_SPECIAL = ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "unk_token_id")


def head_kwargs(task: DictConfig) -> dict:
    """Config overrides a task needs on the model: label count, names, problem type."""
    if task.head != "sequence_classification":
        return {}
    if task.labels is None:
        return {"num_labels": 1, "problem_type": "regression"}
    labels = list(task.labels)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerBase:
    """The tokenizer at a hub id or local directory; ``key`` names the config setting."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(_unreachable(path, key, err)) from err


def _load_model(path: str, head: str, key: str, **kwargs) -> tuple[PreTrainedModel, dict]:
    try:
        model, info = HEADS[head].from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(_unreachable(path, key, err)) from err
    return model, info


def _unreachable(path: str, key: str, err: Exception) -> str:
    return (
        f"Could not load '{path}' ({key}): {err}. If the Hugging Face hub is unreachable, "
        f"set {key}=<local directory with config.json and weights>."
    )


# How to give a teacher a trained head, per task head kind ({path}, {task}).
_TRAIN_HEAD_FIRST = {
    "masked_lm": (
        "Train its MLM head first, e.g. `python -m kdlab.train method=mlm model=pretrained "
        "model.path={path} task=corpus/{task}`, and set teacher.path=<that run>/student"
    ),
}
_FINE_TUNE_FIRST = (
    "Fine-tune it first, e.g. `python -m kdlab.train method=finetune model.path={path} "
    "task={task}`, and set teacher.path=<that run>/student"
)


def build_teacher(
    cfg: DictConfig, task: DictConfig, require_trained_head: bool = True, hint: str = ""
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen teacher of ``cfg.teacher`` with the task's head.

    A teacher must come with a trained head when the method reads it: distilling from a
    freshly initialised classifier (or MLM head) would teach noise.

    Args:
        cfg: the run config.
        task: the task config.
        require_trained_head: False when the method does not use the head's outputs.
        hint: a method-specific alternative appended to the error message.
    """
    teacher, info = _load_model(
        cfg.teacher.path, task.head, "teacher.path", **head_kwargs(task), **_attn(cfg.teacher)
    )
    new_head = [k for k in info["missing_keys"] if not k.startswith(teacher.base_model_prefix)]
    if require_trained_head and cfg.teacher.get("require_trained_head", True) and new_head:
        remedy = _TRAIN_HEAD_FIRST.get(task.head, _FINE_TUNE_FIRST)
        remedy = remedy.format(path=cfg.teacher.path, task=task.name)
        raise ConfigError(
            f"teacher.path={cfg.teacher.path} has no trained {task.head} head for task "
            f"'{task.name}' (missing {new_head[:3]}). {remedy}" + (f"; {hint}." if hint else ".")
        )
    teacher.eval().requires_grad_(False)
    return teacher, load_tokenizer(cfg.teacher.path, "teacher.path")


def build_student(
    cfg: DictConfig, task: DictConfig, teacher_tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student described by ``cfg.model`` with the task's head, and its tokenizer.

    Raises:
        ConfigError: if the student's tokenizer disagrees with the teacher's.
    """
    model_cfg = cfg.model
    kwargs = {**head_kwargs(task), **_attn(model_cfg)}
    if model_cfg.kind == "pretrained":
        student, _ = _load_model(model_cfg.path, task.head, "model.path", **kwargs)
        tokenizer = load_tokenizer(model_cfg.path, "model.path")
    elif model_cfg.kind == "truncated":
        student, info = _load_model(
            model_cfg.path,
            task.head,
            "model.path",
            num_hidden_layers=model_cfg.num_layers,
            **kwargs,
        )
        prefix = student.base_model_prefix + "."
        new_body = [k for k in info["missing_keys"] if k.startswith(prefix)]
        if new_body:
            raise ConfigError(
                f"model.num_layers={model_cfg.num_layers} exceeds the layers of "
                f"model.path={model_cfg.path} (missing {new_body[:3]}): a truncated student "
                "keeps the first layers of a deeper model."
            )
        tokenizer = load_tokenizer(model_cfg.path, "model.path")
    elif model_cfg.kind == "random":
        tokenizer = load_tokenizer(model_cfg.tokenizer, "model.tokenizer")
        student = _random_bert(model_cfg, tokenizer, task.head, kwargs)
    else:
        raise ConfigError(f"model.kind='{model_cfg.kind}' must be pretrained, truncated or random.")
    if teacher_tokenizer is not None:
        check_same_tokenizer(teacher_tokenizer, tokenizer)
    return student, tokenizer


def _random_bert(
    model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, head: str, kwargs: dict
) -> PreTrainedModel:
    hidden = int(model_cfg.hidden_size)
    head_dim = int(model_cfg.get("head_dim", 64))
    if hidden % head_dim:
        raise ConfigError(
            f"model.hidden_size={hidden} is not a multiple of model.head_dim={head_dim}."
        )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=int(model_cfg.num_layers),
        num_attention_heads=hidden // head_dim,
        intermediate_size=int(model_cfg.get("intermediate_size") or 4 * hidden),
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    torch.manual_seed(int(model_cfg.get("init_seed", 0)))
    return HEADS[head].from_config(config)


def _attn(model_cfg: DictConfig) -> dict:
    impl = model_cfg.get("attn_implementation")
    return {"attn_implementation": impl} if impl else {}


def check_same_tokenizer(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> None:
    """Fail unless teacher and student share vocabulary and special-token ids.

    Both models read the same ``input_ids``, so any mismatch would silently feed the
    student different words than the teacher saw.
    """
    if teacher.get_vocab() != student.get_vocab():
        raise ConfigError(
            f"Teacher and student vocabularies differ ({len(teacher)} vs {len(student)} tokens). "
            "Use a student built on the teacher's tokenizer (model.tokenizer=${teacher.path})."
        )
    for attr in _SPECIAL:
        if getattr(teacher, attr) != getattr(student, attr):
            raise ConfigError(
                f"Teacher and student disagree on {attr} ({getattr(teacher, attr)} vs "
                f"{getattr(student, attr)})."
            )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (``parameters()`` already yields tied tensors once)."""
    return sum(p.numel() for p in model.parameters())
