"""Teachers and students: the builders that the ``model`` and ``teacher`` config groups name.

Each option of those groups is built by ``hydra.utils.instantiate`` from its ``_target_``,
one of the functions below, with the task's head and labels passed by the run:

- :func:`pretrained`: a saved model (hub id or local directory), e.g. MiniLM or a student
  that an earlier run exported.
- :func:`truncated`: the first ``num_layers`` layers of a deeper model (by default the
  teacher), as the BERT3/BERT6 students of MixKD and DistilBERT-style initialisation.
- :func:`random_bert`: a BERT of the given shape (heads of ``head_dim``, FFN
  ``4·hidden``) initialised at random, with the vocabulary of ``tokenizer``: the
  miniatures of Turc et al. (2019).
- :func:`teacher_copy`: the teacher itself, for pruning to ``target`` (HomoDistil).
- :func:`teacher`: the frozen teacher, which must have a trained head for the task when
  the method reads it.
"""

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdlab.errors import ConfigError
from kdlab.models.heads import HEADS
from kdlab.pruning.masks import PruneTarget, check_target
from kdlab.rundir import RunDir
from kdlab.validation import PositiveInt, with_config_check

log = logging.getLogger(__name__)

# The config attribute every export carries: the task it was trained on.
TASK_ATTRIBUTE = "kdlab_task"


# Files of which a saved tokenizer has at least one (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


@dataclass(frozen=True)
class ModelSource:
    """``Annotated[str, ModelSource()]``: a hub id or a local directory with a saved model
    (``model``: its ``config.json``) and/or its tokenizer (``tokenizer``: one of
    :data:`TOKENIZER_FILES`).

    The config check refuses, before anything loads, a local path that does not exist, a
    run directory given where its exported ``student/`` is meant, a model directory with a
    truncated or damaged ``*.safetensors`` file (its header is read), and a directory without
    what is asked of it: without its tokenizer files ``AutoTokenizer`` would not fail but
    fall back to a tokenizer of the special tokens alone, reading every word as ``[UNK]``.
    Anything else that is not a local path is taken for a hub id.
    """

    model: bool = True
    tokenizer: bool = False
    touches_files = True

    def violation(self, value: str) -> str | None:
        path = Path(value).expanduser()
        if path.is_dir():
            has_model = (path / "config.json").is_file()
            export = RunDir(path).student
            if not has_model and (export / "config.json").is_file():
                return f"is a run directory: its exported model is {export}; point there"
            if self.model and not has_model:
                return "is a directory without a saved model (no config.json)"
            for weights in sorted(path.glob("*.safetensors")) if self.model else ():
                if problem := _unreadable(weights):
                    return (
                        f"holds a weights file that cannot be read, {weights} ({problem}): it "
                        "is truncated or damaged, e.g. by an interrupted copy or download; copy "
                        "or save the model there again (`model.save_pretrained(<directory>)`)"
                    )
            if self.tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
                return (
                    f"is a directory without tokenizer files (none of {', '.join(TOKENIZER_FILES)}"
                    "), so every word would read as [UNK]: save the model's tokenizer there, "
                    f"`AutoTokenizer.from_pretrained(<its source>).save_pretrained('{path}')`"
                    + ("" if self.model else ", or set model.tokenizer to where it is saved")
                )
            return None
        if path.exists():
            return "is a file, not a model directory"
        if _looks_local(value):
            return f"does not exist: no such directory {path}"
        return None  # a hub id; an unreachable hub is reported when it loads


ModelPath = Annotated[str, ModelSource()]
# A teacher's tokenizer is read from its directory too.
TeacherPath = Annotated[str, ModelSource(tokenizer=True)]
TokenizerPath = Annotated[str, ModelSource(model=False, tokenizer=True)]


