"""MixKD: distillation on mixup of word embeddings (Liang et al., "MixKD: Towards Efficient
Distillation of Large-scale Language Models", ICLR 2021).

Each example ``i`` of a training batch is paired with ``j = perm[i]`` of a random
permutation of the batch, with ``λ_i ~ Beta(α, α)``. Teacher and student each mix their
*own* word embeddings, ``ẽ_i = λ_i · E[x_i] + (1 − λ_i) · E[x_j]`` (token-type embeddings of
sentence pairs alike), and read the mixed sequence through ``inputs_embeds`` with the
attention mask ``max(m_i, m_j)``. The loss is

``L = L_CE(f_s(x), y) + α_SM · CE(f_s(x̃), λ·y_i + (1 − λ)·y_j)
+ α_TMKD · T² · KL(softmax(f_t(x̃)/T) ‖ softmax(f_s(x̃)/T))``

and for regression (STS-B) both mixed terms are MSE, against the mixed target and against
the teacher's output. ``alpha_sm=0`` / ``alpha_tmkd=0`` are the paper's ablations;
``kd_alpha > 0`` replaces ``L_CE`` by standard KD on the original examples
(:func:`~kdlab.losses.kd_loss`). Logged terms: ``ce`` (or ``ce`` and ``kd``), ``sm``,
``tmkd`` and ``lambda`` (the mean of ``λ`` over this process's examples).

The draws: ``perm`` and ``λ`` come from a generator seeded with the run seed and the
batch's position (epoch, batch index in the epoch), not from the global random state, so a
resumed run draws what an uninterrupted one did without any generator state in its
checkpoint.

Partners are drawn within the batch, so with ``task.group_by_length`` (each optimizer
step's examples of similar length, :class:`~kdlab.data.base.EpochSeededSampler`) examples
of similar lengths pair up: the mask ``max(m_i, m_j)`` of a mixed sequence then covers
little more than either example, and the mixed batch pads as little as the batch does.
Without grouping a short sentence is as likely to be mixed with a long one as with another
short one.

Under DDP they are drawn as one device draws them, for the whole batch of W processes:
every process draws the same ``perm`` and ``λ`` over the ``W × B`` examples, in the order
one device holds them (process ``r``'s ``k``-th example is example ``k·W + r``, see
:class:`~kdlab.data.base.EpochSeededSampler`), and mixes its own examples with their
partners wherever those are. Their token ids, masks, token types and labels (integers, no
gradient) are gathered from all processes, padded to the longest sequence as one device's
batch is; each process embeds its partners with its own replica of the embedding table, so
the gradients reach every row they touch, and DDP's average of the processes' gradients,
each the gradient of the mean over ``B`` examples, is the gradient of the mean over the
``W × B`` examples on one device.

With a teacher that tokenises differently from the student (each example tokenised by
both, the teacher's ids under ``teacher_*`` keys, :mod:`kdlab.data.classification`), the
pairs are those of the examples, not of token sequences: example ``i`` is mixed with the
same partner ``j = perm[i]`` and the same ``λ_i`` in both models, each of which mixes its
own embeddings of its own tokenisation, ``ẽ_i = λ_i · E_s[x_i^s] + (1 − λ_i) · E_s[x_j^s]``
for the student and ``λ_i · E_t[x_i^t] + (1 − λ_i) · E_t[x_j^t]`` for the teacher. The two
sequences of an example differ in length; each set is padded to its own longest sequence
(as the collator pads it), so position ``k`` mixes the ``k``-th tokens of ``x_i`` and
``x_j`` in each model's own tokenisation, as it does with one tokenizer.

Span tasks (``task.head`` other than sequence classification) are refused: start/end
positions are indices into two unrelated question–passage sequences whose tokens are not
aligned (token ``t`` of ``x_i`` and of ``x_j`` are different words), so a mix of the two
one-hot position targets names no span of the mixed sequence and ``L_SM`` has no meaning;
the teacher term alone would match position logits over an input that has no answer.
"""

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdlab.data.base import TEACHER_INPUT_IDS, TEACHER_INPUTS_PREFIX
from kdlab.losses import distillation_loss, kd_loss, mixup, mixup_target_loss, supervised_loss
from kdlab.methods.base import BaseMethod
from kdlab.methods.traits import MethodTraits
from kdlab.models.heads import MODEL_INPUTS, model_inputs, teacher_inputs
from kdlab.validation import NonNegative, NonNegativeInt, Positive, Probability


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
        seed: seed of the partners and ``λ`` (the run's ``seed``); each batch draws from
            it and its position in training.
        **base: see :class:`~kdlab.methods.base.BaseMethod`.
    """

    traits = MethodTraits(
        supported_heads=frozenset({"sequence_classification"}),
        unsupported_head_hint=(
            "mixing the start/end positions of two unrelated contexts names no span, so MixKD "
            "is not defined for span tasks; use method=kd there"
        ),
        why_teacher_uncacheable=(
            "method=mixkd runs the teacher on mixed inputs drawn anew at each step"
        ),
    )

    def __init__(
        self,
        *,
        alpha: Positive = 0.4,
        alpha_sm: NonNegative = 1.0,
        alpha_tmkd: NonNegative = 1.0,
        temperature: Positive = 2.0,
        kd_alpha: Probability = 0.0,
        seed: NonNegativeInt = 0,
        **base,
    ) -> None:
        super().__init__(**base)
        self.alpha = alpha
        self.alpha_sm = alpha_sm
        self.alpha_tmkd = alpha_tmkd
        self.temperature = temperature
        self.kd_alpha = kd_alpha
        self.seed = seed
        # (epoch, index in the epoch) of the batch being trained; Lightning restores both
        # on resume, as it restores the data order they index.
        self.batch_position = (0, 0)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> int | None:
        self.batch_position = (self.current_epoch, batch_idx)
        return super().on_train_batch_start(batch, batch_idx)

    def sample_mixing(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Partners and weights of a batch of ``batch_size`` (all processes' examples).

        A function of ``seed`` and :attr:`batch_position` alone: the same on every process
        and in a resumed run.

        Returns:
            ``perm`` (a random permutation) and fp32 ``λ ~ Beta(α, α)``, each
            ``[batch_size]`` on the CPU.
        """
        rng = np.random.default_rng([self.seed, *self.batch_position])
        perm = torch.from_numpy(rng.permutation(batch_size))
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, batch_size)).float()
        return perm, lam

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        labels = batch["labels"]
        student_logits = self.student(**model_inputs(batch, self.student)).logits
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

        own, partners, lam = self.pair_examples(batch)
        mixed_logits = mixed_forward(self.student, own, partners, lam).logits
        total = losses["loss"]
        if self.alpha_sm > 0:
            losses["sm"] = mixup_target_loss(mixed_logits, own["labels"], partners["labels"], lam)
            total = total + self.alpha_sm * losses["sm"]
        if self.alpha_tmkd > 0:
            with torch.no_grad():
                teacher_mixed = mixed_forward(
                    self.teacher, teacher_inputs(own), teacher_inputs(partners), lam
                ).logits
            losses["tmkd"] = distillation_loss(mixed_logits, teacher_mixed, self.temperature)
            total = total + self.alpha_tmkd * losses["tmkd"]
        losses["loss"] = total
        losses["lambda"] = lam.mean()
        return losses

    def pair_examples(
        self, batch: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """This process's examples, their partners and their ``λ``, drawn for the whole
        batch of all processes (see the module docstring).

        Returns:
            ``own`` and ``partners``: model inputs (``[B, L]``, ``L`` the longest sequence
            of all processes; the teacher's own inputs too where the batch has them, ``[B,
            L_t]``) and ``labels`` of this process's examples and of their partners, row
            for row; ``λ``: ``[B]`` fp32. All on the batch's device.
        """
        whole = self.whole_batch(batch)
        size = whole["labels"].size(0)
        perm, lam = self.sample_mixing(size)
        world, rank = (self.trainer.world_size, self.global_rank) if self.distributed else (1, 0)
        # This process's examples: every world-th of the whole batch, from its rank on.
        rows = torch.arange(rank, size, world)
        device = batch["labels"].device
        own, partners = rows.to(device), perm[rows].to(device)
        return (
            {k: v[own] for k, v in whole.items()},
            {k: v[partners] for k, v in whole.items()},
            lam[rows].to(device),
        )

    def whole_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model inputs and labels of all processes' examples, in the order one device
        with the whole batch holds them; on a single process, ``batch``'s own.

        Under DDP a collective: every process calls it. Sequences are padded to the longest
        of all processes, with the model's pad token as the collator pads (input ids) or 0
        (masks, token types), and gathered on the batch's device (NCCL takes nothing else).
        The teacher's own inputs (``teacher_*``), where the batch has them, are padded alike
        to their own longest sequence, with the teacher's pad token.
        """
        # The student's inputs, and the teacher's with its own tokenizer, each with the pad id
        # of the model that reads them.
        id_sets = {"": self.student}
        if TEACHER_INPUT_IDS in batch:
            id_sets[TEACHER_INPUTS_PREFIX] = self.teacher
        inputs = [prefix + k for prefix in id_sets for k in MODEL_INPUTS]
        local = {k: batch[k] for k in (*inputs, "labels") if k in batch}
        if not self.distributed:
            return local
        # One collective for the lengths of every id set: [W, sets].
        lengths = [batch[prefix + "input_ids"].size(1) for prefix in id_sets]
        device = batch["input_ids"].device
        gathered_lengths = self.all_gather(torch.tensor(lengths, device=device))
        longest_of = gathered_lengths.view(-1, len(lengths)).max(0).values.tolist()
        padded = dict(local)
        for (prefix, model), length, longest in zip(
            id_sets.items(), lengths, longest_of, strict=True
        ):
            pad_id = model.config.pad_token_id or 0
            for k in MODEL_INPUTS:
                if prefix + k in padded:
                    value = pad_id if k == "input_ids" else 0
                    padded[prefix + k] = F.pad(
                        local[prefix + k], (0, longest - length), value=value
                    )
        # [W, B, ...] by process; process r's k-th example is example k·W + r of one device.
        gathered = self.all_gather(padded)
        return {k: v.transpose(0, 1).flatten(0, 1) for k, v in gathered.items()}


def mixed_forward(
    model: PreTrainedModel, inputs: dict[str, Tensor], partners: dict[str, Tensor], lam: Tensor
):
    """``model``'s outputs on the mixup of each example with its partner.

    The model mixes rows of its own word-embedding table and reads them as
    ``inputs_embeds``; token-type embeddings are mixed with the same ``λ`` (see
    :func:`mixed_token_types`); the attention mask is the element-wise max of the pair's.
    Position embeddings are the same for both members and need no mixing.

    Args:
        model: a model of any family (its input embeddings mix before any projection, e.g.
            ELECTRA's embedding-to-hidden one).
        inputs: the examples' ``input_ids`` (and ``attention_mask``, ``token_type_ids``),
            ``[B, L]`` each; other keys, and token types the model does not embed
            (:func:`model_inputs`), are ignored.
        partners: their partners' inputs, row ``i`` mixed with row ``i`` of ``inputs``.
        lam: ``[B]`` weights of ``inputs`` (``1 − λ`` goes to the partners).
    """
    inputs, partners = model_inputs(inputs, model), model_inputs(partners, model)
    embed = model.get_input_embeddings()
    mixed = {"inputs_embeds": mixup(embed(inputs["input_ids"]), embed(partners["input_ids"]), lam)}
    if "attention_mask" in inputs:
        mixed["attention_mask"] = torch.maximum(
            inputs["attention_mask"], partners["attention_mask"]
        )
    if "token_type_ids" in inputs:
        mixed["token_type_ids"] = inputs["token_type_ids"]
    with mixed_token_types(model, partners.get("token_type_ids"), lam):
        return model(**mixed)


@contextlib.contextmanager
def mixed_token_types(
    model: PreTrainedModel, partner_types: Tensor | None, lam: Tensor
) -> Iterator[None]:
    """Within the block, the model's token-type embeddings come out mixed like the words.

    ``inputs_embeds`` replaces only the word embeddings; BERT-style models add the
    token-type embedding of ``token_type_ids`` inside. A forward hook replaces that output
    ``T[t_i]`` by ``λ · T[t_i] + (1 − λ) · T[t_j]`` (``t_j``: ``partner_types``, ``[B, L]``),
    which keeps the sum exact (no subtract-and-add of ``T[0]``). Models without token types,
    and batches without them (all type 0 alike), are left as they are.
    """
    table = _token_type_embeddings(model)
    if table is None or partner_types is None:
        yield
        return

    def mix_output(module: nn.Embedding, args: tuple, output: Tensor) -> Tensor:
        return mixup(output, module.weight[partner_types], lam)

    handle = table.register_forward_hook(mix_output)
    try:
        yield
    finally:
        handle.remove()


def _token_type_embeddings(model: PreTrainedModel) -> nn.Embedding | None:
    embeddings = getattr(model.base_model, "embeddings", None)
    return getattr(embeddings, "token_type_embeddings", None)
