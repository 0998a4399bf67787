"""What a run knows about a method before it builds anything, and what follows from it.

A method states its traits in one declaration, ``traits = MethodTraits(...)``
(:class:`MethodTraits`). From them, and from the task, follow the rules a run config must
meet (:func:`check_traits`: the task's head, labels, pruning, ``method.cache_teacher``) and
whether the teacher-output cache (:mod:`kdlab.methods.teacher_cache`) serves the run: the
one decision, :func:`teacher_cache_refusal` (why not) and :func:`teacher_cache_for` (the
run's cache, or None); and whether a teacher with another tokenizer can teach the student
(:func:`teacher_tokenizer_for`).
"""

import logging
from dataclasses import dataclass

from hydra.utils import get_class
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.data.base import TokenizedDataModule
from kdlab.errors import ConfigError
from kdlab.methods.teacher_cache import TeacherCache, teacher_cache
from kdlab.models.build import load_tokenizer, tokenizer_difference
from kdlab.models.heads import HEADS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodTraits:
    """A method's traits (its class's ``traits``): what the run builds for it and what it
    needs of the config, read before anything is built.

    Args:
        requires_teacher: the run builds a teacher (``teacher``) for the method.
        reads_labels: its training losses read the batch's labels, so it cannot train on a
            transfer set (``task.transfer``: unlabelled inputs).
        requires_pruning: it only makes sense while the student is pruned (``pruning=...``).
        supported_heads: the task heads it has a sound definition for; a task with another
            head is refused before anything loads.
        unsupported_head_hint: appended to that refusal: why, and what to use instead.
        teacher_head_hint: appended to the error on a teacher without a trained task head:
            a method-specific way out (e.g. switching off the terms that need the head).
        why_teacher_uncacheable: why the teacher's outputs cannot be computed once and
            reused (``method.cache_teacher``): the method runs the teacher on inputs made
            anew each step, or reads more than its output logits. None where they can.
        why_one_tokenisation: why teacher and student must read the same ids whatever the
            head: its losses compare their representations token by token. None where a
            teacher with another tokenizer can teach on sequence-level heads, each model
            reading its own tokenisation of the same examples.
    """

    requires_teacher: bool = True
    reads_labels: bool = True
    requires_pruning: bool = False
    supported_heads: frozenset[str] = frozenset(HEADS)
    unsupported_head_hint: str = "pick another method or task"
    teacher_head_hint: str = ""
    why_teacher_uncacheable: str | None = None
    why_one_tokenisation: str | None = None


def check_head(method: type, head: str, task: str = "this task") -> None:
    """Refuse a task head the method (a class with ``traits``) has no definition for.

    Raises:
        ConfigError: naming the task, its head and the heads the method supports.
    """
    traits = method.traits
    if head not in traits.supported_heads:
        raise ConfigError(
            f"{method.__name__} does not support task={task} (a {head} task; it supports "
            f"{sorted(traits.supported_heads)}): {traits.unsupported_head_hint}."
        )


def check_traits(method: type, cfg: DictConfig) -> None:
    """The rules across config groups that the method's traits imply: the task's head, no
    transfer set for a method that reads labels, the cache where ``method.cache_teacher=true``
    asks for it, and pruning where the method requires it.

    Args:
        method: the method's class (``method._target_``).
        cfg: the composed root config.

    Raises:
        ConfigError: naming the setting to change.
    """
    traits = method.traits
    check_head(method, get_class(cfg.task._target_).head, cfg.task.name)
    if traits.reads_labels and cfg.task.get("transfer"):
        raise ConfigError(
            f"method={cfg.method.name} trains on labels, but task.transfer makes the training "
            "set unlabelled inputs: use method=pd there, or drop the transfer set "
            "(leave transfer= unset)."
        )
    if cfg.method.get("cache_teacher") and (why := teacher_cache_refusal(cfg)):
        raise ConfigError(
            f"method.cache_teacher=true, but {why}, so the teacher's outputs cannot be "
            "computed once and reused: set method.cache_teacher=false (or leave it null, "
            "which caches wherever it is valid)."
        )
    if traits.requires_pruning and cfg.get("pruning") is None:
        raise ConfigError(
            f"method={cfg.method.name} prunes while it trains: set pruning=homotopic (or "
            "pruning=oneshot) and a pruned student (model=minilm_half, model=pruned, or "
            "model=tiny|xsmall|small|base for a BERT-base teacher)."
        )


