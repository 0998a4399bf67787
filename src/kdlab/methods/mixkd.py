"""MixKD: distillation on mixup of word embeddings (Liang et al., "MixKD: Towards Efficient
Distillation of Large-scale Language Models", ICLR 2021).

Each training batch is paired with a random permutation of itself, ``j = perm[i]``, with
``λ_i ~ Beta(α, α)``. Teacher and student each mix their *own* word embeddings,
``ẽ_i = λ_i · E[x_i] + (1 − λ_i) · E[x_j]`` (token-type embeddings of sentence pairs alike),
and read the mixed sequence through ``inputs_embeds`` with the attention mask
``max(m_i, m_j)``. The loss is

``L = L_CE(f_s(x), y) + α_SM · CE(f_s(x̃), λ·y_i + (1 − λ)·y_j)
+ α_TMKD · T² · KL(softmax(f_t(x̃)/T) ‖ softmax(f_s(x̃)/T))``

and for regression (STS-B) both mixed terms are MSE, against the mixed target and against
the teacher's output. ``alpha_sm=0`` / ``alpha_tmkd=0`` are the paper's ablations;
``kd_alpha > 0`` replaces ``L_CE`` by standard KD on the original examples
(:func:`~kdlab.losses.kd_loss`). Logged terms: ``ce`` (or ``ce`` and ``kd``), ``sm``,
``tmkd`` and ``lambda`` (the batch mean of ``λ``).

Span tasks (``task.head`` other than sequence classification) are refused: start/end
positions are indices into two unrelated question–passage sequences whose tokens are not
aligned (token ``t`` of ``x_i`` and of ``x_j`` are different words), so a mix of the two
one-hot position targets names no span of the mixed sequence and ``L_SM`` has no meaning;
the teacher term alone would match position logits over an input that has no answer.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdlab.losses import distillation_loss, kd_loss, mixup, mixup_target_loss, supervised_loss
from kdlab.methods.base import BaseMethod
from kdlab.models.build import model_inputs
from kdlab.validation import NonNegative, Positive, Probability


class MixKD(BaseMethod):
    """Student learns from the teacher and the labels on mixed pairs of examples.

    Only sequence classification is supported (span tasks are refused at build time, see
    the module docstring for why).

    Args:
        alpha: concentration ``α`` of ``λ ~ Beta(α, α)``.
        alpha_sm: weight of ``L_SM`` (student on mixed inputs vs mixed labels).
        alpha_tmkd: weight of ``L_TMKD`` (student vs teacher on mixed inputs).
        temperature: softening temperature ``T`` of the KL terms.
        kd_alpha: weight of the teacher term of standard KD on the original examples
            (``0`` keeps plain cross-entropy and skips that teacher pass).
        **base: see :class:`~kdlab.methods.base.BaseMethod`.
    """

    supported_heads = frozenset({"sequence_classification"})
    uncacheable_teacher = "method=mixkd runs the teacher on mixed inputs drawn anew at each step"
    unsupported_head_hint = (
        "mixing the start/end positions of two unrelated contexts names no span, so MixKD "
        "is not defined for span tasks; use method=kd there"
    )

    def __init__(
        self,
        *,
        alpha: Positive = 0.4,
        alpha_sm: NonNegative = 1.0,
        alpha_tmkd: NonNegative = 1.0,
        temperature: Positive = 2.0,
        kd_alpha: Probability = 0.0,
        **base,
    ) -> None:
        super().__init__(**base)
        self.alpha = alpha
        self.alpha_sm = alpha_sm
        self.alpha_tmkd = alpha_tmkd
        self.temperature = temperature
        self.kd_alpha = kd_alpha

    def sample_mixing(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Partners ``perm`` (a random permutation) and weights ``λ ~ Beta(α, α)``, each ``[B]``."""
        perm = torch.randperm(batch_size, device=device)
        concentration = torch.tensor(float(self.alpha))
        lam = torch.distributions.Beta(concentration, concentration).sample((batch_size,))
        return perm, lam.to(device)

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs = model_inputs(batch)
        labels = batch["labels"]
        student_logits = self.student(**inputs).logits
        if self.kd_alpha > 0:
            teacher_logits = self.teacher_outputs(batch).logits
            losses = kd_loss(
                student_logits, teacher_logits, labels, self.kd_alpha, self.temperature
            )
        else:
            ce = supervised_loss(student_logits, labels)
            losses = {"loss": ce, "ce": ce}
        if self.alpha_sm == 0 and self.alpha_tmkd == 0:
            return losses

        perm, lam = self.sample_mixing(labels.size(0), labels.device)
        mixed_logits = mixed_forward(self.student, inputs, perm, lam).logits
        total = losses["loss"]
        if self.alpha_sm > 0:
            losses["sm"] = mixup_target_loss(mixed_logits, labels, perm, lam)
            total = total + self.alpha_sm * losses["sm"]
        if self.alpha_tmkd > 0:
            with torch.no_grad():
                teacher_mixed = mixed_forward(self.teacher, inputs, perm, lam).logits
            losses["tmkd"] = distillation_loss(mixed_logits, teacher_mixed, self.temperature)
            total = total + self.alpha_tmkd * losses["tmkd"]
        losses["loss"] = total
        losses["lambda"] = lam.mean()
        return losses


def mixed_forward(model: PreTrainedModel, inputs: dict[str, Tensor], perm: Tensor, lam: Tensor):
    """``model``'s outputs on the mixup of each example with its partner ``perm[i]``.

    The model mixes rows of its own word-embedding table and reads them as
    ``inputs_embeds``; token-type embeddings are mixed with the same ``λ`` (see
    :func:`mixed_token_types`); the attention mask is the element-wise max of the pair's.
    Position embeddings are the same for both members and need no mixing.
    """
    mixed = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mixed["inputs_embeds"] = mixup(model.get_input_embeddings()(inputs["input_ids"]), perm, lam)
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        mixed["attention_mask"] = torch.maximum(mask, mask[perm])
    with mixed_token_types(model, perm, lam):
        return model(**mixed)


@contextlib.contextmanager
def mixed_token_types(model: PreTrainedModel, perm: Tensor, lam: Tensor) -> Iterator[None]:
    """Within the block, the model's token-type embeddings come out mixed like the words.

    ``inputs_embeds`` replaces only the word embeddings; BERT-style models add the
    token-type embedding of ``token_type_ids`` inside. A forward hook replaces that output
    ``T[t]`` by ``λ · T[t_i] + (1 − λ) · T[t_j]``, which keeps the sum exact (no
    subtract-and-add of ``T[0]``). Models without token types are left as they are.
    """
    table = _token_type_embeddings(model)
    if table is None:
        yield
        return

    def mix_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return mixup(output, perm, lam)

    handle = table.register_forward_hook(mix_output)
    try:
        yield
    finally:
        handle.remove()


def _token_type_embeddings(model: PreTrainedModel) -> nn.Embedding | None:
    embeddings = getattr(model.base_model, "embeddings", None)
    return getattr(embeddings, "token_type_embeddings", None)