def _looks_local(value: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else names a place on disk.
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def head_kwargs(head: str, labels: list[str] | None) -> dict:
    """Config overrides a head needs on the model: label count, names, problem type."""
    if head != "sequence_classification":
        return {}
    if labels is None:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerBase:
    """The tokenizer at a hub id or local directory; ``key`` names the config setting."""
    return _load(AutoTokenizer, path, key)


def _load_model(path: str, head: str, key: str, **kwargs) -> tuple[PreTrainedModel, dict]:
    """The model with ``head`` at ``path``, and what loading it found missing or unused.

    ``transformers`` warns with a table of MISSING and UNEXPECTED keys (and, for a missing
    MLM head, "This checkpoint seem corrupted") whenever a checkpoint lacks the new head,
    which is what a new head means, and lists a layer-truncated student's left-out layers
    as UNEXPECTED: those cases are logged once, at INFO. Any other missing or unused key
    keeps ``transformers``' warning.
    """
    held = _HeldLoadReport()
    try:
        model, info = _load(HEADS[head].auto_class, path, key, output_loading_info=True, **kwargs)
    except BaseException:
        held.release()  # the report explains a failed load: show it
        raise
    held.remove()
    prefix = model.base_model_prefix + "."
    new_head = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    # A layer-truncated student leaves the checkpoint's deeper layers unused.
    dropped = sorted(
        {int(m[1]) for k in info["unexpected_keys"] if (m := _LAYER.search(k))}
        - set(range(model.config.num_hidden_layers))
    )
    unused = sorted(
        k for k in info["unexpected_keys"] if not ((m := _LAYER.search(k)) and int(m[1]) in dropped)
    )
    # The pooler is in a base checkpoint but not in every head's model (MLM, span heads).
    expected = len(new_head) == len(info["missing_keys"]) and all(
        "pooler" in k.removeprefix(prefix).split(".")[:1] for k in unused
    )
    if not expected:
        held.release()
        return model, info
    if new_head or unused:
        log.info(
            "%s=%s has no %s head: newly initialised, as expected for a new head: %s%s",
            key,
            path,
            head,
            ", ".join(new_head) or "nothing",
            f"; not used by this head: {', '.join(unused)}" if unused else "",
        )
    if dropped:
        log.info(
            "%s=%s: layers %d-%d left out (a layer-truncated model).",
            key,
            path,
            dropped[0],
            dropped[-1],
        )
    return model, info


# The layer index of an encoder parameter's name: ``bert.encoder.layer.3.output.dense.bias``
# (BERT, RoBERTa, ELECTRA, DeBERTa), ``model.layers.3.mlp.Wo.weight`` (ModernBERT).
_LAYER = re.compile(r"\.layers?\.(\d+)\.")


class _HeldLoadReport(logging.Filter):
    """Holds back the load report of ``transformers`` (and its warning on the missing MLM
    head) for :func:`_load_model` to show or replace."""

    MARKS = ("LOAD REPORT", "This checkpoint seem corrupted")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("transformers.modeling_utils")
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if any(mark in record.getMessage() for mark in self.MARKS):
            self.records.append(record)
            return False
        return True

    def remove(self) -> None:
        """Stop holding records back."""
        self.logger.removeFilter(self)

    def release(self) -> None:
        """Stop holding records back and log those held."""
        self.remove()
        for record in self.records:
            self.logger.handle(record)


def _load(auto_class: type, path: str, key: str, **kwargs):
    """``auto_class.from_pretrained(path)``, failing with a ConfigError that names ``key``."""
    try:
        return auto_class.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        # One message, not transformers' chain of hub errors: its first line says why.
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"Could not load '{path}' ({key}): {why} If the Hugging Face hub is unreachable, "
            f"set {key}=<local directory with config.json and weights>."
        ) from None


def _unreadable(weights: Path) -> str | None:
    """Why the safetensors file ``weights`` cannot be read (its header, and whether the
    file holds all it declares), or None; only the header is read."""
    try:
        with safe_open(weights, framework="pt"):
            return None
    except SafetensorError as err:
        return str(err)


def _check_vocabulary(model: PreTrainedModel, tokenizer: str, key: str = "model.tokenizer") -> None:
    """Refuse a tokenizer with ids beyond the model's embedding table, or one that reaches
    less than half of it: the rows a checkpoint pads its table with are a few, so a
    tokenizer that small is not the one the model was trained with (e.g. the fallback of a
    directory without tokenizer files, its special tokens alone)."""
    size = len(load_tokenizer(tokenizer, key))
    embedded = model.config.vocab_size
    if size > embedded or 2 * size < embedded:
        rule = "more than" if size > embedded else "fewer than half of"
        raise ConfigError(
            f"{key}={tokenizer} has {size} tokens, {rule} the {embedded} the model embeds "
            "(a tokenizer must cover at least half of the model's embedding rows and no "
            "more): use the tokenizer the model was trained with."
        )


