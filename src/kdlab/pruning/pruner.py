"""The pruning component: importance, schedule and masks of one student, step by step.

Scores follow PLATON (Zhang et al., ICML 2022): per parameter ``Ī · Ū`` with
``Ī ← β1·Ī + (1−β1)·|θ ⊙ ∇θ L|`` and ``Ū ← β2·Ū + (1−β2)·|s − Ī|``, updated every step or
once per mask-update window (``score_window``, see :mod:`kdlab.pruning.importance`); a
structure's score is the sum over its parameters. The lowest-scoring structures are masked
as the schedule lowers the kept fraction; pruned structures stay pruned. As in the PLATON
authors' code, ``∇θ L`` is the gradient an optimizer step used (after clipping) and ``θ`` the
weights that step produced (:class:`~kdlab.pruning.callback.PruningCallback`).

A step whose gradients are not finite (an overflowed fp16 step, which the grad scaler
skips too) leaves the scores untouched and is counted in ``skipped_updates``.
"""

from typing import Literal

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdlab.errors import ConfigError
from kdlab.pruning.compaction import compacted_parameter_count
from kdlab.pruning.importance import PlatonImportance, all_finite
from kdlab.pruning.masks import NO_TARGET, PruneTarget, StructuredMasks, check_target
from kdlab.pruning.schedule import SCHEDULES
from kdlab.validation import NonNegativeInt, PositiveInt, Probability


