"""HomoDistil (Liang et al., "HomoDistil: Homotopic Task-Agnostic Distillation of
Pre-trained Transformers", ICLR 2023).

The student starts as a copy of the teacher and is pruned step by step (``pruning=``,
PLATON importance and a cubic schedule) while it is distilled on a masked-LM corpus, so the
teacher–student discrepancy stays small throughout. Each step both see the same masked
batch and::

    L = α_mlm·L_MLM + α_kl·KL(p_t ‖ p_s)          (masked positions, temperature T, ×T²)
        + α_hidden·Σ_k MSE(H_t^k, H_s^k·W_k)     (k = 1..L, real tokens)
        + α_attn·Σ_k MSE(A_t^k, A_s^k)           (kept heads, real query and key tokens)
        + α_emb·MSE(H_t^0, H_s^0·W_0)            (embedding output, real tokens)

Real tokens are those of the attention mask: padded positions carry no signal and would
otherwise weigh in proportion to the padding of the batch.

``W_k`` (``hidden_projection``):

- ``select`` (default): the kept-dimension selection. The student starts as the teacher,
  so its dimension i is the teacher's dimension i; the MSE runs over real tokens × the
  student's kept dimensions.
- ``linear``: a learnable map, one per compared layer, from the student's hidden states to
  the teacher's full width, initialised to the selection (the identity) and trained with
  the student; the MSE runs over real tokens × all teacher dimensions, so the map can
  learn to reconstruct the teacher's pruned dimensions from the kept ones. It is an
  H × H matrix over the student's *full* (unpruned) width rather than H' × H over the kept
  dimensions: pruned dimensions of the student are exactly zero, so their columns do
  nothing (and get no gradient) and the map equals an H' × H one on the kept dimensions,
  while the kept set changes at every mask update without resizing a parameter or its
  optimizer state. The maps belong to the method, not to the student: exports leave them
  out.

Attention maps are compared *before* attention dropout. ``transformers``' eager attention
applies dropout functionally to the probabilities and returns the dropped ones (rows then
sum to 0.7–1.1, and an MSE against them pulls the student towards flatter maps: the
dropout noise adds ``p/(1−p)·A²`` to it in expectation). The student runs a registered copy
of the eager attention (:data:`PRE_DROPOUT_ATTENTION`) that still mixes the values with the
dropped probabilities but returns the undropped ones. That keeps the student's training
exactly as it was (attention dropout is part of BERT's regularisation, and switching it
off for the whole run would change what is trained, not only what is measured) at no
extra cost. The implementation name is not serialised in ``config.json``, so exported
students load with the stock defaults. The SDPA kernels return no probabilities at all.
A family whose attention is its own module rather than ``AttentionInterface`` reads its
probabilities before dropout its own way
(:meth:`kdlab.families.Family.attentions_before_dropout`; DeBERTa's hooks its dropout).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kdlab.errors import ConfigError
from kdlab.families import family_of
from kdlab.losses import attention_mse, hidden_mse, matching_loss, task_loss
from kdlab.methods.base import BaseMethod
from kdlab.methods.traits import MethodTraits
from kdlab.models.heads import model_inputs
from kdlab.pruning.masks import StructuredMasks, installed_masks
from kdlab.validation import NonNegative, Positive

_TERMS = ("mlm", "kl", "hidden", "attn", "emb")

# Name of the attention implementation that returns probabilities before dropout.
PRE_DROPOUT_ATTENTION = "kdlab_eager_pre_dropout"
PROJECTIONS = ("select", "linear")


def eager_attention_pre_dropout(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """BERT's eager attention, returning the attention probabilities before dropout.

    The same operations as ``transformers``' ``eager_attention_forward`` (so in eval mode,
    or with ``dropout=0``, both give identical results); dropout still applies to the
    probabilities that mix the values.

    Args:
        module: the self-attention module (its ``training`` flag switches dropout).
        query: ``[B, A, T, d]``.
        key: ``[B, A, S, d]``.
        value: ``[B, A, S, d]``.
        attention_mask: additive ``[B, 1, T, S]`` mask (``-inf``-like on padding) or None.
        scaling: score scale, ``d^-1/2`` by default.
        dropout: attention dropout probability (0 outside training).

    Returns:
        Context ``[B, T, A, d]`` and probabilities ``[B, A, T, S]`` before dropout.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    mixing = F.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(mixing, value).transpose(1, 2).contiguous()
    return context, probs