def teacher_cache_refusal(cfg: DictConfig) -> str | None:
    """Why the teacher-output cache is not valid for this run config, or None if it is: the
    method has no teacher or cannot use cached outputs (``why_teacher_uncacheable``), the
    task's training inputs vary between epochs (its datamodule's
    ``why_training_inputs_vary``), or there is no ``task.cache_dir`` to keep it in."""
    traits = get_class(cfg.method._target_).traits
    if not traits.requires_teacher:
        return f"method={cfg.method.name} has no teacher"
    if traits.why_teacher_uncacheable:
        return traits.why_teacher_uncacheable
    varying = get_class(cfg.task._target_).why_training_inputs_vary(cfg.task)
    if varying:
        return varying
    if not cfg.task.get("cache_dir"):
        return "task.cache_dir is null (the cache is stored beside the dataset cache)"
    return None


def teacher_cache_for(
    cfg: DictConfig, teacher: PreTrainedModel | None, datamodule: TokenizedDataModule
) -> TeacherCache | None:
    """The teacher-output cache of the run's training split (:func:`teacher_cache`), as
    ``method.cache_teacher`` asks: ``null`` wherever it is valid (else None, logging why),
    ``true`` always (:func:`check_traits` refused it where it is not valid), ``false``
    never. None without a teacher.
    """
    if teacher is None or cfg.method.get("cache_teacher") is False:
        return None
    refusal = teacher_cache_refusal(cfg)
    if refusal is not None:
        log.info("Teacher outputs are not cached: %s.", refusal)
        return None
    return teacher_cache(teacher, datamodule)


def teacher_tokenizer_for(
    cfg: DictConfig, method: type, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedTokenizerBase | None:
    """The teacher's own tokenizer (``teacher.path``) where it tokenises differently from the
    student's (:func:`~kdlab.models.build.tokenizer_difference`): the datamodule then
    tokenises each example by both and the teacher reads its own ids. None where they
    tokenise alike, or the method has no teacher.

    Loads the teacher's tokenizer only: called before the data or any model loads.

    Args:
        cfg: the run config.
        method: the method's class.
        tokenizer: the student's tokenizer (``model.tokenizer``).

    Raises:
        ConfigError: the tokenizers differ, but the method (``why_one_tokenisation``) or the
            task's head (``per_token``) compares teacher and student position by position,
            which needs one tokenisation.
    """
    if not method.traits.requires_teacher:
        return None
    teacher_tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
    difference = tokenizer_difference(teacher_tokenizer, tokenizer)
    if difference is None:
        return None
    head = get_class(cfg.task._target_).head
    why = method.traits.why_one_tokenisation
    if why is None and HEADS[head].per_token:
        why = (
            f"task={cfg.task.name} is a {head} task, whose outputs score token positions that "
            "the teacher's and student's losses compare one by one"
        )
    if why is not None:
        raise ConfigError(
            f"teacher.path={cfg.teacher.path} and model.tokenizer={cfg.model.tokenizer} "
            f"tokenise differently ({difference}), but {why}, which needs one tokenisation: "
            "use a student built on the teacher's tokenizer (model.tokenizer=<teacher.path>), "
            "or a sequence-level task (classification, regression) with method=kd, pd or "
            "mixkd, which distil across tokenizers."
        )
    log.info(
        "Teacher and student tokenise differently (%s): each example is tokenised by both, "
        "and the teacher reads its own ids.",
        difference,
    )
    return teacher_tokenizer