# Families whose position ids count from the padding index + 1 (``transformers``'
# ``create_position_ids_from_input_ids``): they embed max_position_embeddings minus
# pad_token_id + 1 tokens (RoBERTa's 514 rows, padding index 1, hold 512).
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def position_limit(config: PretrainedConfig) -> tuple[int | None, str]:
    """The longest sequence ``config``'s model embeds positions for, and the rule that says so.

    None where it has no absolute positions: DeBERTa-v2/v3 with ``position_biased_input``
    false embeds only relative positions, bucketed or clipped to its span at any distance.
    ModernBERT's rotary positions are limited by its ``max_position_embeddings``, as BERT's
    and ELECTRA's absolute ones (counted from 0).
    """
    if not getattr(config, "position_biased_input", True):
        return None, f"{config.model_type} embeds relative positions only"
    rule = f"max_position_embeddings {config.max_position_embeddings}"
    if config.model_type not in PADDING_OFFSET_POSITIONS:
        return config.max_position_embeddings, rule
    offset = config.pad_token_id + 1
    rule += (
        f" minus the {config.model_type} offset {offset} (positions count from pad_token_id + 1)"
    )
    return config.max_position_embeddings - offset, rule


def _check_length(cfg: DictConfig, limit: int, source: str) -> None:
    """Refuse a ``task.max_seq_length`` beyond the ``limit`` positions ``source`` embeds:
    the data would be tokenised, the model loaded, and the first batch fail."""
    if cfg.task.max_seq_length > limit:
        raise ConfigError(
            f"task.max_seq_length={cfg.task.max_seq_length} exceeds the {limit} positions of "
            f"{source}: set task.max_seq_length={limit} or less."
        )


def _check_saved_length(key: str) -> Callable[[DictConfig], None]:
    """The check of ``task.max_seq_length`` against the saved model at ``<key>.path``, read
    from its ``config.json`` alone; a hub id, or a directory an earlier pipeline stage has
    yet to write, is not known before it loads."""

    def check(cfg: DictConfig) -> None:
        path = cfg[key].path
        if not (Path(str(path)).expanduser() / "config.json").is_file():
            return
        limit, rule = position_limit(_load(AutoConfig, path, f"{key}.path"))
        if limit is not None:
            _check_length(cfg, limit, f"{key}.path={path} ({rule})")

    return check


def _check_new_bert_length(cfg: DictConfig) -> None:
    # random_bert leaves BertConfig's default (the released miniatures have it too).
    limit = BertConfig().max_position_embeddings
    _check_length(cfg, limit, f"model={cfg.model.name} (a BERT of max_position_embeddings {limit})")


@with_config_check(_check_saved_length("model"))
def pretrained(
    *,
    name: str,
    path: ModelPath,
    tokenizer: TokenizerPath,
    attn_implementation: str | None = None,
    head: str,
    labels: list[str] | None,
) -> PreTrainedModel:
    """A saved model with the task's head (new, randomly initialised, if it has none).

    Args:
        name: the preset's name (run names, ``metrics.json``).
        path: hub id or local directory.
        tokenizer: the tokenizer the model reads (by default ``path``).
        attn_implementation: ``eager``, ``sdpa``, ... (None: the library's default).
        head: the task's head (``kdlab.models.heads.HEADS`` key), passed by the run.
        labels: the task's class names (None: regression or no classes), passed by the run.
    """
    model, _ = _load_model(path, head, "model.path", **_options(head, labels, attn_implementation))
    _check_vocabulary(model, tokenizer)
    log.info("Student %s: %s", name, path)
    return model


