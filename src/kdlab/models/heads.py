"""Task heads, and how a batch meets them: what methods, evaluation and the teacher cache use.

A task names its head (``task.head``, a :data:`HEADS` key); the :class:`Head` says which
``transformers`` class carries it and which model output is trained against which gold
field of the batch. :func:`forward` runs a model on a batch and :func:`targets` picks the
batch's gold values as those outputs meet them, so methods need no per-head code.
"""

from dataclasses import dataclass

from torch import Tensor
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput

from kdlab.data.base import TEACHER_INPUTS_PREFIX
from kdlab.families import FAMILIES
from kdlab.losses import IGNORE_INDEX


@dataclass(frozen=True)
class Head:
    """A task head.

    Args:
        name: the head's name (``task.head``).
        auto_class: the ``transformers`` auto class (``AutoModelFor...``) that builds or
            loads a model with it.
        architecture: the suffix of a saved model's ``config.architectures`` entry when it
            has this head (``BertForMaskedLM`` ends with ``ForMaskedLM``).
        outputs: for each gold field of a batch (the keyword the ``transformers`` model
            takes it by), the model output holding the logits trained against it. Losses
            and distillation iterate over these pairs.
        per_token: its outputs score token positions (a span's start and end, a masked
            token), so teacher and student outputs meet position by position and need one
            tokenisation: a teacher with another tokenizer is refused.
    """

    name: str
    auto_class: type
    architecture: str
    outputs: dict[str, str]
    per_token: bool


HEADS: dict[str, Head] = {
    head.name: head
    for head in (
        Head(
            name="sequence_classification",
            auto_class=AutoModelForSequenceClassification,
            architecture="ForSequenceClassification",
            outputs={"labels": "logits"},
            per_token=False,
        ),
        Head(
            name="question_answering",
            auto_class=AutoModelForQuestionAnswering,
            architecture="ForQuestionAnswering",
            outputs={"start_positions": "start_logits", "end_positions": "end_logits"},
            per_token=True,
        ),
        Head(
            name="masked_lm",
            auto_class=AutoModelForMaskedLM,
            architecture="ForMaskedLM",
            outputs={"labels": "logits"},
            per_token=True,
        ),
    )
}

# Batch keys a model reads; the rest are gold targets and bookkeeping (``feature_index``).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, Tensor], model: PreTrainedModel) -> dict[str, Tensor]:
    """The batch's inputs that ``model`` reads, ready for ``model(**inputs)``: without its
    targets and bookkeeping, and without ``token_type_ids`` where the model embeds fewer
    than two segments (``config.type_vocab_size``: RoBERTa's 1, DeBERTa-v3's 0, none in
    ModernBERT). A tokenizer of BERT's kind writes 1 for a pair's second segment, which such
    a model cannot embed; without the ids it reads segment 0 everywhere, as it was trained.
    """
    segments = getattr(model.config, "type_vocab_size", 0)
    return {
        k: v
        for k, v in batch.items()
        if k in MODEL_INPUTS and (k != "token_type_ids" or segments > 1)
    }


def teacher_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch as the teacher reads it: where it carries the teacher's own tokenisation
    (``teacher_*`` keys, a teacher with another tokenizer), those inputs under the usual
    names in place of the student's; else the batch itself. Targets and bookkeeping stay."""
    prefix = TEACHER_INPUTS_PREFIX
    theirs = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
    if not theirs:
        return batch
    rest = {k: v for k, v in batch.items() if k not in MODEL_INPUTS and not k.startswith(prefix)}
    return {**rest, **theirs}


def forward(model: PreTrainedModel, batch: dict[str, Tensor], head: str, **options) -> ModelOutput:
    """``model``'s outputs on ``batch``, with a masked-LM head scored only where it is graded.

    Masked-LM batches have a target at about 15 % of the positions (``labels`` is
    ``IGNORE_INDEX`` elsewhere), and the vocabulary projection is the largest matrix of a
    small BERT: scoring the other positions would cost most of the step for nothing. So for
    ``head == "masked_lm"`` the logits are ``[N, V]``, one row per target in the batch's
    row-major order, and :func:`targets` returns the ``[N]`` targets they go with. Models
    whose family has no separable head (:meth:`kdlab.families.Family.mlm_head`) are run
    whole and their rows selected.

    Args:
        model: a ``transformers`` model with the task's head.
        batch: inputs and targets (``model_inputs`` picks the inputs).
        head: the task's head (:data:`HEADS` key).
        **options: forwarded to the model (``output_hidden_states``, ``output_attentions``).
    """
    inputs = model_inputs(batch, model)
    if head != "masked_lm":
        return model(**inputs, **options)
    rows = batch["labels"] != IGNORE_INDEX
    family = FAMILIES.get(model.config.model_type)
    mlm_head = family.mlm_head(model) if family is not None else None
    if mlm_head is None:
        outputs = model(**inputs, **options)
        return MaskedLMOutput(
            logits=outputs.logits[rows],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
    encoded = model.base_model(**inputs, **options)
    return MaskedLMOutput(
        logits=mlm_head(encoded.last_hidden_state[rows]),
        hidden_states=encoded.hidden_states,
        attentions=encoded.attentions,
    )


def targets(batch: dict[str, Tensor], head: str) -> dict[str, Tensor]:
    """The batch's gold targets keyed by batch key, as :func:`forward`'s logits meet them:
    ``labels`` (``[N]`` graded positions for masked-LM), or ``start_positions`` and
    ``end_positions``."""
    found = {key: batch[key] for key in HEADS[head].outputs}
    if head == "masked_lm":
        labels = found["labels"]
        found["labels"] = labels[labels != IGNORE_INDEX]
    return found