class Pruner(nn.Module):
    """Prunes ``model`` in place (through masks) towards ``target``.

    Heads and hidden dimensions shrink together (hidden = heads × head size at every
    update), so a checkpoint compacts to a stock ``BertConfig`` at any point of the run.
    The ``pruning`` config group builds it; :class:`kdlab.pruning.callback.PruningCallback`
    drives it during training.

    Args:
        model: the student; masks are installed into its forward pass.
        target: ``{hidden_size, num_attention_heads, intermediate_size}`` of the result.
        schedule: ``cubic`` or ``oneshot``.
        initial_warmup: ``t_i / T``, fraction of training steps before pruning starts.
        final_warmup: ``t_f / T``, fraction of steps at the end trained at the final shape.
        update_interval: ``ΔT``, steps between mask updates.
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty (1 = plain sensitivity).
        track_interval: steps between teacher–student discrepancy measurements, 0 for
            none. The Pruner only stores it: measuring is the training hooks' business
            (they read it, call :meth:`record` and write the history), as is step 0's row,
            which they record whatever the interval.
        score_window: update the importance EMAs once per ``update_interval`` window from
            the window's mean sensitivity (the PLATON authors' code) instead of every step.

    Attributes:
        skipped_updates: importance updates skipped for non-finite gradients (carried by
            checkpoints through :meth:`extra_state`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        target: PruneTarget | None,
        schedule: Literal[tuple(SCHEDULES)] = "cubic",
        initial_warmup: Probability = 0.1,
        final_warmup: Probability = 0.3,
        update_interval: PositiveInt = 10,
        beta1: Probability = 0.85,
        beta2: Probability = 0.95,
        track_interval: NonNegativeInt = 50,
        score_window: bool = False,
    ) -> None:
        super().__init__()
        self.masks = StructuredMasks.for_model(model)
        self.full = {"heads": self.masks.heads.size(1), "ffn": self.masks.ffn.size(1)}
        self.target = check_target(model.config, target)
        self.schedule = SCHEDULES[schedule]
        self.initial_warmup = initial_warmup
        self.final_warmup = final_warmup
        self.update_interval = update_interval
        self.track_interval = track_interval
        self.importance = PlatonImportance(beta1, beta2, window=score_window)
        self.skipped_updates = 0
        self.params = [(n, p) for n, p in model.named_parameters() if n in self.masks.axes]
        self.full_params = sum(p.numel() for p in model.parameters())
        # (step, kl or None, remaining parameter fraction, parameters) rows for the plot.
        self.history: list[dict] = []
        self.masks.install(model)
        object.__setattr__(self, "_model", model)  # not a submodule: the student is elsewhere

    def _apply(self, fn, recurse: bool = True):
        # The importance averages are plain tensors (not buffers): move them with the masks.
        super()._apply(fn, recurse)
        self.importance.apply(fn)
        return self

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """A target must be set, and the warm-ups must leave steps to prune in."""
        pruning = cfg.pruning
        if pruning.target is None:
            raise ConfigError(NO_TARGET)
        if pruning.initial_warmup + pruning.final_warmup >= 1:
            raise ConfigError(
                f"pruning.initial_warmup={pruning.initial_warmup} + pruning.final_warmup="
                f"{pruning.final_warmup} must be less than 1 (fractions of the training steps)."
            )

    # ----------------------------------------------------------------------- schedule
    def scheduled_counts(self, step: int, total: int) -> dict[str, int]:
        """Heads and FFN neurons per layer the schedule keeps after ``step`` of ``total``."""
        initial = round(self.initial_warmup * total)
        final = round(self.final_warmup * total)
        return {
            kind: round(
                self.full[kind]
                * self.schedule(step, total, initial, final, self.target[kind] / self.full[kind])
            )
            for kind in self.full
        }

    def current_counts(self) -> dict[str, int]:
        counts = self.masks.counts()
        return {"heads": counts["heads"], "ffn": counts["ffn"]}

    @property
    def finished(self) -> bool:
        """Whether the masks have reached the target (importance is no longer needed)."""
        return self.current_counts() == self.target

    # --------------------------------------------------------------------- importance
    def accumulate(self) -> None:
        """One PLATON step from the current gradients, while pruning is not finished.

        Skipped (and counted) when any gradient it would read is not finite: one inf would
        make Ī inf and |s − Ī| NaN for good. The check costs one host sync per step.
        """
        if self.finished:
            return
        grads = [p.grad for _, p in self.params if p.grad is not None]
        if not all_finite(grads):
            self.skipped_updates += 1
            return
        self.importance.update(self.params)

    def structure_scores(self) -> dict[str, Tensor]:
        """Summed importance of every structure: ``hidden [H]``, ``heads [L, A]``, ``ffn [L, I]``.

        Each parameter entry counts once towards each structure it belongs to: an entry of
        a hidden × hidden map (pooler, MLM head transform) lies in row i and column j, and
        the diagonal entry ``[i, i]`` belongs to dimension i through both axes but is one
        parameter, so it is not counted twice.
        """
        m = self.masks
        scores = {k: torch.zeros_like(getattr(m, k)) for k in ("hidden", "heads", "ffn")}
        for name, _ in self.params:
            score = self.importance.score(name)
            if score is None:
                continue
            axes = m.axes[name]
            for a in axes:
                other = [d for d in range(score.dim()) if d != a.axis]
                per_index = score.sum(dim=other) if other else score
                # [blocks · size] -> [size]: a fused axis scores each structure in every copy.
                per_index = per_index.view(a.blocks, -1).sum(0)
                if a.kind == "hidden":
                    scores["hidden"] += per_index
                elif a.kind == "heads":
                    scores["heads"][a.layer] += per_index.view(-1, m.head_dim).sum(-1)
                else:
                    scores["ffn"][a.layer] += per_index
            if [a.kind for a in axes] == ["hidden", "hidden"]:
                scores["hidden"] -= score.diagonal()
        return scores

    # -------------------------------------------------------------------------- masks
    @torch.no_grad()
    def update(self, step: int, total: int) -> bool:
        """Prune to the scheduled counts if an update is due; returns whether masks changed.

        Updates happen every ``update_interval`` steps, and as soon as the schedule
        reaches the target so that the final shape is never missed. A due update closes
        the importance window (``score_window``) whether or not the masks change.
        """
        counts = self.scheduled_counts(step, total)
        due = step % self.update_interval == 0 or counts == self.target
        if not due:
            return False
        self.importance.end_window()
        if counts == self.current_counts():
            return False
        scores = self.structure_scores()
        m = self.masks
        current = m.counts()
        hidden = counts["heads"] * m.head_dim
        if hidden != current["hidden"]:
            _keep_top(m.hidden, scores["hidden"], hidden)
        for layer in range(m.heads.size(0)):
            if counts["heads"] != current["heads"]:
                _keep_top(m.heads[layer], scores["heads"][layer], counts["heads"])
            if counts["ffn"] != current["ffn"]:
                _keep_top(m.ffn[layer], scores["ffn"][layer], counts["ffn"])
        m.refresh()
        return True

    def parameter_count(self) -> int:
        """Parameters of the model compacted with the current masks."""
        return compacted_parameter_count(self._model, self.masks)

    def record(self, step: int, kl: float | None) -> dict:
        """Append a history row (step, discrepancy, remaining fraction, parameters)."""
        params = self.parameter_count()
        row = {"step": step, "kl": kl, "remaining": params / self.full_params, "params": params}
        self.history = [r for r in self.history if r["step"] < step] + [row]
        return row

    def extra_state(self) -> dict:
        """What checkpoints must carry besides the mask buffers."""
        return {
            "importance": self.importance.state_dict(),
            "history": self.history,
            "skipped_updates": self.skipped_updates,
        }

    def load_extra_state(self, state: dict) -> None:
        self.importance.load_state_dict(state["importance"], self.masks.hidden.device)
        self.history = list(state["history"])
        self.skipped_updates = int(state.get("skipped_updates", 0))


def _keep_top(mask: Tensor, scores: Tensor, count: int) -> None:
    """Keep the ``count`` highest-scoring entries among those still kept, in place (the
    caller refreshes the masks' cache).

    NaN scores rank below every finite one and pruned entries below everything, so that
    neither a NaN nor a tie can bring a pruned entry back.
    """
    lowest = torch.finfo(scores.dtype).min
    candidates = scores.nan_to_num(nan=lowest, neginf=lowest).masked_fill(mask == 0, float("-inf"))
    keep = candidates.topk(count).indices
    mask.zero_()
    mask[keep] = 1.0