@with_config_check(_check_saved_length("model"))
def truncated(
    *,
    name: str,
    path: ModelPath,
    tokenizer: TokenizerPath,
    num_layers: PositiveInt,
    attn_implementation: str | None = None,
    head: str,
    labels: list[str] | None,
) -> PreTrainedModel:
    """The embeddings, first ``num_layers`` layers and head of a deeper saved model, of any
    family.

    The first layers, not evenly spaced ones (DistilBERT's one of every two): MixKD's
    BERT3/BERT6 students and Patient KD's (Sun et al. 2019) are the teacher's first layers,
    which read each other's outputs as the teacher was trained; the recipes that reproduce
    them need this default. Per-layer config lists (``transformers``' ``layer_types``, e.g.
    ModernBERT's local/global attention pattern) keep the entries of the kept layers.

    Args:
        num_layers: layers kept (counted from the embeddings).
        others: as :func:`pretrained`.
    """
    config = _load(AutoConfig, path, "model.path", **head_kwargs(head, labels))
    if num_layers > config.num_hidden_layers:
        raise ConfigError(
            f"model.num_layers={num_layers} exceeds the {config.num_hidden_layers} layers of "
            f"model.path={path}: a truncated student keeps the first layers of a deeper model."
        )
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    implementation = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, _ = _load_model(path, head, "model.path", config=config, **implementation)
    _check_vocabulary(model, tokenizer)
    log.info("Student %s: the first %d layers of %s", name, num_layers, path)
    return model


@with_config_check(_check_new_bert_length)
def random_bert(
    *,
    name: str,
    num_layers: PositiveInt,
    hidden_size: PositiveInt,
    head_dim: PositiveInt = 64,
    intermediate_size: PositiveInt | None = None,
    tokenizer: TokenizerPath,
    init_seed: int = 0,
    pretrained: bool = False,
    attn_implementation: str | None = None,
    head: str,
    labels: list[str] | None,
) -> PreTrainedModel:
    """A BERT of the given shape, randomly initialised or (``pretrained``) the released
    pre-trained miniature of that shape.

    Args:
        num_layers: encoder layers.
        hidden_size: width; a multiple of ``head_dim``.
        head_dim: size of each attention head (heads = hidden / head_dim).
        intermediate_size: FFN width (None: 4 × hidden).
        tokenizer: hub id or directory of the tokenizer whose vocabulary the model embeds.
        init_seed: seed of the initialisation (the same student for every training seed).
        pretrained: load ``google/bert_uncased_L-{L}_H-{H}_A-{H/64}`` from the hub (Turc et
            al.'s 24 miniatures, pre-trained with MLM) instead of initialising at random.
        others: as :func:`pretrained`.
    """
    if hidden_size % head_dim:
        raise ConfigError(
            f"model.hidden_size={hidden_size} is not a multiple of model.head_dim={head_dim}."
        )
    if pretrained:
        options = _options(head, labels, attn_implementation)
        heads = hidden_size // head_dim
        return _released_miniature(num_layers, hidden_size, heads, tokenizer, head, options)
    vocabulary = load_tokenizer(tokenizer, "model.tokenizer")
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        intermediate_size=intermediate_size or 4 * hidden_size,
        pad_token_id=vocabulary.pad_token_id,
        **_options(head, labels, attn_implementation),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = HEADS[head].auto_class.from_config(config)
    log.info("Student %s: random BERT L%d H%d", name, num_layers, hidden_size)
    return model


def _released_miniature(
    layers: int, hidden: int, heads: int, tokenizer: str, head: str, options: dict
) -> PreTrainedModel:
    hub_id = f"google/bert_uncased_L-{layers}_H-{hidden}_A-{heads}"
    try:
        model = HEADS[head].auto_class.from_pretrained(hub_id, **options)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not load the released miniature {hub_id} (model.pretrained=true): {err}. "
            "Without the hub, use a saved copy or a miniature kdlab pre-trained itself: "
            "model=pretrained model.path=<directory> (e.g. the student/ of a "
            f"`method=mlm model=bert_L{layers}_H{hidden}` run)."
        ) from err
    _check_vocabulary(model, tokenizer)
    log.info("Student: the released miniature %s", hub_id)
    return model


# The route that works without the hub, for errors about HomoBERT shapes.
OFFLINE_HOMODISTIL = (
    "The presets model=tiny|xsmall|small|base are HomoBERT's shapes for a BERT-base teacher "
    "(teacher=bert_base, from the hub). Offline, distil the bundled MiniLM: first train its "
    "MLM head, `python -m kdlab.train method=mlm method.trainable=head model=minilm "
    "task=corpus/local task.files=[<text files>]`, then `python -m kdlab.train method=homodistil "
    "model=minilm_half teacher=local teacher.path=<that run>/student task=corpus/local "
    "task.files=[<text files>]` (or model=pruned with model.target.* for another shape of "
    "MiniLM's heads of 32)."
)