AttentionInterface.register(PRE_DROPOUT_ATTENTION, eager_attention_pre_dropout)
# An implementation without a registered mask builder gets no attention mask at all
# (padding would be attended to): it takes eager's additive mask.
AttentionMaskInterface.register(PRE_DROPOUT_ATTENTION, eager_mask)


def identity_projections(width: int, layers: list[int]) -> nn.ModuleDict:
    """One bias-free ``width × width`` linear map per hidden-state index in ``layers``
    (0 = embeddings), keyed by the index as a string, each initialised to the identity."""
    projections = nn.ModuleDict()
    for k in layers:
        linear = nn.Linear(width, width, bias=False)
        nn.init.eye_(linear.weight)
        projections[str(k)] = linear
    return projections


class HomoDistil(BaseMethod):
    """Distillation with iterative structured pruning of a teacher copy.

    Args:
        alpha_mlm: weight of the student's own masked-LM loss.
        alpha_kl: weight of KL(teacher ‖ student) over the vocabulary at masked positions.
        alpha_hidden: weight of the per-layer hidden-state MSE (summed over layers).
        alpha_attn: weight of the per-layer attention-map MSE (summed over layers).
        alpha_emb: weight of the embedding-output MSE.
        temperature: softening temperature of the KL term.
        hidden_projection: how student hidden states meet the teacher's: ``select`` (kept
            dimensions) or ``linear`` (learnable maps to the teacher's width, initialised
            to the selection; see the module docstring).
        **base: see :class:`~kdlab.methods.base.BaseMethod`; the student must be pruned
            (``pruning=``), so that its masks say which structures are kept.
    """

    traits = MethodTraits(
        requires_pruning=True,
        teacher_head_hint=(
            "or distil representations only, without the MLM head: method.alpha_mlm=0 "
            "method.alpha_kl=0"
        ),
        why_teacher_uncacheable=(
            "method=homodistil reads the teacher's hidden states and attention maps on "
            "batches masked at random each epoch"
        ),
        why_one_tokenisation=(
            "method=homodistil matches the teacher's hidden states and attention maps token "
            "by token"
        ),
    )

    @classmethod
    def needs_teacher_head(cls, method_cfg: DictConfig) -> bool:
        """The MLM and KL terms need a trained MLM head; the representation terms do not."""
        return method_cfg.get("alpha_mlm", 1.0) > 0 or method_cfg.get("alpha_kl", 1.0) > 0

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Some term must have a positive weight (besides the base class's rules)."""
        super().check_config(cfg)
        if not any(cfg.method.get(f"alpha_{term}", 1.0) for term in _TERMS):
            raise ConfigError(
                "method=homodistil: every method.alpha_* is 0, so nothing would train; set at "
                "least one of " + ", ".join(f"method.alpha_{t}" for t in _TERMS) + " above 0."
            )

    def __init__(
        self,
        *,
        alpha_mlm: NonNegative = 1.0,
        alpha_kl: NonNegative = 1.0,
        alpha_hidden: NonNegative = 1.0,
        alpha_attn: NonNegative = 1.0,
        alpha_emb: NonNegative = 1.0,
        temperature: Positive = 1.0,
        hidden_projection: Literal[tuple(PROJECTIONS)] = "select",
        **base,
    ) -> None:
        super().__init__(**base)
        student, teacher = self.student, self.teacher
        self.weights = {
            "mlm": alpha_mlm,
            "kl": alpha_kl,
            "hidden": alpha_hidden,
            "attn": alpha_attn,
            "emb": alpha_emb,
        }
        self.temperature = temperature
        self._check_models(student, teacher)
        self.projections = None
        if hidden_projection == "linear":
            # Only the maps a term uses: an unused parameter stalls DDP's gradient reduction.
            layers = [0] if alpha_emb > 0 else []
            if alpha_hidden > 0:
                layers += list(range(1, student.config.num_hidden_layers + 1))
            self.projections = identity_projections(student.config.hidden_size, layers)
        if alpha_attn > 0:
            # The SDPA kernels return no attention probabilities; the student's are read
            # before dropout (module docstring), the teacher runs in eval mode.
            family_of(student.config).attentions_before_dropout(student, PRE_DROPOUT_ATTENTION)
            teacher.set_attn_implementation("eager")

    @property
    def masks(self) -> StructuredMasks:
        """The student's pruning masks (installed by the ``pruning`` component)."""
        return installed_masks(self.student)

    def _check_models(self, student, teacher) -> None:
        if installed_masks(student) is None:
            raise ConfigError(
                "method=homodistil distils into a pruned student: set pruning=homotopic."
            )
        s, t = student.config, teacher.config
        if (s.num_hidden_layers, s.hidden_size) != (t.num_hidden_layers, t.hidden_size):
            raise ConfigError(
                "method=homodistil: the student must be a copy of the teacher (same depth and "
                "width); use a pruned preset (model=minilm_half, model=pruned, model=tiny|...)."
            )

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w = self.weights
        options = {
            "output_hidden_states": w["hidden"] > 0 or w["emb"] > 0,
            "output_attentions": w["attn"] > 0,
        }
        if w["mlm"] > 0 or w["kl"] > 0:
            teacher = self.teacher_outputs(batch, **options)
            student = self.forward_model(self.student, batch, **options)
        else:  # representations only: the MLM heads are not run at all
            with torch.no_grad():
                teacher = self.teacher.base_model(**model_inputs(batch, self.teacher), **options)
            student = self.student.base_model(**model_inputs(batch, self.student), **options)
        # [B, T]: 1 on real tokens (a batch without a mask has no padding).
        tokens = batch.get("attention_mask")
        if tokens is None:
            tokens = torch.ones_like(batch["input_ids"])
        terms: dict[str, Tensor] = {}
        if w["mlm"] > 0:
            terms["mlm"] = task_loss(self.logits(student), self.targets(batch))
        if w["kl"] > 0:
            terms["kl"] = matching_loss(
                self.logits(student), self.logits(teacher), self.temperature
            )
        hidden_s, hidden_t = student.hidden_states, teacher.hidden_states
        if w["emb"] > 0:
            terms["emb"] = self.hidden_term(0, hidden_s[0], hidden_t[0], tokens)
        if w["hidden"] > 0:
            terms["hidden"] = sum(
                self.hidden_term(k, hidden_s[k], hidden_t[k], tokens)
                for k in range(1, len(hidden_s))
            )
        if w["attn"] > 0:
            heads = self.masks.heads
            terms["attn"] = sum(
                attention_mse(s, t, tokens, heads[k])
                for k, (s, t) in enumerate(zip(student.attentions, teacher.attentions, strict=True))
            )
        terms = self.weigh_terms(terms, batch, tokens)
        loss = sum(w[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}

    def weigh_terms(
        self, terms: dict[str, Tensor], batch: dict[str, Tensor], tokens: Tensor
    ) -> dict[str, Tensor]:
        """The terms weighted for DDP (:meth:`~kdlab.methods.base.BaseMethod.rank_weights`)
        by the entries each averages: MLM and KL the masked tokens (the head's rows), the
        hidden-state terms the real tokens, the attention term the pairs of real tokens
        (kept dimensions and heads are the same on every process).

        Args:
            terms: the loss terms by name.
            batch: the batch they were computed on.
            tokens: ``[B, T]`` its attention mask.
        """
        if not self.distributed:  # one process: the means are already over every entry
            return terms
        per_example = tokens.sum(1)
        real = per_example.sum()
        counts = {
            # torch.full, not torch.tensor: a copy from the host would wait for the GPU.
            "mlm": torch.full((), self.target_rows(batch), device=tokens.device),
            "hidden": real,
            "emb": real,
            "attn": per_example.square().sum(),
        }
        counts["kl"] = counts["mlm"]
        weights = self.rank_weights(torch.stack([counts[name] for name in terms]))
        return {
            name: value * weight
            for (name, value), weight in zip(terms.items(), weights, strict=True)
        }

    def hidden_term(self, k: int, student: Tensor, teacher: Tensor, tokens: Tensor) -> Tensor:
        """``MSE(H_t^k, H_s^k·W_k)`` over real tokens: the kept dimensions (``select``) or
        the teacher's full width through the learnable map (``linear``).

        Args:
            k: hidden-state index, 0 for the embedding output.
            student: ``[B, T, H]`` (zeros on pruned dimensions).
            teacher: ``[B, T, H]``.
            tokens: ``[B, T]`` attention mask.
        """
        if self.projections is None:
            return hidden_mse(student, teacher, tokens, self.masks.hidden)
        return hidden_mse(self.projections[str(k)](student), teacher, tokens)
