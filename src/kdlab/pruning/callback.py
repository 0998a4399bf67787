"""The Lightning callback that prunes the student while any method trains it.

With a ``pruning`` config the run builds a :class:`~kdlab.pruning.Pruner` for the student
(its masks go into the student's forward pass) and hands it to :class:`PruningCallback`,
which after every optimizer step feeds it the gradients that step used (accumulated,
unscaled, all-reduced and clipped) and updates the masks, measures the teacher–student
discrepancy on a fixed held-out batch every ``pruning.track_interval`` optimizer steps
(logged as ``prune/kl``, ``prune/remaining``, ``prune/params``, ``prune/skipped_updates``)
and, at the end, writes the history and its plot, which it also logs as an image
(``prune/history``) where the logger keeps images.
The method knows nothing about any of this; compaction happens where the student is
exported.
"""

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from kdlab.loggers import log_image
from kdlab.losses import matching_loss
from kdlab.pruning.pruner import Pruner
from kdlab.pruning.tracking import write_history


class PruningCallback(L.Callback):
    """Drives a :class:`~kdlab.pruning.Pruner` from the training loop.

    The LightningModule must be a :class:`~kdlab.methods.base.BaseMethod` (``student``,
    ``teacher``, ``logits``, ``targets``); its teacher, if any, is what the discrepancy is
    measured against.

    Args:
        pruner: the student's pruner (masks already installed).
        batch: a fixed held-out batch for the discrepancy, on any device.
        directory: where ``pruning_history.json`` and its PNG are written at the end.
    """

    def __init__(self, pruner: Pruner, batch: dict[str, Tensor], directory: Path) -> None:
        self.pruner = pruner
        self.batch = batch
        self.directory = Path(directory)
        self._total = 0
        self._last_step = -1

    @property
    def state_key(self) -> str:
        # A stable key in checkpoints["callbacks"]: kdlab.compact reads the masks from it.
        return type(self).__name__

    def state_dict(self) -> dict:
        """Masks, importance averages and history: what resuming and compaction need."""
        return {"masks": self.pruner.masks.state_dict(), **self.pruner.extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pruner.masks.load_state_dict(state_dict["masks"])
        self.pruner.load_extra_state(state_dict)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The student is on its device now, before the sanity check runs it.
        self.pruner.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # T of the schedule: fixed for the run, and the same when it resumes.
        self._total = int(trainer.estimated_stepping_batches)
        self._last_step = trainer.global_step
        if self.pruner.track_interval and not self.pruner.history:
            self._track(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_step = step
        # Scored after the step, as the PLATON authors' code does: the gradients are the ones
        # the optimizer used (accumulated, unscaled, all-reduced under DDP, then clipped, which
        # on_before_optimizer_step comes before), as Lightning zeroes them only in the next
        # step; θ is the stepped weights. Every rank computes the same scores.
        self.pruner.accumulate()
        if self.pruner.update(step, self._total):
            self._check_masks_agree(trainer, pl_module)
        interval = self.pruner.track_interval
        if interval and step % interval == 0:
            self._track(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.pruner.history:
            plot = write_history(self.pruner.history, self.directory)
            log_image(trainer.logger, "prune/history", plot, step=trainer.global_step)

    # ---------------------------------------------------------------------- internals
    @torch.no_grad()
    def _track(self, trainer: L.Trainer, pl_module, step: int) -> None:
        """Log KL(teacher ‖ student) on the fixed batch, the remaining fraction, parameters
        and the importance updates skipped so far for non-finite gradients."""
        kl = None
        if pl_module.teacher is not None:
            batch = {k: v.to(pl_module.device) for k, v in self.batch.items()}
            student = pl_module.student
            was_training = student.training
            student.eval()
            student_logits = pl_module.logits(pl_module.forward_model(student, batch))
            student.train(was_training)
            teacher_logits = pl_module.logits(pl_module.teacher_outputs(batch))
            kl = float(matching_loss(student_logits, teacher_logits))
        row = self.pruner.record(step, kl)
        metrics = {
            "prune/remaining": row["remaining"],
            "prune/params": float(row["params"]),
            "prune/skipped_updates": float(self.pruner.skipped_updates),
        }
        if kl is not None:
            metrics["prune/kl"] = kl
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)

    def _check_masks_agree(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under DDP, fail loudly if any rank holds different masks than the others."""
        if trainer.world_size == 1:
            return
        masks = self.pruner.masks
        flat = torch.cat([masks.hidden, masks.heads.flatten(), masks.ffn.flatten()])
        gathered = pl_module.all_gather(flat)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(
                f"Pruning masks differ across DDP ranks at step {trainer.global_step}."
            )
