"""HomoDistil (Liang et al., "HomoDistil: Homotopic Task-Agnostic Distillation of
Pre-trained Transformers", ICLR 2023).

The student starts as a copy of the teacher and is pruned step by step (``pruning=``,
PLATON importance and a cubic schedule) while it is distilled on a masked-LM corpus, so the
teacher–student discrepancy stays small throughout. Each step both see the same masked
batch and::

    L = α_mlm·L_MLM + α_kl·KL(p_t ‖ p_s)          (masked positions, temperature T)
        + α_hidden·Σ_k MSE(H_t^k, H_s^k)         (k = 1..L, kept hidden dimensions)
        + α_attn·Σ_k MSE(A_t^k, A_s^k)           (kept heads)
        + α_emb·MSE(H_t^0, H_s^0)                (embedding output)

The student's hidden states are compared with the teacher's through the kept-dimension
selection (the student starts as the teacher, so dimension i is the same feature in both).
"""

from typing import ClassVar

from omegaconf import DictConfig
from torch import Tensor

from kdlab.errors import ConfigError
from kdlab.losses import masked_mse, matching_loss, task_loss
from kdlab.methods.base import BaseMethod, model_inputs
from kdlab.pruning.masks import installed_masks
from kdlab.validation import NonNegative, Positive

_TERMS = ("mlm", "kl", "hidden", "attn", "emb")


class HomoDistil(BaseMethod):
    """Distillation with iterative structured pruning of a teacher copy.

    Args:
        alpha_mlm: weight of the student's own masked-LM loss.
        alpha_kl: weight of KL(teacher ‖ student) over the vocabulary at masked positions.
        alpha_hidden: weight of the per-layer hidden-state MSE (summed over layers).
        alpha_attn: weight of the per-layer attention-map MSE (summed over layers).
        alpha_emb: weight of the embedding-output MSE.
        temperature: softening temperature of the KL term.
        **base: see :class:`~kdlab.methods.base.BaseMethod`; the student must be pruned
            (``pruning=``), so that its masks say which structures are kept.
    """

    requires_pruning = True
    teacher_head_hint: ClassVar[str] = (
        "or distil representations only, without the MLM head: method.alpha_mlm=0 method.alpha_kl=0"
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
        if installed_masks(student) is None:
            raise ConfigError(
                "method=homodistil distils into a pruned student: set pruning=homotopic."
            )
        if student.config.num_hidden_layers != teacher.config.num_hidden_layers:
            raise ConfigError(
                "method=homodistil: the student must be a copy of the teacher (same depth); "
                "use a pruned preset (model=minilm_half, model=pruned, model=tiny|...)."
            )
        if alpha_attn > 0:
            # The SDPA kernels return no attention probabilities.
            student.set_attn_implementation("eager")
            teacher.set_attn_implementation("eager")

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs = model_inputs(batch)
        w = self.weights
        options = {
            "output_hidden_states": w["hidden"] > 0 or w["emb"] > 0,
            "output_attentions": w["attn"] > 0,
        }
        teacher = self.teacher_outputs(inputs, **options)
        student = self.student(**inputs, **options)
        masks = installed_masks(self.student)
        terms: dict[str, Tensor] = {}
        if w["mlm"] > 0:
            terms["mlm"] = task_loss(self.logits(student), self.targets(batch))
        if w["kl"] > 0:
            terms["kl"] = matching_loss(
                self.logits(student), self.logits(teacher), self.targets(batch), self.temperature
            )
        if w["emb"] > 0:
            terms["emb"] = masked_mse(
                student.hidden_states[0], teacher.hidden_states[0], masks.hidden
            )
        if w["hidden"] > 0:
            terms["hidden"] = sum(
                masked_mse(s, t, masks.hidden)
                for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True)
            )
        if w["attn"] > 0:
            terms["attn"] = sum(
                masked_mse(s, t, masks.heads[k][:, None, None])
                for k, (s, t) in enumerate(zip(student.attentions, teacher.attentions, strict=True))
            )
        loss = sum(w[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}
