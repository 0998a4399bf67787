"""Lightning callbacks (and the checkpoint plugin) of kdlab's own."""

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kdlab.rundir import write_whole


class StepTimer(L.Callback):
    """Logs the wall time of a training batch (forward, backward and the optimizer step it
    completes) as ``train/step_time_s``, to compare the cost of methods on the same batches.

    On by default (``callbacks.step_timer``). Each logged value is the mean over the batches
    since the previous one, logged every ``trainer.log_every_n_steps`` optimizer steps, as
    Lightning logs the other step metrics. Per batch it only reads the clock: about 10 µs
    per batch in its hooks (median, measured inside ``Trainer.fit`` on the loaded 2-core
    development CPU), where a ``LightningModule.log`` call per batch cost 0.5-0.9 ms.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._elapsed = 0.0  # seconds of the batches since the last log
        self._batches = 0
        self._logged_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._elapsed += time.perf_counter() - self._start
        self._batches += 1
        step = trainer.global_step
        # The micro-batches of gradient accumulation share a global step: log it once.
        if step == self._logged_step or step % trainer.log_every_n_steps != 0:
            return
        if trainer.logger is not None:
            mean = self._elapsed / self._batches
            trainer.logger.log_metrics({"train/step_time_s": mean}, step=step)
        self._elapsed, self._batches, self._logged_step = 0.0, 0, step


class RestoreLoaderPosition(L.Callback):
    """Puts the training loader back where a checkpoint left it: its position in a
    mid-epoch checkpoint, and its sampler's epoch.

    Lightning saves the position of a stateful training loader in every checkpoint and
    loads it when it first sets up the training data after the restore. A method whose
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every kdlab
    method: the learning-rate schedule needs it) makes Lightning set that data up earlier,
    before the restore, and the saved position is then never loaded (Lightning issue
    #20550, open for 2.6). This callback loads it as training starts and rebuilds the
    iterator from it; where Lightning has loaded the position itself, nothing is pending
    and it does nothing. ``kdlab.train`` adds it to every run.

    Lightning sets the sampler's epoch (which draws the epoch's order) from its count of
    processed epochs. A step-limited run (``trainer.max_steps``) restarted from a checkpoint
    written as an epoch ended replays that epoch's end and counts it twice, one ahead of
    ``current_epoch`` from then on, so every later epoch drew the next epoch's order. Each
    epoch that starts afresh sets the sampler's epoch to ``current_epoch`` again (the same
    value on any run that did not restart so); an epoch resumed mid-way keeps the epoch its
    loader position was saved with.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if not (fit_loop.restarting and fit_loop._combined_loader_states_to_load):
            return
        fit_loop._load_combined_loader_states()
        # The iterator built before the restore started at the epoch's first batch.
        iter(fit_loop._data_fetcher)


class WholeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all (``trainer.plugins`` in
    ``conf/trainer/default.yaml``): into a hidden file beside the checkpoint, then renamed
    over it (:func:`kdlab.rundir.write_whole`), so that a full disk or a killed process
    leaves the previous ``best.ckpt`` / ``last.ckpt`` as it was.

    Lightning's own ``_atomic_save`` writes into the system's temporary directory and then
    moves the file: across file systems that move is a copy into the checkpoint's own path,
    which a full disk leaves truncated.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to the local file ``path``.

        Raises:
            TypeError: for ``storage_options``, which local files do not take.
            OSError: errno 28 (a full disk) names the directory and keeps the previous file.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda partial: torch.save(checkpoint, partial))