def _check_teacher_copy(cfg: DictConfig) -> None:
    """Before anything loads: the target must fit the saved model's shape (read from its
    ``config.json`` when it is local; a hub model is checked when it loads)."""
    model = cfg.model
    if not (Path(str(model.path)).expanduser() / "config.json").is_file():
        return
    try:
        check_target(_load(AutoConfig, model.path, "model.path"), model.target)
    except ConfigError as err:
        raise ConfigError(
            f"model={model.name} does not fit model.path={model.path}: {err} {OFFLINE_HOMODISTIL}"
        ) from None


@with_config_check(_check_teacher_copy, _check_saved_length("model"))
def teacher_copy(
    *,
    name: str,
    path: ModelPath,
    tokenizer: TokenizerPath,
    target: PruneTarget,
    random_init: bool = False,
    init_seed: int = 0,
    attn_implementation: str | None = None,
    head: str,
    labels: list[str] | None,
) -> PreTrainedModel:
    """A copy of the teacher (same depth and widths) that pruning narrows to ``target``.

    Args:
        target: the shape ``pruning=`` prunes to (``pruning.target`` reads it); it must
            keep the model's head size.
        random_init: re-initialise every weight at random: the teacher's shape without its
            knowledge (the non-teacher-initialisation baseline of HomoDistil's Figure 1).
        init_seed: seed of that initialisation.
        others: as :func:`pretrained`.
    """
    model = pretrained(
        name=name,
        path=path,
        tokenizer=tokenizer,
        attn_implementation=attn_implementation,
        head=head,
        labels=labels,
    )
    check_target(model.config, target)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            fresh = type(model)(model.config)
        model.load_state_dict(fresh.state_dict())
        log.info("Student %s: re-initialised at random (seed %d)", name, init_seed)
    return model


@with_config_check(_check_saved_length("teacher"))
def teacher(
    *,
    name: str,
    path: TeacherPath,
    attn_implementation: str | None = None,
    require_trained_head: bool = True,
    head: str,
    labels: list[str] | None,
    task: str,
    needs_head: bool,
    hint: str = "",
) -> PreTrainedModel:
    """The frozen teacher with the task's head.

    A teacher must come with a trained head when the method reads it: distilling from a
    freshly initialised classifier (or MLM head) would teach noise. The saved config is
    read first, so a missing head or a head of the wrong size fails before weights load.

    Args:
        name: the preset's name.
        path: hub id or local directory.
        attn_implementation: as :func:`pretrained`.
        require_trained_head: False to accept a teacher whose head is new (only sensible
            for a method that does not read it).
        head: the task's head, passed by the run.
        labels: the task's class names, passed by the run.
        task: the task's name, passed by the run (compared with the task the teacher was
            exported for).
        needs_head: whether this configuration of the method reads the head, passed by the
            run.
        hint: a method-specific way out, appended to the missing-head error.
    """
    config = _load(AutoConfig, path, "teacher.path")
    _check_teacher_task(config, path, head, labels, task)
    must_have_head = needs_head and require_trained_head
    saved = config.architectures or []
    if must_have_head and saved and not any(a.endswith(HEADS[head].architecture) for a in saved):
        raise ConfigError(_no_head(path, head, task, f"it was saved as {saved[0]}", hint))
    model, info = _load_model(
        path, head, "teacher.path", **_options(head, labels, attn_implementation)
    )
    new_head = [k for k in info["missing_keys"] if not k.startswith(model.base_model_prefix)]
    if must_have_head and new_head:
        raise ConfigError(_no_head(path, head, task, f"missing {new_head[:3]}", hint))
    if must_have_head:
        _warn_if_head_untrained(model, path)
    _check_vocabulary(model, path, "teacher.path")
    log.info("Teacher %s: %s", name, path)
    return model.eval().requires_grad_(False)


