"""Lightning hooks that switch pruning on for any method (``pruning=`` config group).

:class:`PruningHooks` is mixed into :class:`~kdlab.methods.base.BaseMethod`: with a
``pruning`` config it builds a :class:`~kdlab.pruning.Pruner` for the student, feeds it the
gradients before each optimizer step, updates the masks after it, measures the
teacher–student discrepancy every ``pruning.track_interval`` steps and, at export,
compacts the student.
"""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from kdlab.losses import matching_loss
from kdlab.models.build import model_inputs
from kdlab.pruning.compaction import compact
from kdlab.pruning.pruner import Pruner
from kdlab.pruning.tracking import write_history

CHECKPOINT_KEY = "kdlab_pruning"


class PruningHooks:
    """Mixin for a BaseMethod (``student``, ``teacher``, ``logits`` and ``targets``)."""

    pruner: Pruner | None

    def setup_pruning(self, pruning: DictConfig | None) -> None:
        """Build the pruner from the ``pruning`` config (None: no pruning)."""
        if pruning is None:
            self.pruner = None
            return
        kwargs = (
            OmegaConf.to_container(pruning, resolve=True)
            if isinstance(pruning, DictConfig)
            else dict(pruning)
        )
        self.pruner = Pruner(self.student, **kwargs)
        self._tracking_batch = None

    def export_model(self) -> PreTrainedModel:
        """The student as it should be saved: compacted when it was pruned."""
        if self.pruner is None:
            return self.student
        return compact(self.student, self.pruner.masks)

    # ---------------------------------------------------------------- Lightning hooks
    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.pruner is not None:
            # Gradients are complete here (and identical on every DDP rank after the
            # all-reduce), so every rank computes the same scores and masks.
            self.pruner.accumulate()

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.pruner is None:
            return
        # T of the schedule; fixed for the run (and the same when it resumes).
        self._pruning_total = int(self.trainer.estimated_stepping_batches)
        if not self.pruner.history:
            self._track(0)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.pruner is None:
            return
        step = self.global_step
        if self.pruner.update(step, self._pruning_total):
            self._check_masks_agree()
        interval = self.pruner.track_interval
        if interval and step % interval == 0:
            self._track(step)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.pruner is not None and self.trainer.is_global_zero and self.pruner.history:
            write_history(self.pruner.history, Path(self.trainer.default_root_dir))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.pruner is not None:
            checkpoint[CHECKPOINT_KEY] = self.pruner.extra_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.pruner is not None and CHECKPOINT_KEY in checkpoint:
            self.pruner.load_extra_state(checkpoint[CHECKPOINT_KEY])

    # ---------------------------------------------------------------------- internals
    @torch.no_grad()
    def _track(self, step: int) -> None:
        """Log KL(teacher ‖ student) on a fixed validation batch, remaining fraction, params."""
        kl = None
        if self.teacher is not None:
            batch = self._fixed_batch()
            inputs = model_inputs(batch)
            was_training = self.student.training
            self.student.eval()
            student = self.logits(self.student(**inputs))
            self.student.train(was_training)
            teacher = self.logits(self.teacher(**inputs))
            kl = float(matching_loss(student, teacher, self.targets(batch)))
        row = self.pruner.record(step, kl)
        metrics = {"prune/remaining": row["remaining"], "prune/params": float(row["params"])}
        if kl is not None:
            metrics["prune/kl"] = kl
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def _fixed_batch(self) -> dict:
        if self._tracking_batch is None:
            loader = self.trainer.datamodule.val_dataloader()
            loader = loader[0] if isinstance(loader, list) else loader
            self._tracking_batch = next(iter(loader))
        return {k: v.to(self.device) for k, v in self._tracking_batch.items()}

    def _check_masks_agree(self) -> None:
        """Under DDP, fail loudly if any rank holds different masks than the others."""
        if self.trainer.world_size == 1:
            return
        masks = self.pruner.masks
        flat = torch.cat([masks.hidden, masks.heads.flatten(), masks.ffn.flatten()])
        gathered = self.all_gather(flat)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"Pruning masks differ across DDP ranks at step {self.global_step}.")