def _warn_if_head_untrained(model: PreTrainedModel, path: str) -> None:
    """Warn when the teacher's head looks as ``transformers`` initialises one: every bias
    exactly 0 and the matrices' spread that of ``initializer_range``. A saved head need not
    be a trained one (``save_pretrained`` on a fresh model), and one trained step already
    moves its biases off 0."""
    prefix = model.base_model_prefix + "."
    head = {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}
    biases = [p for n, p in head.items() if n.endswith("bias")]
    matrices = [p for p in head.values() if p.dim() == 2]
    init = getattr(model.config, "initializer_range", None)
    if not biases or not matrices or init is None:
        return  # nothing to tell a trained head by
    std = torch.cat([p.detach().flatten().float() for p in matrices]).std().item()
    if all(not p.any() for p in biases) and 0.5 * init < std < 1.5 * init:
        log.warning(
            "teacher.path=%s: its head (%s) looks untrained: every bias is 0 and its weights "
            "spread as initialised (std %.4f, initializer_range %g). Distilling from it "
            "teaches noise; use a teacher fine-tuned on this task.",
            path,
            ", ".join(sorted(head)),
            std,
            init,
        )


def _check_teacher_task(
    config: PretrainedConfig, path: str, head: str, labels: list[str] | None, task: str
) -> None:
    """Refuse a head of the wrong size; warn when the teacher was trained for another task."""
    trained_for = getattr(config, TASK_ATTRIBUTE, None)
    if trained_for is not None and trained_for != task:
        log.warning(
            "teacher.path=%s was exported by a run on task '%s', but this run's task is '%s'.",
            path,
            trained_for,
            task,
        )
    has_head = any(a.endswith(HEADS[head].architecture) for a in config.architectures or ())
    wanted = head_kwargs(head, labels).get("num_labels")
    if wanted is None or not has_head:
        return
    if config.num_labels != wanted:
        raise ConfigError(
            f"teacher.path={path} has a head with {config.num_labels} output(s) but task "
            f"'{task}' has {wanted} ({labels or 'regression'}): use a teacher fine-tuned on "
            f"'{task}'."
        )
    names = [config.id2label[i] for i in range(wanted)] if labels else []
    if names and names != labels and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        log.warning(
            "teacher.path=%s predicts the labels %s, but task '%s' has %s.",
            path,
            names,
            task,
            labels,
        )


def _no_head(path: str, head: str, task: str, why: str, hint: str) -> str:
    return (
        f"teacher.path={path} has no trained {head} head for task '{task}' ({why}). "
        f"{_train_head_first(head, path, task)}" + (f"; {hint}." if hint else ".")
    )


def _train_head_first(head: str, path: str, task: str) -> str:
    """How to give a teacher a trained head: a command that trains *that* model."""
    if head == "masked_lm":
        return (
            "Train its MLM head first, e.g. `python -m kdlab.train method=mlm method.trainable=head "
            f"model=pretrained model.path={path} task=corpus/local task.files=[<text files>]`, "
            "and set "
            "teacher.path=<that run>/student"
        )
    return (
        "Fine-tune it first, e.g. `python -m kdlab.train method=finetune model=pretrained "
        f"model.path={path} task={task}`, and set teacher.path=<that run>/student"
    )


def _options(head: str, labels: list[str] | None, attn_implementation: str | None) -> dict:
    options = head_kwargs(head, labels)
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    return options


# Special tokens whose ids a tokenizer shared by teacher and student must agree on.
_SPECIAL = ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "unk_token_id")


def tokenizer_difference(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> str | None:
    """How the teacher's tokenizer differs from the student's, or None where they tokenise
    alike: the one decision of whether a run tokenises each example twice.

    They differ when their vocabularies do, or their special-token ids (:data:`_SPECIAL`):
    the same ``input_ids`` would then feed the student other words, or other special
    tokens, than the teacher saw.

    Returns:
        A phrase naming the difference (``vocabularies differ (N vs M tokens)``, or which
        special-token id they disagree on), for messages.
    """
    if teacher.get_vocab() != student.get_vocab():
        return f"their vocabularies differ ({len(teacher)} vs {len(student)} tokens)"
    for attr in _SPECIAL:
        if getattr(teacher, attr) != getattr(student, attr):
            return f"they disagree on {attr} ({getattr(teacher, attr)} vs {getattr(student, attr)})"
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (``parameters()`` already yields tied tensors once)."""
    return sum(p.numel() for p in model.parameters())
